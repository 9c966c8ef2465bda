"""The analytic cost model of one training step of a `models.Transformer`: the bytes
each collective should move, the bytes each device should hold, and the step's time.

Everything here follows from the `TransformerConfig`, a `Layout` and the batch; nothing
is measured. The reports (`_report.py`) set these numbers beside a compiled step's, and
the planner (`_planner.py`) ranks layouts by them. Formulas: the shared REFERENCE
(Narayanan et al. 2021 and Korthikanti et al. 2022 for TP/SP and pipeline messages, the
ZeRO paper for model states).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax.numpy as jnp

Kind = Literal["dp", "zero1", "zero2", "fsdp"]
ScheduleName = Literal["1f1b", "gpipe"]
_ORDER = ("pipeline", "data", "tensor")  # outermost first, as `eqxpar.make_mesh` lays out


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to run a step: mesh sizes, data-parallel strategy and the switches that
    change memory and communication.

    **Fields:**

    - `data`, `tensor`, `pipeline`: the mesh axis sizes.
    - `strategy`: `"dp"`, `"zero1"`, `"zero2"` or `"fsdp"` over the data axis.
    - `sequence_parallel`: Megatron's SP (needs `tensor > 1`).
    - `microbatches`: pipeline microbatches `m`; without a pipeline, gradient
      accumulation steps (`make_train_step(accumulation_steps=...)`).
    - `schedule`: `"1f1b"` or `"gpipe"` (with a pipeline).
    - `remat`: `"none"`, `"selective"` or `"full"` activation checkpointing.
    - `min_shard_size`: arrays with fewer elements stay whole under ZeRO/FSDP (as
      `eqxpar.train.Strategy`).
    """

    data: int = 1
    tensor: int = 1
    pipeline: int = 1
    strategy: Kind = "dp"
    sequence_parallel: bool = False
    microbatches: int = 1
    schedule: ScheduleName = "1f1b"
    remat: str = "none"
    min_shard_size: int = 1024

    def __post_init__(self):
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError(
                "Layout(sequence_parallel=True, tensor=1): sequence parallelism splits the "
                "sequence over the tensor axis; use tensor > 1 or sequence_parallel=False."
            )
        if self.microbatches < 1:
            raise ValueError(f"Layout.microbatches={self.microbatches}; use >= 1.")

    @property
    def devices(self) -> int:
        return self.data * self.tensor * self.pipeline

    def config(self, config: Any) -> Any:
        """`config` (a `TransformerConfig`) with this layout's switches: SP, remat and
        pipeline stages."""
        return config.replace(
            sequence_parallel=self.sequence_parallel,
            remat=self.remat,
            pipeline_stages=self.pipeline,
            virtual_stages=1,
        )

    def table(self) -> Any:
        """The pipeline schedule's `TickTable` (`None` without a pipeline)."""
        return (
            None if self.pipeline == 1 else _table(self.schedule, self.pipeline, self.microbatches)
        )

    def __str__(self) -> str:
        parts = [f"d{self.data}", f"t{self.tensor}", f"p{self.pipeline}", self.strategy]
        if self.sequence_parallel:
            parts.append("sp")
        if self.pipeline > 1:
            parts.append(f"{self.schedule} m{self.microbatches}")
        elif self.microbatches > 1:
            parts.append(f"accumulate {self.microbatches}")
        if self.remat != "none":
            parts.append(f"remat={self.remat}")
        return " ".join(parts)


@functools.cache
def _table(schedule: str, stages: int, microbatches: int) -> Any:
    from ..pipeline import GPipe, OneFOneB

    return (OneFOneB() if schedule == "1f1b" else GPipe()).table(stages, microbatches)


def _bytes(dtype: str) -> int:
    return jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Params:
    """Parameter elements on one device before ZeRO/FSDP: each group split over the
    tensor axis (`*_split`) or whole there (`*_whole`); `layers` are this pipeline
    stage's blocks, `outer` the embedding, head and final norm (held on every stage).
    `data_split` is the part a ZeRO/FSDP strategy splits over the data axis."""

    layers_split: float
    layers_whole: float
    outer_split: float
    outer_whole: float
    data_split: float = 0.0
    layers_data_split: float = 0.0

    @property
    def total(self) -> float:
        return self.layers_split + self.layers_whole + self.outer_split + self.outer_whole


def params(config: Any, layout: Layout) -> Params:
    """The `Params` of `config` (dense, no biases) on one device of `layout`."""
    c, t = config, layout.tensor
    d, hd = c.dim, c.head_dim
    up = (2 if c.activation == "swiglu" else 1) * c.hidden
    matmul = d * (c.num_heads + 2 * c.kv_heads) * hd + c.num_heads * hd * d + d * up + c.hidden * d
    norm = d * (2 if c.norm == "layernorm" and c.use_bias else 1)
    layers = c.num_layers / layout.pipeline
    table = c.vocab_size * d * (1 if c.tie_embeddings else 2)
    p = Params(layers * matmul / t, layers * 2 * norm, table / t, norm)
    if layout.strategy == "dp" or layout.data == 1:
        return p
    big = layout.min_shard_size  # the matmul weights and tables are always bigger
    in_layers = p.layers_split + (p.layers_whole if c.num_layers * norm >= big else 0.0)
    split = in_layers + p.outer_split + (p.outer_whole if norm >= big else 0.0)
    return dataclasses.replace(p, data_split=split, layers_data_split=in_layers)


def _activation(config: Any, layout: Layout, batch: int, seq: int) -> tuple[float, float]:
    """`(per_layer, head)`: activation elements one layer keeps for its backward per
    microbatch, and those of the final norm, head and loss.

    Korthikanti et al.'s terms without dropout masks, as JAX's autodiff stores them:
    each norm's input and normalised input (split over the tensor axis with SP), the two
    matmul inputs the norms feed (whole: with SP it is the all-gathered block that is
    stored), q, k, v, the projection's input, the MLP's hidden activations and the
    attention scores and probabilities (split over heads). `remat="selective"` keeps
    the layer's input and the matmul and collective outputs (q, k, v, the attention
    and MLP outputs, the MLP's up projection); `"full"` the layer's input only.
    """
    c, t = config, layout.tensor
    b = batch / layout.data / layout.microbatches
    sbh = b * seq * c.dim
    sp = t if layout.sequence_parallel else 1
    qkv = 1 + 2 * c.kv_heads / c.num_heads
    if layout.remat == "full":
        layer = sbh / sp
    elif layout.remat == "selective":
        up = (2 if c.activation == "swiglu" else 1) * c.hidden / c.dim
        layer = sbh * (3 / sp + (qkv + up) / t)
    else:
        mlp = (3 if c.activation == "swiglu" else 2) * c.hidden / c.dim
        scores = 2 * c.num_heads * seq * seq * b / t
        layer = sbh * (4 / sp + 2 + (1 + qkv + mlp) / t) + scores
    head = 2 * b * seq * c.vocab_size / t + sbh
    return layer, head


def in_flight(layout: Layout) -> int:
    """Microbatches whose activations the first pipeline stage holds at once."""
    return (
        1 if layout.pipeline == 1 else _slots(layout.schedule, layout.pipeline, layout.microbatches)
    )


@functools.cache
def _slots(schedule: str, stages: int, microbatches: int) -> int:
    return _table(schedule, stages, microbatches).num_slots


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device in one training step (Adam, no buffer donation).

    **Fields:** `params`, `grads`, `opt_state` (ZeRO's model states), `activations`
    (kept for the backward, all microbatches in flight, plus the backward's working set
    of one layer), `gathered` (FSDP's all-gathered weights of the layer in use, forward
    and backward), `batch` (the token arrays); `pipelined`: run by the pipeline
    executor.
    """

    params: float
    grads: float
    opt_state: float
    activations: float
    gathered: float
    batch: float
    pipelined: bool = False

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.opt_state

    @property
    def peak(self) -> float:
        """What a step with its state donated needs: parameters, optimizer state,
        batch and the temporaries."""
        return self.params + self.opt_state + self.batch + self.temporaries

    @property
    def arguments(self) -> float:
        return self.params + self.opt_state + self.batch

    @property
    def temporaries(self) -> float:
        """The compiled step's temporaries by liveness: without a pipeline the
        gradients are produced as the activations are freed, so the larger of the two
        is live at once; the pipeline executor carries its gradients through every
        tick, so both are."""
        if self.pipelined:
            return self.grads + self.activations + self.gathered
        return max(self.grads, self.activations) + self.gathered


def estimate_memory(
    config: Any, layout: Layout, *, batch: int, seq: int, opt_moments: int = 2
) -> MemoryEstimate:
    """The analytic per-device bytes of one training step of `Transformer(config)` run
    as `layout` (`layout.config(config)`) on a global `batch` of `seq` tokens.

    Model states follow ZeRO: parameters and gradients in `param_dtype`, `opt_moments`
    float32 moments per parameter (Adam: 2), each split over the data axis where the
    strategy splits it. Activations follow Korthikanti et al. per layer and microbatch
    in `compute_dtype`, times the layers on a stage and the microbatches in flight.
    """
    p = params(config, layout)
    n, kind = layout.data, layout.strategy
    pb, ab = _bytes(config.param_dtype), _bytes(config.compute_dtype)
    whole = p.total - p.data_split
    split_params = p.data_split / n if kind == "fsdp" else p.data_split
    split_grads = p.data_split / n if kind in ("zero2", "fsdp") else p.data_split
    split_opt = p.data_split / n if kind != "dp" else p.data_split
    layer, head = _activation(config, layout, batch, seq)
    layers = config.num_layers / layout.pipeline
    # The backward's working set: one layer's activations as if not checkpointed.
    working = _activation(config, dataclasses.replace(layout, remat="none"), batch, seq)[0]
    acts = (layers * layer + head) * in_flight(layout) + working
    gathered = 2 * p.layers_data_split / layers if kind == "fsdp" and n > 1 else 0.0
    return MemoryEstimate(
        params=(whole + split_params) * pb,
        grads=(whole + split_grads) * pb,
        opt_state=(whole + split_opt) * 4 * opt_moments,
        activations=acts * ab,
        gathered=gathered * pb,
        batch=2 * batch / n * seq * 4,
        pipelined=layout.pipeline > 1,
    )


Row = tuple[str, str]  # (collective kind, mesh axis)


def _tensor_comm(config: Any, layout: Layout, act: float, pb: int, bs: float) -> dict:
    """TP/SP: per layer 4 activation-sized all-reduces (or all-gathers and
    reduce-scatters), the embedding's and the head's, the loss's three `b*s` sums. With
    a pipeline, a device holds `1/p` of the layers, and the embedding (first stage),
    the head, the final norm and the loss (last stage) run on one stage of `p`: per
    device on average, `1/p` of them."""
    p = layout.pipeline
    layers = config.num_layers / p
    per_layer = 6 if layout.remat == "full" else 4  # full remat repeats the forward's two
    loss = 3 * bs * 4 / p
    ends = 2 / p  # the embedding's and the head's
    if not layout.sequence_parallel:
        return {("all-reduce", "tensor"): (per_layer * layers + ends) * act + loss}
    # SP: the norm weights' gradients, summed for each microbatch.
    norms = (2 * layers + 1 / p) * config.dim * pb * layout.microbatches
    return {
        ("all-gather", "tensor"): (per_layer * layers + ends) * act,
        ("reduce-scatter", "tensor"): (per_layer * layers + ends) * act / layout.tensor,
        ("all-reduce", "tensor"): norms + loss,
    }


def _data_comm(config: Any, layout: Layout, p: Params, pb: int) -> dict:
    """ZeRO/FSDP over the data axis, per-device result bytes of each collective."""
    kind, n = layout.strategy, layout.data
    whole, split = (p.total - p.data_split) * pb, p.data_split * pb
    if kind == "dp":
        return {("all-reduce", "data"): p.total * pb}
    if kind == "zero1":
        return {("all-reduce", "data"): p.total * pb, ("all-gather", "data"): split}
    # FSDP gathers the layers' weights forward and again backward (the scan frees them);
    # the embedding and head stay gathered between the two.
    if kind == "zero2":
        return {
            ("all-reduce", "data"): whole,
            ("reduce-scatter", "data"): split / n,
            ("all-gather", "data"): split,
        }
    # FSDP, for every microbatch: the layers gathered forward and backward, the
    # gradients reduce-scattered; the embedding and head are gathered once per step.
    m, layers = layout.microbatches, p.layers_data_split * pb
    return {
        ("all-reduce", "data"): whole,
        ("reduce-scatter", "data"): m * split / n,
        ("all-gather", "data"): split - layers + 2 * m * layers,
    }


def communication_theory(config: Any, layout: Layout, *, batch: int, seq: int) -> dict[Row, float]:
    """The minimum bytes per device of each `(kind, axis)` collective in one step, in
    `count_collectives`' measure (each op's per-device result bytes, summed over
    executions).

    - tensor: Megatron's 4 activation all-reduces per layer (or SP's 4 all-gathers of
      `b*s*h` and 4 reduce-scatters to `b*s*h/t`), the embedding's forward and the
      head's backward one, and the vocab-parallel loss's three `b*s` float32 sums;
    - data: DP all-reduces the gradients once; ZeRO-1 adds an all-gather of the updated
      parameters; ZeRO-2 reduce-scatters instead; FSDP all-gathers each layer forward
      and backward;
    - pipeline: one `b*s*h` send per microbatch each way per stage boundary (its
      whole batch shard's activations forward and gradients backward), averaged over
      the `p` stages (`p-1` boundaries), and the sum of the gradients of the parameters
      every stage holds.
    """
    p = params(config, layout)
    pb, ab = _bytes(config.param_dtype), _bytes(config.compute_dtype)
    bs = batch / layout.data * seq
    act = bs * config.dim * ab
    out: dict[Row, float] = {}
    if layout.tensor > 1:
        out |= _tensor_comm(config, layout, act, pb, bs)
    if layout.data > 1:
        out |= _data_comm(config, layout, p, pb)
    if layout.pipeline > 1:
        out[("collective-permute", "pipeline")] = 2 * act * (layout.pipeline - 1) / layout.pipeline
        outer = p.outer_split + p.outer_whole  # FSDP sums the data-split blocks only
        if layout.strategy == "fsdp" and layout.data > 1:
            outer -= (p.data_split - p.layers_data_split) * (1 - 1 / layout.data)
        out[("all-reduce", "pipeline")] = outer * pb
    return out


def ring_factor(kind: str, n: int) -> float:
    """Bytes a ring algorithm sends per device per byte of the op's per-device result,
    over `n` devices: all-reduce `2(n-1)/n`, all-gather `(n-1)/n`, reduce-scatter
    `n-1` (its input is `n` results), a permute 1."""
    if n <= 1:
        return 0.0
    return {
        "all-reduce": 2 * (n - 1) / n,
        "all-gather": (n - 1) / n,
        "reduce-scatter": n - 1,
        "all-to-all": (n - 1) / n,
    }.get(kind, 1.0)


def crosses_hosts(layout: Layout, axis: str, devices_per_host: int) -> bool:
    """Whether a group along `axis` spans hosts, with the mesh laid out
    `(pipeline, data, tensor)` outermost first over hosts of `devices_per_host`."""
    sizes = {"pipeline": layout.pipeline, "data": layout.data, "tensor": layout.tensor}
    inner = math.prod(sizes[a] for a in _ORDER[_ORDER.index(axis) + 1 :])
    return sizes[axis] > 1 and inner * sizes[axis] > devices_per_host


def train_flops(config: Any, *, batch: int, seq: int) -> float:
    """Matmul FLOPs of one training step (forward and backward, `3x` the forward) of a
    dense `Transformer(config)` on `batch` sequences of `seq` tokens, counted as
    `models.flops_per_token` does (head included, embedding lookup not)."""
    c = config
    up = (2 if c.activation == "swiglu" else 1) * c.hidden
    attn = c.dim * (c.num_heads + 2 * c.kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.dim
    matmul = c.num_layers * (attn + c.dim * up + c.hidden * c.dim) + c.vocab_size * c.dim
    forward = 2 * matmul + c.num_layers * 4 * seq * c.num_heads * c.head_dim
    return 3.0 * forward * batch * seq


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The machine the cost model times a step on.

    **Fields:** `flops` (FLOP/s one device sustains), `intra_bandwidth` and
    `inter_bandwidth` (bytes/s one device sends inside a host and across hosts),
    `devices_per_host`, `memory` (bytes per device).
    """

    flops: float = 989e12
    intra_bandwidth: float = 450e9
    inter_bandwidth: float = 50e9
    devices_per_host: int = 8
    memory: float = 80e9


def step_times(config: Any, layout: Layout, hw: Hardware, *, batch: int, seq: int) -> dict:
    """Seconds of one step by part: `compute` (FLOPs over the devices at `hw.flops`;
    full remat runs the forward twice), `bubble` (the pipeline's `(p-1)/m` of it),
    `tensor` and `pipeline` (their collectives' ring bytes at the axis's bandwidth, on
    the critical path), `data` (the data axis's, less what hides behind compute), and
    `total`."""
    flops = train_flops(config, batch=batch, seq=seq) / layout.devices
    compute = flops * (4 / 3 if layout.remat == "full" else 1.0) / hw.flops
    bubble = compute * (layout.pipeline - 1) / layout.microbatches
    sizes = {"data": layout.data, "tensor": layout.tensor, "pipeline": layout.pipeline}
    comm = {"tensor": 0.0, "pipeline": 0.0, "data": 0.0}
    for (kind, axis), nbytes in communication_theory(config, layout, batch=batch, seq=seq).items():
        far = crosses_hosts(layout, axis, hw.devices_per_host)
        bandwidth = hw.inter_bandwidth if far else hw.intra_bandwidth
        if kind == "collective-permute":  # a middle stage's, not the average over stages
            nbytes *= sizes[axis] / (sizes[axis] - 1)
        comm[axis] += nbytes * ring_factor(kind, sizes[axis]) / bandwidth
    data = max(0.0, comm["data"] - compute)
    total = compute + bubble + comm["tensor"] + comm["pipeline"] + data
    return dict(compute=compute, bubble=bubble, **{**comm, "data": data}, total=total)
