"""`TransformerConfig`: the sizes and switches of a `Transformer`, and what follows
from the sizes alone (parameter and FLOP counts)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

import eqxpar as ep
from eqxpar.nn import REMAT, ContextStrategy, Layout, Remat

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and switches of a `Transformer`. Hashable, so it is a static field.

    **Fields:**

    - `vocab_size`, `dim`, `num_layers`, `num_heads`: the usual sizes.
    - `num_kv_heads`: key/value heads for grouped-query attention (default
      `num_heads`); must be divisible by the tensor-parallel size.
    - `mlp_dim`: MLP hidden size (per branch for SwiGLU); default `4 * dim`.
    - `max_seq_len`: longest sequence (and KV cache) supported.
    - `activation`: `"gelu"` (GPT) or `"swiglu"` (Llama).
    - `norm`: `"layernorm"` or `"rmsnorm"`.
    - `tie_embeddings`: the output head reuses the embedding table.
    - `use_bias`: biases in the linear layers.
    - `dropout`: residual dropout; `attention_dropout`: on attention probabilities.
    - `rope_theta`: rotary embedding base.
    - `sequence_parallel`: Megatron sequence parallelism (norms and dropout on
      sequence blocks; all-gather / reduce-scatter instead of all-reduce).
    - `collective_matmul`: `None`, `"unidirectional"` or `"bidirectional"` (needs
      `sequence_parallel`).
    - `remat`: activation checkpointing of each layer: `"none"`, `"full"`
      (recompute everything), `"selective"` (save matmul and collective outputs,
      recompute attention scores and elementwise ops), `"offload"` (like selective,
      but saved matmul outputs go to host memory; needs a platform with pinned host
      memory).
    - `param_dtype`, `compute_dtype`: `"float32"`, `"bfloat16"` or `"float16"`.
      Norms, softmax and the loss always run in float32.
    - `axis_name`: the tensor-parallel mesh axis.
    - `pipeline_stages`, `virtual_stages`: split the layers into
      `pipeline_stages * virtual_stages` chunks for pipeline parallelism over
      `pipeline_axis` (Megatron's interleaved layout: chunk `v * stages + s` on stage
      `s`). The layers are then stacked `(virtual, stages, per_chunk, ...)`.
    - `context_parallel`: `None`, `"ring"` or `"all_gather"`: split the sequence over
      `context_axis` (context parallelism; see `eqxpar.nn.ring_attention`). Inside
      `filter_shard_map` tokens and targets come in `P("data", "context")`, in
      `eqxpar.nn.context_order` for the `"load_balanced"` `context_layout` (or plain
      blocks for `"contiguous"`), and logits go out `P("data", "context", "tensor")`.
    - `num_experts`: `0` (dense MLPs), or the experts of every `moe_every`-th block's
      MLP (blocks `moe_every - 1`, `2 * moe_every - 1`, ...), an `eqxpar.nn.MoE` with
      `top_k`, `capacity_factor`, the auxiliary-loss coefficients `router_z_loss` and
      `load_balance_loss`, its experts split over `expert_axis`. Inside
      `filter_shard_map` the batch is split over `("data", "expert")`.
    """

    vocab_size: int = 256
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    mlp_dim: int | None = None
    max_seq_len: int = 256
    activation: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    tie_embeddings: bool = False
    use_bias: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    sequence_parallel: bool = False
    collective_matmul: Literal["unidirectional", "bidirectional"] | None = None
    remat: Remat = "none"
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    axis_name: str = ep.TENSOR
    pipeline_stages: int = 1
    virtual_stages: int = 1
    pipeline_axis: str = ep.PIPELINE
    context_parallel: ContextStrategy | None = None
    context_axis: str = ep.CONTEXT
    context_layout: Layout = "load_balanced"
    num_experts: int = 0
    moe_every: int = 1
    top_k: int = 2
    capacity_factor: float = 1.25
    router_z_loss: float = 1e-3
    load_balance_loss: float = 1e-2
    expert_axis: str = ep.EXPERT

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"TransformerConfig.{field}={getattr(self, field)!r}: {why}")

        for field in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, field) < 1:
                bad(field, "must be >= 1")
        if self.dim % self.num_heads:
            bad("dim", f"must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads:
            bad("num_kv_heads", f"must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            bad("num_heads", f"dim / num_heads = {self.head_dim} must be even for RoPE")
        if self.remat not in REMAT:
            bad("remat", "use 'none', 'full', 'selective' or 'offload'")
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in _DTYPES:
                bad(field, f"use one of {_DTYPES}")
        for field in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                bad(field, "must be in [0, 1)")
        for field in ("pipeline_stages", "virtual_stages"):
            if getattr(self, field) < 1:
                bad(field, "must be >= 1")
        if self.context_parallel not in (None, "ring", "all_gather"):
            bad("context_parallel", "use None, 'ring' or 'all_gather'")
        if self.context_layout not in ("load_balanced", "contiguous"):
            bad("context_layout", "use 'load_balanced' or 'contiguous'")
        if self.context_parallel is not None and self.chunks > 1:
            bad(
                "context_parallel",
                "context parallelism with pipeline_stages > 1 is not supported yet; use one",
            )
        if self.context_parallel is not None and self.attention_dropout:
            bad(
                "attention_dropout",
                "attention dropout is not supported with context_parallel; set it to 0",
            )
        if self.num_experts:
            self._check_moe(bad)
        if self.num_layers % self.chunks:
            bad(
                "num_layers",
                f"must split into pipeline_stages x virtual_stages = {self.chunks} chunks",
            )

    def _check_moe(self, bad: Any) -> None:
        if self.num_experts < self.top_k or self.top_k < 1:
            bad("top_k", f"must be in [1, num_experts={self.num_experts}]")
        if self.moe_every < 1 or self.num_layers % self.moe_every:
            bad("moe_every", f"must be >= 1 and divide num_layers={self.num_layers}")
        if self.capacity_factor <= 0:
            bad("capacity_factor", "must be > 0")
        for field, why, used in (
            ("pipeline_stages", "pipeline parallelism", self.chunks > 1),
            ("context_parallel", "context parallelism", self.context_parallel is not None),
            ("sequence_parallel", "sequence parallelism", self.sequence_parallel),
        ):
            if used:
                bad(field, f"{why} with num_experts > 0 is not supported yet")

    @property
    def moe_layers(self) -> int:
        """How many blocks are MoE blocks (`num_layers / moe_every`, or 0)."""
        return self.num_layers // self.moe_every if self.num_experts else 0

    @property
    def chunks(self) -> int:
        """Pipeline chunks: `pipeline_stages * virtual_stages` (1: no pipeline)."""
        return self.pipeline_stages * self.virtual_stages

    @property
    def layer_dims(self) -> ep.Dims:
        """Mesh axes of the stacked layer dims: `(None,)`, or `(None, pipeline, None)`."""
        if self.chunks == 1:
            return ep.Dims((None,))
        return ep.Dims((None, self.pipeline_axis, None))

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def hidden(self) -> int:
        return 4 * self.dim if self.mlp_dim is None else self.mlp_dim

    def _sizes(self) -> tuple[int, int, int, int]:
        """Parameters of a block's attention and two norms, of its dense MLP, of one
        expert's MLP (no biases) and of one norm."""
        c = self
        d, hd, h, kv = c.dim, c.head_dim, c.num_heads, c.kv_heads
        bias = int(c.use_bias)
        attn = d * (h + 2 * kv) * hd + h * hd * d + bias * ((h + 2 * kv) * hd + d)
        norm = d * (2 if c.norm == "layernorm" and c.use_bias else 1)
        up = (2 if c.activation == "swiglu" else 1) * c.hidden
        expert = d * up + c.hidden * d
        return attn + 2 * norm, expert + bias * (up + d), expert, norm

    def _count(self, experts_used: int) -> int:
        """Parameters, counting `experts_used` experts per MoE block."""
        c = self
        block, mlp, expert, norm = self._sizes()
        moe = c.moe_layers
        layers = c.num_layers * block + (c.num_layers - moe) * mlp
        layers += moe * (c.num_experts * c.dim + experts_used * expert)
        head = 0 if c.tie_embeddings else c.vocab_size * c.dim
        return c.vocab_size * c.dim + layers + norm + head

    @property
    def num_params(self) -> int:
        """The number of parameters of `Transformer(config)`, from the sizes alone
        (`models.count_params(model)` counts a built model's arrays); with MoE, every
        expert's."""
        return self._count(self.num_experts)

    @property
    def num_active_params(self) -> int:
        """Parameters one token uses: with MoE, `top_k` experts per MoE block (and the
        router); without, `num_params`."""
        return self._count(self.top_k) if self.num_experts else self.num_params

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def check_same_weights(self, other: TransformerConfig) -> None:
        """Raises unless `other` gives every weight of this config's model the same
        meaning: only the switches in `SAME_WEIGHTS` may differ."""
        changed = [
            f.name
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name) and f.name not in SAME_WEIGHTS
        ]
        if changed:
            shown = ", ".join(f"{n}={getattr(self, n)!r} -> {getattr(other, n)!r}" for n in changed)
            raise ValueError(
                f"with_config: {shown} would give the same weights another meaning (a "
                f"different model). with_config changes only switches that keep every "
                f"weight's meaning: {', '.join(SAME_WEIGHTS)}. Build a new Transformer for "
                f"other sizes, or cast param_dtype with jax.tree.map."
            )


SAME_WEIGHTS: tuple[str, ...] = (
    "max_seq_len",
    "dropout",
    "attention_dropout",
    "sequence_parallel",
    "collective_matmul",
    "remat",
    "compute_dtype",
    "axis_name",
    "pipeline_stages",
    "virtual_stages",
    "pipeline_axis",
    "context_parallel",
    "context_axis",
    "context_layout",
    "capacity_factor",
    "router_z_loss",
    "load_balance_loss",
    "expert_axis",
)
"""The `TransformerConfig` fields `Transformer.with_config` may change: switches of
how the same weights are computed (positions are rotary, so `max_seq_len` holds no
weight)."""


def param_count(config: TransformerConfig) -> int:
    """Deprecated: use `config.num_params` (`models.count_params(model)` counts a built
    model's arrays)."""
    warnings.warn(
        "models.param_count(config) is deprecated; use config.num_params.",
        DeprecationWarning,
        stacklevel=2,
    )
    return config.num_params


def flops_per_token(config: TransformerConfig, seq_len: int, *, training: bool = True) -> int:
    """Matmul FLOPs per token: `2 x` the matmul parameters a token uses (head
    included, embedding lookup not; in an MoE block the router and `top_k` experts)
    plus attention's `4 * seq_len * num_heads * head_dim` per layer (scores
    and weighted sum, the full square as Megatron counts it); `x 3` for training
    (forward + backward)."""
    c = config
    up = (2 if c.activation == "swiglu" else 1) * c.hidden
    attn = c.dim * (c.num_heads + 2 * c.kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.dim
    mlp = c.dim * up + c.hidden * c.dim
    moe = c.moe_layers  # an MoE block: the router and top_k experts per token
    matmul = (
        c.num_layers * attn
        + (c.num_layers - moe) * mlp
        + moe * (c.num_experts * c.dim + c.top_k * mlp)
        + c.vocab_size * c.dim
    )
    attention = c.num_layers * 4 * seq_len * c.num_heads * c.head_dim
    forward = 2 * matmul + attention
    return 3 * forward if training else forward
