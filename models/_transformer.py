"""A Megatron-style decoder-only Transformer (GPT / Llama) built from eqxpar layers."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

import eqxpar as ep
from eqxpar.collectives import COLLECTIVE_OUTPUT, axis_size, shard_count, shard_index
from eqxpar.nn import (
    ColumnParallelLinear,
    KVCache,
    LayerNorm,
    ParallelAttention,
    ParallelMLP,
    RMSNorm,
    VocabParallelEmbedding,
    indexed_dropout,
    vocab_parallel_argmax,
    vocab_parallel_cross_entropy,
)
from eqxpar.pipeline import Interleaved1F1B, OneFOneB, pipeline_loss

Remat = Literal["none", "full", "selective", "offload"]
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
        if self.remat not in ("none", "full", "selective", "offload"):
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
        if self.num_layers % self.chunks:
            bad(
                "num_layers",
                f"must split into pipeline_stages x virtual_stages = {self.chunks} chunks",
            )

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

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _norm(config: TransformerConfig) -> RMSNorm | LayerNorm:
    kw: dict[str, Any] = dict(
        sequence_parallel=config.sequence_parallel,
        axis_name=config.axis_name,
        dtype=config.param_dtype,
    )
    if config.norm == "rmsnorm":
        return RMSNorm(config.dim, **kw)
    return LayerNorm(config.dim, use_bias=config.use_bias, **kw)


def _token_index(x: Array, sequence_parallel: bool, axis_name: str) -> Array:
    """Global positions of the tokens along `x`'s sequence dim (1) on this device."""
    s = x.shape[1]
    first = shard_index(axis_name) * s if sequence_parallel else 0
    return first + jnp.arange(s, dtype=jnp.int32)


class TransformerBlock(eqx.Module):
    """Pre-norm block: `x + drop(attn(norm(x)))`, then `x + drop(mlp(norm(x)))`."""

    attn_norm: RMSNorm | LayerNorm
    attn: ParallelAttention
    mlp_norm: RMSNorm | LayerNorm
    mlp: ParallelMLP
    dropout: float = eqx.field(static=True)
    sequence_parallel: bool = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        ka, km = jax.random.split(key)
        kw: dict[str, Any] = dict(
            use_bias=config.use_bias,
            sequence_parallel=config.sequence_parallel,
            collective_matmul=config.collective_matmul,
            axis_name=config.axis_name,
            dtype=config.param_dtype,
        )
        self.attn_norm = _norm(config)
        self.attn = ParallelAttention(
            config.dim,
            config.num_heads,
            num_kv_heads=config.kv_heads,
            rope_theta=config.rope_theta,
            dropout=config.attention_dropout,
            **kw,
            key=ka,
        )
        self.mlp_norm = _norm(config)
        self.mlp = ParallelMLP(
            config.dim, config.hidden, activation=config.activation, **kw, key=km
        )
        self.dropout = config.dropout
        self.sequence_parallel = config.sequence_parallel
        self.axis_name = config.axis_name

    def __call__(
        self, x: Array, key: PRNGKeyArray | None = None, cache: KVCache | None = None
    ) -> Any:
        """`x: (batch, seq, dim)` (a sequence block with SP); with a cache, also returns
        the updated cache."""
        keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
        index = _token_index(x, self.sequence_parallel, self.axis_name)
        h = self.attn(self.attn_norm(x), key=keys[0], cache=cache)
        if cache is not None:
            h, cache = h
        x = x + indexed_dropout(h, self.dropout, keys[1], index=index, axis=1)
        h = self.mlp(self.mlp_norm(x))
        x = x + indexed_dropout(h, self.dropout, keys[2], index=index, axis=1)
        return x if cache is None else (x, cache)


def _remat(fn: Any, remat: Remat) -> Any:
    policies = jax.checkpoint_policies
    if remat == "none":
        return fn
    if remat == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    keep_collectives = policies.save_only_these_names(COLLECTIVE_OUTPUT)
    if remat == "selective":
        saved = policies.dots_with_no_batch_dims_saveable
    else:
        memories = {m.kind for m in jax.devices()[0].addressable_memories()}
        if "pinned_host" not in memories:
            raise ValueError(
                f"remat='offload' needs a device with pinned host memory; "
                f"{jax.devices()[0].platform} offers {sorted(memories)}. Use "
                f"remat='selective' instead."
            )
        offload = policies.offload_dot_with_no_batch_dims("device", "pinned_host")

        def saved(*args: Any, **params: Any) -> Any:
            # Collective outputs stay on the device; matmul outputs go to the host.
            return True if keep_collectives(*args, **params) else offload(*args, **params)

        return jax.checkpoint(fn, policy=saved, prevent_cse=False)
    policy = policies.save_from_both_policies(saved, keep_collectives)
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


class Transformer(eqx.Module):
    """A decoder-only Transformer with Megatron's tensor (and sequence) parallelism.

    Vocab-parallel embedding -> `num_layers` blocks (stacked on a leading dim and run
    with `jax.lax.scan`, so compile time does not grow with depth) -> final norm ->
    column-parallel head (or the embedding table, tied) -> vocab-parallel
    cross-entropy. Outside `shard_map` it is the plain dense model; inside
    `eqxpar.filter_shard_map` every layer works on its shard.

    Per layer, the forward pass issues two all-reduces over the tensor axis (after
    attention and after the MLP), four counting the backward pass; with sequence
    parallelism two all-gathers and two reduce-scatters instead.
    """

    embed: VocabParallelEmbedding
    layers: TransformerBlock = eqx.field(metadata=ep.stacked("layer_dims"))
    norm: RMSNorm | LayerNorm
    head: ColumnParallelLinear | None
    config: TransformerConfig = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        """**Arguments:**

        - `config`: a `TransformerConfig`.
        - `key`: PRNG key.
        """
        ke, kl, kh = jax.random.split(key, 3)
        embed = VocabParallelEmbedding(
            config.vocab_size,
            config.dim,
            sequence_parallel=config.sequence_parallel,
            axis_name=config.axis_name,
            dtype=config.param_dtype,
            key=ke,
        )
        # GPT-2's N(0, 0.02) table: sensible logits when the head is tied.
        self.embed = eqx.tree_at(lambda e: e.weight, embed, 0.02 * embed.weight)
        layers = eqx.filter_vmap(lambda k: TransformerBlock(config, key=k))(
            jax.random.split(kl, config.num_layers)
        )
        self.layers = _stack_as(layers, config)
        self.norm = _norm(config)
        self.head = (
            None
            if config.tie_embeddings
            else ColumnParallelLinear(
                config.dim,
                config.vocab_size,
                use_bias=False,
                sequence_parallel=config.sequence_parallel,
                collective_matmul=config.collective_matmul,
                axis_name=config.axis_name,
                dtype=config.param_dtype,
                key=kh,
            )
        )
        self.config = config

    @property
    def layer_dims(self) -> ep.Dims:
        return self.config.layer_dims

    def flat_layers(self) -> TransformerBlock:
        """The layers stacked `(num_layers, ...)` in order, whatever the pipeline layout."""
        return jax.tree.map(lambda a: a.reshape(-1, *a.shape[len(self.layer_dims) :]), self.layers)

    def _cast(self) -> Transformer:
        dtype = jnp.dtype(self.config.compute_dtype)
        if dtype == jnp.dtype(self.config.param_dtype):
            return self
        return jax.tree.map(lambda p: p.astype(dtype) if eqx.is_inexact_array(p) else p, self)

    def _layers(self, x: Array, key: PRNGKeyArray | None, layers: Any = None) -> Array:
        self._check_not_pipelined("running the layers in order")
        layers = self.flat_layers() if layers is None else layers
        dynamic, static = eqx.partition(layers, eqx.is_array)
        num = jax.tree.leaves(dynamic)[0].shape[0]
        keys = None if key is None else jax.random.split(key, num)

        def body(x, xs):
            layer, k = xs
            return eqx.combine(layer, static)(x, k), None

        x, _ = jax.lax.scan(_remat(body, self.config.remat), x, (dynamic, keys))
        return x

    def _logits(self, x: Array) -> Array:
        if self.head is not None:
            return self.head(x)
        return self.embed.attend(x, collective_matmul=self.config.collective_matmul)

    def __call__(
        self, tokens: Int[Array, "batch seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "batch seq vocab_shard"]:
        """**Arguments:**

        - `tokens`: `(batch, seq)` token ids, replicated over the tensor axis.
        - `key`: PRNG key for dropout; `None` disables dropout.

        **Returns:**

        Per-shard logits `(batch, seq, vocab_size / t)` in the compute dtype.
        """
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"Transformer: sequence length {tokens.shape[1]} exceeds "
                f"max_seq_len={self.config.max_seq_len}."
            )
        model = self._cast()
        with jax.named_scope("models.Transformer"):
            x = model.embed(tokens)
            x = model._layers(x, key)
            return model._logits(model.norm(x))

    def per_token_loss(
        self,
        tokens: Int[Array, "batch seq"],
        targets: Int[Array, "batch seq"],
        *,
        key: PRNGKeyArray | None = None,
        mask: Array | None = None,
    ) -> Float[Array, "batch seq"]:
        """Vocab-parallel cross-entropy of `targets` at each position, in float32.

        The full logits are never gathered. `mask` (`(batch, seq)` bool) zeroes
        positions. Dropout masks depend on the token position and head, not on the
        batch row's global index: with the batch split over `"data"`, give each data
        shard its own `key` (`eqxpar.train.make_train_step` folds the data index in).
        """
        logits = self(tokens, key=key)
        return vocab_parallel_cross_entropy(
            logits, targets, axis_name=self.config.axis_name, where=mask
        )

    def loss(
        self,
        tokens: Int[Array, "batch seq"],
        targets: Int[Array, "batch seq"],
        *,
        key: PRNGKeyArray | None = None,
        schedule: Any = None,
        microbatches: int = 1,
    ) -> Float[Array, ""]:
        """Mean next-token cross-entropy over this device's batch.

        With `pipeline_stages > 1`, inside `filter_shard_map` with the pipeline axis
        bound, the batch is split into `microbatches` and run through `schedule` (an
        `eqxpar.pipeline` schedule; default `OneFOneB()`, or `Interleaved1F1B` when
        `virtual_stages > 1`): the embedding on the first chunk's stage, the head and
        loss on the last one's. Dropout is not supported on that path yet.
        """
        c = self.config
        if c.chunks == 1 or axis_size(c.pipeline_axis) is None:
            return jnp.mean(self.per_token_loss(tokens, targets, key=key))
        if key is not None and (c.dropout or c.attention_dropout):
            raise ValueError("Transformer.loss: dropout is not supported with pipelining yet.")
        if tokens.shape[0] % microbatches:
            raise ValueError(
                f"Transformer.loss: batch {tokens.shape[0]} does not split into "
                f"{microbatches} microbatches."
            )
        if schedule is None:
            schedule = OneFOneB() if c.virtual_stages == 1 else Interleaved1F1B(c.virtual_stages)
        table = schedule.table(c.pipeline_stages, microbatches)
        if table.virtual != c.virtual_stages:
            raise ValueError(
                f"Transformer.loss: the schedule runs {table.virtual} chunks per stage but the "
                f"model has virtual_stages={c.virtual_stages}."
            )
        model = self._cast()

        def run_chunk(layers: TransformerBlock, x: Array) -> Array:
            dynamic, static = eqx.partition(layers, eqx.is_array)
            x, _ = jax.lax.scan(
                _remat(lambda x, layer: (eqx.combine(layer, static)(x), None), c.remat), x, dynamic
            )
            return x

        def last(parts: Any, x: Array, y: Array) -> Array:
            norm, head = parts
            logits = head(norm(x))
            return jnp.mean(vocab_parallel_cross_entropy(logits, y, axis_name=c.axis_name))

        head = model.head if model.head is not None else _TiedHead(model.embed, c)
        split = lambda a: a.reshape(microbatches, -1, *a.shape[1:])  # noqa: E731
        return pipeline_loss(
            lambda embed, t: embed(t),
            run_chunk,
            last,
            model.embed,
            model.layers,
            (model.norm, head),
            split(tokens),
            split(targets),
            table=table,
            axis_name=c.pipeline_axis,
        )

    def _check_not_pipelined(self, what: str) -> None:
        c = self.config
        if c.chunks > 1 and axis_size(c.pipeline_axis) not in (None, 1):
            raise ValueError(
                f"{what} runs every layer on one device, but this model's layers are split "
                f"over the {c.pipeline_axis!r} axis here. Use Transformer.loss (pipelined), "
                f"or call it outside the pipeline axis (e.g. in_specs that keep the layers "
                f"whole), or on model.with_config(pipeline_stages=1, virtual_stages=1)."
            )

    def with_config(self, **changes: Any) -> Transformer:
        """The same weights under a config with some static switches changed (e.g.
        `sequence_parallel=False` for generation, or another `remat`)."""
        config = self.config.replace(**changes)
        skeleton = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
        leaves = jax.tree.leaves(self)
        want = jax.tree.leaves(skeleton)
        if [x.size for x in leaves] != [x.size for x in want]:
            raise ValueError(f"with_config({changes}): the change alters parameter sizes.")
        # Only the stacked layer layout may change (pipeline chunking): a reshape, since
        # chunk order is layer order.
        leaves = [x.reshape(w.shape) for x, w in zip(leaves, want, strict=True)]
        return jax.tree.unflatten(jax.tree.structure(skeleton), leaves)

    def generate(
        self,
        prompt: Int[Array, "batch prompt"],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        key: PRNGKeyArray | None = None,
    ) -> Int[Array, "batch total"]:
        """Continues `prompt` token by token with a KV cache.

        Greedy when `temperature == 0`, else samples from `softmax(logits / T)` with
        the Gumbel-max trick, drawing noise for the global vocabulary so the result
        is the same however the vocabulary and heads are split. Works inside
        `filter_shard_map` (each device keeps the cache of its own KV heads; no logits
        are gathered) and outside it. With the batch split over `"data"`, fold the data
        index into `key` (`jax.random.fold_in(key, jax.lax.axis_index("data"))`) so the
        data shards draw independent noise.

        **Arguments:**

        - `prompt`: `(batch, prompt_len)` token ids.
        - `max_new_tokens`: tokens to add; `prompt_len + max_new_tokens` must not
          exceed `max_seq_len`.
        - `temperature`: `0` for greedy decoding.
        - `key`: PRNG key, required when `temperature > 0`.

        **Returns:**

        `(batch, prompt_len + max_new_tokens)` token ids.
        """
        c = self.config
        if c.sequence_parallel:
            raise ValueError(
                "generate() decodes one token at a time, which sequence parallelism cannot "
                "split; call model.with_config(sequence_parallel=False).generate(...)."
            )
        total = prompt.shape[1] + max_new_tokens
        if total > c.max_seq_len:
            raise ValueError(f"generate: {total} tokens exceed max_seq_len={c.max_seq_len}.")
        if temperature > 0.0 and key is None:
            raise ValueError("generate: temperature > 0 needs a `key`.")
        key = jax.random.key(0) if key is None else key
        model = self._cast()
        batch = prompt.shape[0]
        kv_local = c.kv_heads // shard_count(c.axis_name)
        dtype = jnp.dtype(c.compute_dtype)
        cache = KVCache.empty(batch, total, kv_local, c.head_dim, dtype)
        caches = jax.tree.map(lambda a: jnp.stack([a] * c.num_layers), cache)
        logits, caches = model._step(prompt, caches)
        start = prompt.shape[1]

        def emit(out: Array, logits: Array, i: Array) -> tuple[Array, Array]:
            token = model._sample(logits, temperature, jax.random.fold_in(key, i))
            token = token[:, None].astype(prompt.dtype)
            return jax.lax.dynamic_update_slice_in_dim(out, token, start + i, 1), token

        out = jnp.concatenate([prompt, jnp.zeros((batch, max_new_tokens), prompt.dtype)], 1)
        if max_new_tokens == 0:
            return out
        out, token = emit(out, logits, jnp.zeros((), jnp.int32))

        def body(carry, i):
            out, token, caches = carry
            logits, caches = model._step(token, caches)
            out, token = emit(out, logits, i)
            return (out, token, caches), None

        steps = jnp.arange(1, max_new_tokens, dtype=jnp.int32)
        (out, _, _), _ = jax.lax.scan(body, (out, token, caches), steps)
        return out

    def _step(self, tokens: Array, caches: KVCache) -> tuple[Array, KVCache]:
        self._check_not_pipelined("generate()")
        dynamic, static = eqx.partition(self.flat_layers(), eqx.is_array)

        def body(x, xs):
            layer, cache = xs
            x, cache = eqx.combine(layer, static)(x, None, cache)
            return x, cache

        x, caches = jax.lax.scan(body, self.embed(tokens), (dynamic, caches))
        return self._logits(self.norm(x[:, -1:]))[:, 0], caches

    def _sample(self, logits: Array, temperature: float, key: PRNGKeyArray) -> Array:
        axis = self.config.axis_name
        logits = logits.astype(jnp.float32)
        if temperature > 0.0:
            width = logits.shape[-1]
            noise = jax.random.gumbel(key, (logits.shape[0], self.config.vocab_size))
            start = shard_index(axis) * width
            logits = logits / temperature + jax.lax.dynamic_slice_in_dim(noise, start, width, 1)
        return vocab_parallel_argmax(logits, axis_name=axis)


def param_count(config: TransformerConfig) -> int:
    """The number of parameters of `Transformer(config)`, from the sizes alone."""
    c = config
    d, hd, h, kv = c.dim, c.head_dim, c.num_heads, c.kv_heads
    up = (2 if c.activation == "swiglu" else 1) * c.hidden
    bias = int(c.use_bias)
    attn = d * (h + 2 * kv) * hd + h * hd * d + bias * ((h + 2 * kv) * hd + d)
    mlp = d * up + c.hidden * d + bias * (up + d)
    norm = d * (2 if c.norm == "layernorm" and c.use_bias else 1)
    per_layer = attn + mlp + 2 * norm
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return c.vocab_size * d + c.num_layers * per_layer + norm + head


def flops_per_token(config: TransformerConfig, seq_len: int, *, training: bool = True) -> int:
    """Matmul FLOPs per token: `2 x` the matmul parameters (head included, embedding
    lookup not) plus attention's `4 * seq_len * num_heads * head_dim` per layer (scores
    and weighted sum, the full square as Megatron counts it); `x 3` for training
    (forward + backward)."""
    c = config
    up = (2 if c.activation == "swiglu" else 1) * c.hidden
    matmul = (
        c.num_layers
        * (
            c.dim * (c.num_heads + 2 * c.kv_heads) * c.head_dim
            + c.num_heads * c.head_dim * c.dim
            + c.dim * up
            + c.hidden * c.dim
        )
        + c.vocab_size * c.dim
    )
    attention = c.num_layers * 4 * seq_len * c.num_heads * c.head_dim
    forward = 2 * matmul + attention
    return 3 * forward if training else forward


def count_params(model: eqx.Module) -> int:
    """The number of array elements in `model` (global sizes)."""
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, ep.is_arraylike)))


def _stack_as(layers: TransformerBlock, config: TransformerConfig) -> TransformerBlock:
    """`(num_layers, ...)` -> `(virtual, stages, per_chunk, ...)` when pipelined."""
    if config.chunks == 1:
        return layers
    shape = (config.virtual_stages, config.pipeline_stages, config.num_layers // config.chunks)
    return jax.tree.map(lambda a: a.reshape(*shape, *a.shape[1:]), layers)


class _TiedHead(eqx.Module):
    """The output head tied to the embedding table (for the last pipeline stage)."""

    embed: VocabParallelEmbedding
    collective_matmul: Any = eqx.field(static=True)

    def __init__(self, embed: VocabParallelEmbedding, config: TransformerConfig):
        self.embed = embed
        self.collective_matmul = config.collective_matmul

    def __call__(self, x: Array) -> Array:
        return self.embed.attend(x, collective_matmul=self.collective_matmul)
