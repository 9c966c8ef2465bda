"""A compiled step's communication and memory, each beside the analytic model's."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from ..pipeline._executor import SCOPE
from ._cost import Layout, MemoryEstimate, _table, communication_theory, estimate_memory
from ._hlo import _mesh_layout, count_collectives


def layout_of(
    mesh: Any,
    config: Any,
    *,
    strategy: Any = "dp",
    microbatches: int = 1,
    schedule: str = "1f1b",
) -> Layout:
    """The `Layout` a step of `Transformer(config)` on `mesh` runs as.

    **Arguments:**

    - `mesh`: an eqxpar mesh (`data`, `tensor`, `pipeline` axes are read).
    - `config`: the model's `TransformerConfig` (its `sequence_parallel`, `remat` and
      `pipeline_stages` are used; `pipeline_stages` must equal the pipeline axis).
    - `strategy`: `"dp"`, `"zero1"`, `"zero2"`, `"fsdp"` or an `eqxpar.train.Strategy`.
    - `microbatches`, `schedule`: the pipeline's (`"1f1b"` or `"gpipe"`); without a
      pipeline, `microbatches` is the step's `accumulation_steps`.

    **Returns:** a `Layout`.
    """
    sizes = dict(mesh.shape)
    pipeline = sizes.get("pipeline", 1)
    if config.pipeline_stages != pipeline or config.virtual_stages != 1:
        raise ValueError(
            f"config.pipeline_stages={config.pipeline_stages} (virtual_stages="
            f"{config.virtual_stages}) but the mesh's pipeline axis is {pipeline}: the "
            f"cost model covers one chunk per stage; build the model with "
            f"pipeline_stages={pipeline}, virtual_stages=1."
        )
    kind = getattr(strategy, "kind", strategy)
    return Layout(
        data=sizes.get("data", 1),
        tensor=sizes.get("tensor", 1),
        pipeline=pipeline,
        strategy=kind,
        sequence_parallel=config.sequence_parallel,
        microbatches=microbatches,
        schedule=schedule,  # type: ignore[arg-type]
        remat=config.remat,
        min_shard_size=getattr(strategy, "min_shard_size", 1024),
    )


@dataclasses.dataclass(frozen=True)
class CommRow:
    """One `(kind, axes)` line: measured executions and bytes, and the theory's bytes
    (`None` where the model expects nothing, e.g. a scalar over two axes)."""

    kind: str
    axes: tuple[str, ...]
    count: int
    measured: int
    theory: float | None

    @property
    def ratio(self) -> float | None:
        return None if not self.theory else self.measured / self.theory


@dataclasses.dataclass(frozen=True)
class CommunicationReport:
    """A compiled step's collectives beside the analytic minimum (`communication_theory`),
    per collective kind and mesh axis. Bytes are `count_collectives`' measure: each
    op's per-device result bytes, summed over its executions (loops by trip count), a
    `collective-permute`'s averaged over the devices (one outside its pairs receives
    nothing). The pipeline executor's permutes sit in per-tick `lax.switch` branches,
    one per set of stage pairs that carry data (`TickTable.send_pairs`); each is
    counted on the ticks of the schedule's table that select it.

    **Fields:** `layout`, `rows` (`CommRow`s, sorted by axis then kind).
    """

    layout: Layout
    rows: tuple[CommRow, ...]

    def axis_ratio(self, axis: str) -> float:
        """Measured over theoretical bytes of every collective over `axis` alone."""
        rows = [r for r in self.rows if r.axes == (axis,)]
        theory = sum(r.theory or 0.0 for r in rows)
        if not theory:
            raise ValueError(
                f"The theory expects no communication over {axis!r} for {self.layout}; "
                f"axes with some: {sorted({r.axes for r in self.rows if r.theory})}."
            )
        return sum(r.measured for r in rows) / theory

    def ratio(self, kind: str, axis: str) -> float | None:
        """Measured over theoretical bytes of `kind` over `axis` (`None`: no theory)."""
        for r in self.rows:
            if r.kind == kind and r.axes == (axis,):
                return r.ratio
        return None

    def table(self) -> str:
        """A plain-text table: one line per `(kind, axes)`, bytes in KiB."""
        lines = [
            f"communication per step and device, {self.layout}",
            f"{'axis':<10}{'kind':<20}{'count':>6}{'KiB':>10}{'theory':>10}{'ratio':>7}",
        ]
        for r in self.rows:
            theory = "-" if r.theory is None else f"{r.theory / 1024:.1f}"
            ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
            axes = ",".join(r.axes)
            lines.append(
                f"{axes:<10}{r.kind:<20}{r.count:>6}{r.measured / 1024:>10.1f}{theory:>10}"
                f"{ratio:>7}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def communication_report(
    compiled: Any, mesh: Any, config: Any, *, batch: int, seq: int, **layout: Any
) -> CommunicationReport:
    """Counts a compiled step's collectives and sets each beside the theory.

    **Arguments:**

    - `compiled`: the compiled step (`step.lower(state, x, y).compile()`) or HLO text.
    - `mesh`: its mesh.
    - `config`: the model's `TransformerConfig`.
    - `batch`, `seq`: the global batch size and the sequence length of `x`.
    - `**layout`: `strategy`, `microbatches`, `schedule`, as for `layout_of`.

    **Returns:** a `CommunicationReport`; `print` it for the table.
    """
    lay = layout_of(mesh, config, **layout)
    theory = communication_theory(config, lay, batch=batch, seq=seq)
    records = count_collectives(compiled, mesh).records
    if lay.pipeline > 1:
        records = _in_ticks(records, lay)
    measured = _measure([r for r in records if r.axes != ("pipeline",)], mesh)
    if lay.pipeline > 1:
        pipe = [r for r in records if r.axes == ("pipeline",)]
        measured |= _measure([r for r in pipe if r.kind != "collective-permute"], mesh)
        sends = [r for r in pipe if r.kind == "collective-permute"]
        if sends:
            measured[("collective-permute", ("pipeline",))] = _pipeline_sends(sends, mesh, lay)
    keys = set(measured) | {(kind, (axis,)) for kind, axis in theory}
    rows = []
    for kind, axes in keys:
        count, nbytes = measured.get((kind, axes), (0, 0))
        expected = theory.get((kind, axes[0])) if len(axes) == 1 else None
        rows.append(CommRow(kind, axes, count, nbytes, expected))
    rows.sort(key=lambda r: (r.axes, r.kind))
    return CommunicationReport(lay, tuple(rows))


_ACTION = re.compile(re.escape(SCOPE) + r"(F|B|W|first|last)\b")


def _in_ticks(records: tuple, layout: Layout) -> list:
    """The records with the pipeline executor's actions counted as they run. A
    collective inside an action (the name scope `SCOPE + action`, the innermost one)
    sits in a conditional that the counter counts on every tick; it runs once per
    action instead: each device runs `m·v` forwards, `B`s and `W`s, and the first (last)
    chunk's extra work `m` times on one stage of `p`, its bytes averaged over the
    devices as a permute's are."""
    table = _table(layout.schedule, layout.pipeline, layout.microbatches).split()
    ticks, m, p = table.num_ticks, table.microbatches, table.stages
    out = []
    for r in records:
        actions = _ACTION.findall(r.op_name)
        if not actions or r.kind == "collective-permute":
            out.append(r)
            continue
        if r.count % ticks:
            raise ValueError(
                f"{r.name} runs {r.count} times, not a multiple of the {ticks} ticks of "
                f"{layout.schedule} with {m} microbatches on {p} stages; pass the step's "
                "`schedule` and `microbatches` to communication_report."
            )
        per_tick = r.count // ticks
        if actions[-1] in ("first", "last"):
            out.append(dataclasses.replace(r, count=per_tick * m, nbytes=r.nbytes // p))
        else:
            out.append(dataclasses.replace(r, count=per_tick * m * table.virtual))
    return out


def _measure(records: list, mesh: Any) -> dict[tuple[str, tuple[str, ...]], tuple[int, int]]:
    """`(count, bytes)` per `(kind, axes)`: executions and per-device bytes summed, a
    permute's bytes averaged over the devices (those outside its pairs receive none)."""
    out: dict[tuple[str, tuple[str, ...]], tuple[int, int]] = {}
    for r in records:
        count, nbytes = out.get((r.kind, r.axes), (0, 0))
        out[(r.kind, r.axes)] = (count + r.count, nbytes + r.count * _received(r, mesh))
    return out


def _received(record: Any, mesh: Any) -> int:
    """Bytes one execution of `record` delivers per device, averaged over the mesh."""
    if record.kind != "collective-permute":
        return record.nbytes
    return record.nbytes * len(record.pairs) // int(np.prod(_mesh_layout(mesh)[1]))


def _pipeline_sends(records: list, mesh: Any, layout: Layout) -> tuple[int, int]:
    """`(count, bytes)` of the pipeline executor's permutes. Each sits in a branch of a
    per-tick `lax.switch` over the schedule's stage-pair sets (`TickTable.send_pairs`),
    which the counter cannot evaluate; each runs on the ticks of the split table that
    select its set, so that table gives its executions."""
    table = _table(layout.schedule, layout.pipeline, layout.microbatches).split()
    arrays, ticks = table.as_arrays(), {}
    for d in "FB":
        for index, pairs in enumerate(table.send_pairs(d)):
            n = int((arrays[f"permute_{d.lower()}"] == index).sum())
            ticks[pairs] = ticks.get(pairs, 0) + n
    stage = _coordinate(mesh, "pipeline")
    by_set: dict[tuple, set[int]] = {}
    for r in records:
        pairs = tuple(sorted({(stage[a], stage[b]) for a, b in r.pairs}))
        by_set.setdefault(pairs, set()).add(_received(r, mesh))
    loops = {r.count for r in records}
    if set(by_set) != {x for x, n in ticks.items() if n and x} or loops != {table.num_ticks}:
        raise ValueError(
            f"The step's pipeline permutes (over stage pairs {sorted(by_set)}, in a loop "
            f"of {sorted(loops)} ticks) are not those of {layout.schedule} with "
            f"{layout.microbatches} microbatches on {layout.pipeline} stages "
            f"({table.num_ticks} ticks); pass the step's `schedule` and `microbatches` "
            "to communication_report."
        )
    count = nbytes = 0
    for pairs, sizes in by_set.items():
        if len(sizes) > 1:
            raise ValueError(f"The pipeline permutes over stages {pairs} differ in size.")
        count, nbytes = count + ticks[pairs], nbytes + ticks[pairs] * sizes.pop()
    return count, nbytes


def _coordinate(mesh: Any, axis: str) -> list[int]:
    """Each partition id's index along `axis` of `mesh` (ids in row-major mesh order)."""
    names, shape = _mesh_layout(mesh)
    ids = np.arange(int(np.prod(shape)))
    return np.unravel_index(ids, shape)[names.index(axis)].tolist()


@dataclasses.dataclass(frozen=True)
class StepMemoryReport:
    """A compiled step's `memory_analysis()` beside `estimate_memory`, per device.

    **Fields:** `layout`, `estimate` (a `MemoryEstimate`), and the compiled step's
    `arguments`, `outputs`, `temporaries` bytes (the step does not donate its state,
    so its outputs are a second copy of the parameters and optimizer state).
    """

    layout: Layout
    estimate: MemoryEstimate
    arguments: int
    outputs: int
    temporaries: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries

    @property
    def estimate_total(self) -> float:
        e = self.estimate
        return e.arguments + (e.params + e.opt_state) + e.temporaries

    @property
    def ratio(self) -> float:
        """Compiled total over the estimate's."""
        return self.total / self.estimate_total

    def table(self) -> str:
        """A plain-text table in KiB: the estimate's parts, then compiled vs estimate."""
        e, k = self.estimate, 1024.0
        lines = [f"memory per device, {self.layout}: KiB"]
        parts = (
            ("parameters", e.params),
            ("gradients", e.grads),
            ("optimizer state", e.opt_state),
            ("activations", e.activations),
            ("gathered weights", e.gathered),
        )
        lines += [f"  {name:<18}{value / k:>10.1f}" for name, value in parts]
        lines.append(f"{'':20}{'compiled':>10}{'estimate':>10}{'ratio':>7}")
        for name, got, want in (
            ("arguments", self.arguments, e.arguments),
            ("outputs", self.outputs, e.params + e.opt_state),
            ("temporaries", self.temporaries, e.temporaries),
            ("total", self.total, self.estimate_total),
        ):
            lines.append(f"  {name:<18}{got / k:>10.1f}{want / k:>10.1f}{got / want:>7.2f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def step_memory_report(
    compiled: Any, mesh: Any, config: Any, *, batch: int, seq: int, **layout: Any
) -> StepMemoryReport:
    """Sets a compiled step's `memory_analysis()` beside `estimate_memory` (Adam).

    **Arguments:** as for `communication_report`.

    **Returns:** a `StepMemoryReport`; `print` it for the table.
    """
    lay = layout_of(mesh, config, **layout)
    stats = getattr(compiled, "compiled", compiled).memory_analysis()
    return StepMemoryReport(
        lay,
        estimate_memory(config, lay, batch=batch, seq=seq),
        int(stats.argument_size_in_bytes),
        int(stats.output_size_in_bytes),
        int(stats.temp_size_in_bytes),
    )
