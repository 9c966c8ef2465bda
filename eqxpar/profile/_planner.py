"""`plan`: rank the layouts of a Transformer's training step by the analytic cost model."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from ._cost import Hardware, Layout, MemoryEstimate, estimate_memory, params, step_times

_GB = 1e9
_REMATS = ("none", "selective", "full")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout with its estimated memory and step time.

    **Fields:** `layout`, `memory` (a `MemoryEstimate`), `times` (seconds by part, as
    `step_times`), `reason` (why it does not fit, or `""`).
    """

    layout: Layout
    memory: MemoryEstimate
    times: dict
    reason: str

    @property
    def fits(self) -> bool:
        return not self.reason

    @property
    def time(self) -> float:
        return self.times["total"]


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _meshes(config: Any, devices: int, batch: int, seq: int, per_host: int):
    """`(data, tensor, pipeline)` sizes the model's dims divide (tensor inside a host)."""
    c = config
    for t in _divisors(devices):
        if t > per_host or c.num_heads % t or c.kv_heads % t or c.vocab_size % t:
            continue
        for p in _divisors(devices // t):
            d = devices // (t * p)
            if c.num_layers % p == 0 and batch % d == 0:
                yield d, t, p


def layouts(
    config: Any, *, devices: int, batch: int, seq: int, devices_per_host: int = 8, full=False
):
    """Every `Layout` of `devices` the planner considers (with `full`, also every
    microbatch count dividing the batch shard and the GPipe schedule: brute force)."""
    for d, t, p in _meshes(config, devices, batch, seq, devices_per_host):
        kinds = ("dp", "zero1", "zero2", "fsdp") if d > 1 else ("dp",)
        sps = (False, True) if t > 1 and seq % t == 0 else (False,)
        shard = batch // d
        if p == 1:  # gradient accumulation
            pipes = [(m, "1f1b") for m in _divisors(shard) if full or m & (m - 1) == 0]
        else:
            ms = _divisors(shard) if full else [m for m in _divisors(shard) if m % p == 0]
            pipes = list(itertools.product(ms, ("1f1b", "gpipe") if full else ("1f1b",)))
        for kind, sp, remat, (m, schedule) in itertools.product(kinds, sps, _REMATS, pipes):
            yield Layout(d, t, p, kind, sp, m, schedule, remat)  # type: ignore[arg-type]


def evaluate(config: Any, layout: Layout, hw: Hardware, *, batch: int, seq: int) -> Candidate:
    """Estimates one layout; `reason` says what does not fit in `hw.memory`."""
    memory = estimate_memory(config, layout, batch=batch, seq=seq)
    times = step_times(config, layout, hw, batch=batch, seq=seq)
    reason = ""
    count = params(config, layout).total
    if memory.model_states > hw.memory:
        reason = (
            f"model states alone need {memory.model_states / _GB:.1f} GB > "
            f"{hw.memory / _GB:.0f} GB: {memory.model_states / count:.1f} bytes per parameter "
            f"x {count / 1e9:.2f}e9 parameters on this device (split them: zero1/zero2/fsdp, "
            f"tensor or pipeline)"
        )
    elif memory.peak > hw.memory:
        per_param = memory.model_states / count
        reason = (
            f"needs {memory.peak / _GB:.1f} GB > {hw.memory / _GB:.0f} GB: model states "
            f"{memory.model_states / _GB:.1f} GB ({per_param:.1f} bytes per parameter on "
            f"this device), activations {memory.activations / _GB:.1f} GB"
        )
    return Candidate(layout, memory, times, reason)


def _row(rank: str, c: Candidate) -> str:
    ms = {k: 1e3 * v for k, v in c.times.items()}
    return (
        f"{rank:>3} {str(c.layout):<46}{ms['total']:>9.1f}{ms['compute']:>9.1f}"
        f"{ms['bubble']:>8.1f}{ms['tensor']:>8.1f}{ms['pipeline']:>7.1f}{ms['data']:>7.1f}"
        f"{c.memory.peak / _GB:>7.1f}"
    )


def _mesh(c: Candidate) -> tuple[int, int, int]:
    return c.layout.data, c.layout.tensor, c.layout.pipeline


def _per_mesh(candidates: Any) -> dict[tuple[int, int, int], Candidate]:
    """The first candidate of each mesh shape, in order."""
    out: dict[tuple[int, int, int], Candidate] = {}
    for c in candidates:
        out.setdefault(_mesh(c), c)
    return out


def _why(best: Candidate, others: list[Candidate]) -> list[str]:
    """One line per runner-up: the parts of the step time where the winner gains."""
    lines = []
    for other in others:
        gains = sorted(
            ((other.times[k] - best.times[k], k) for k in best.times if k != "total"),
            reverse=True,
        )
        parts = ", ".join(f"{k} {1e3 * g:+.1f} ms" for g, k in gains if g > 1e-6)
        if parts:
            why = f"by {100 * (other.time / best.time - 1):.1f}%: it spends more on {parts}"
        else:
            spare = (other.memory.peak - best.memory.peak) / _GB
            why = f"at the same time: it needs {spare:.1f} GB more per device"
        lines.append(f"  beats {other.layout} {why}")
    return lines


@dataclasses.dataclass(frozen=True)
class Plan:
    """The ranked layouts of `plan`.

    **Fields:** `ranked` (fitting `Candidate`s, fastest first), `rejected` (those that
    do not fit), `hardware`, `devices`.
    """

    ranked: tuple[Candidate, ...]
    rejected: tuple[Candidate, ...]
    hardware: Hardware
    devices: int

    @property
    def best(self) -> Candidate:
        if not self.ranked:
            first = self.rejected[0] if self.rejected else None
            raise ValueError(
                f"No layout of {self.devices} devices fits in "
                f"{self.hardware.memory / _GB:.0f} GB"
                + (f"; the smallest {first.layout} {first.reason}" if first else "")
                + ". Use more devices, a smaller batch, or remat."
            )
        return self.ranked[0]

    def rejection(self, layout: Layout) -> str:
        """Why `layout` was rejected (`""` if it fits)."""
        for c in self.rejected:
            if c.layout == layout:
                return c.reason
        return ""

    def table(self, top: int = 5) -> str:
        """The fastest layout of each of the `top` fastest meshes, with times (ms) and
        memory (GB); why the first won (against those and against its own mesh's
        other strategies); the fewest-GB rejected layout of each mesh."""
        hw = self.hardware
        lines = [
            f"{self.devices} devices ({hw.devices_per_host} per host), "
            f"{hw.memory / _GB:.0f} GB, {hw.flops / 1e12:.0f} TFLOP/s each: "
            f"{len(self.ranked)} layouts fit, {len(self.rejected)} do not",
            f"{'#':>3} {'layout':<46}{'step ms':>9}{'compute':>9}{'bubble':>8}{'tensor':>8}"
            f"{'pipe':>7}{'data':>7}{'GB':>7}",
        ]
        rows = list(_per_mesh(self.ranked).values())[:top]
        lines += [_row(str(i + 1), c) for i, c in enumerate(rows)]
        if rows:
            best = rows[0]
            same = [c for c in self.ranked[1:] if _mesh(c) == _mesh(best)]
            kinds: dict[str, Candidate] = {}
            for c in same:
                kinds.setdefault(c.layout.strategy, c)
            lines.append(f"why {best.layout}:")
            lines += _why(best, rows[1:] + list(kinds.values())[:3])
        shown = _per_mesh(sorted(self.rejected, key=lambda c: c.memory.peak))
        if shown:
            lines.append("rejected (the smallest of each mesh):")
            lines += [f"  {c.layout}: {c.reason}" for c in list(shown.values())[:top]]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def plan(
    config: Any,
    *,
    devices: int,
    memory_per_device: float | str,
    batch: int,
    seq: int,
    devices_per_host: int = 8,
    flops: float = 989e12,
    intra_bandwidth: float = 450e9,
    inter_bandwidth: float = 50e9,
) -> Plan:
    """Ranks the layouts of a `Transformer(config)` training step (Adam) on `devices`.

    Candidates: every `(data, tensor, pipeline)` mesh the model's sizes divide (tensor
    inside a host), each data-parallel strategy, sequence parallelism, remat, gradient
    accumulation over power-of-two microbatch counts, and for pipelines 1F1B with
    microbatch counts that are multiples of the stages. Each is
    timed by `step_times` and its memory estimated by `estimate_memory` (state
    donated); layouts over `memory_per_device` are rejected with the reason.

    **Arguments:**

    - `config`: a `models.TransformerConfig` (dense).
    - `devices`: how many devices; `devices_per_host` of them per host.
    - `memory_per_device`: bytes, or a string such as `"80GB"`.
    - `batch`, `seq`: global batch (sequences) and sequence length.
    - `flops`: FLOP/s per device; `intra_bandwidth`, `inter_bandwidth`: bytes/s per
      device inside a host and across hosts.

    **Returns:** a `Plan`; `print` it for the ranked table with the reasons.
    """
    hw = Hardware(
        flops, intra_bandwidth, inter_bandwidth, devices_per_host, parse_bytes(memory_per_device)
    )
    found = [
        evaluate(config, lay, hw, batch=batch, seq=seq)
        for lay in layouts(
            config, devices=devices, batch=batch, seq=seq, devices_per_host=devices_per_host
        )
    ]
    if not found:
        raise ValueError(
            f"No mesh of {devices} devices suits this config: tensor must divide "
            f"num_heads={config.num_heads} and vocab_size={config.vocab_size} (and fit in a "
            f"host of {devices_per_host}), pipeline must divide num_layers="
            f"{config.num_layers}, data must divide batch={batch}."
        )
    # Equal times (hidden data-axis traffic): the layout with more memory to spare first.
    ranked = sorted((c for c in found if c.fits), key=lambda c: (c.time, c.memory.peak))
    rejected = sorted((c for c in found if not c.fits), key=lambda c: c.memory.peak)
    return Plan(tuple(ranked), tuple(rejected), hw, devices)


def parse_bytes(value: float | str) -> float:
    """`80e9`, `"80GB"`, `"80 GiB"`, `"512MB"` -> bytes."""
    if not isinstance(value, str):
        return float(value)
    text = value.strip().upper().replace(" ", "")
    for suffix, scale in (("GIB", 2**30), ("MIB", 2**20), ("GB", 1e9), ("MB", 1e6), ("B", 1)):
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * scale
            except ValueError:
                break
    raise ValueError(f"memory_per_device={value!r}: use bytes or a size such as '80GB'.")
