"""Pipeline schedules as data: per-device programs simulated into tick tables.

A schedule says, for every device (pipeline stage) and every tick of the step, which
forward or backward it runs, or that it idles. Here each schedule writes Megatron's
per-device *program* (the ordered list of actions each rank issues) and one simulator
turns the programs into a `TickTable`: at every tick each device runs the next action
of its program if that action's inputs have arrived, and idles otherwise. Tables are
therefore valid by construction; `TickTable.validate` checks them again, and checks
any hand-written table.

Model chunks follow Megatron's interleaved layout: with `p` stages and `v` virtual
stages per device the model is cut into `p·v` chunks in order, and device `d` holds
chunks `d, d + p, d + 2p, ...`. Virtual index `c` on stage `s` is global chunk
`g = c·p + s`.

Time is counted in unit slots: one action of one chunk for one microbatch takes one
tick, and its output reaches the neighbouring device at the next tick. The executor
runs `TickTable.split()`: the same programs with every backward split into `B` (the
input gradient, sent on at once) and `W` (the weight gradient), so that every action
costs about one chunk forward (a matmul's three products each cost the same) and a
tick-synchronous SPMD step costs what the MPMD schedule costs.
`TickTable.step_time` models a table run tick by tick, each tick as long as its slowest
device; `TickTable.ideal_time` the same programs run MPMD, each device going as soon as
its inputs arrive.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal, final

import numpy as np

__all__ = [
    "AbstractSchedule",
    "Action",
    "GPipe",
    "Interleaved1F1B",
    "OneFOneB",
    "TickTable",
    "ZeroBubbleH1",
]

Kind = Literal["F", "B", "W"]
KINDS: tuple[str, ...] = ("F", "B", "W")  # also the order of the actions within a tick
_Key = tuple[str, int, int]  # (kind, microbatch, global chunk)


@final
@dataclasses.dataclass(frozen=True)
class Action:
    """One forward, backward or weight-gradient action of one microbatch on one chunk.

    The device that runs it is the table column it sits in; idle slots are `None`.

    **Arguments:**

    - `kind`: `"F"` for a forward; `"B"` for a backward, which computes the input
      gradient and, unless the table also holds `"W"` actions, the weight gradient
      too; `"W"` for the weight gradient alone (zero-bubble schedules split the
      backward into `B` and `W`).
    - `microbatch`: the microbatch index, `0 <= microbatch < m`.
    - `virtual`: the virtual-stage (model-chunk) index on this device,
      `0 <= virtual < v`; always `0` without interleaving.
    """

    kind: Kind
    microbatch: int
    virtual: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Action(kind={self.kind!r}): kind must be 'F', 'B' or 'W'.")
        for name in ("microbatch", "virtual"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Action({name}={value!r}): must be a non-negative int.")
            object.__setattr__(self, name, int(value))

    def __str__(self) -> str:
        chunk = f".{self.virtual}" if self.virtual else ""
        return f"{self.kind}{self.microbatch}{chunk}"


def _describe(action: Action, stage: int, p: int) -> str:
    g = action.virtual * p + stage
    return f"{action.kind}(microbatch={action.microbatch}, virtual={action.virtual}; chunk {g})"


def _where(g: int, p: int) -> str:
    return f"stage {g % p} (virtual {g // p}, chunk {g})"


def _dependencies(kind: str, mb: int, g: int, n_chunks: int) -> list[_Key]:
    """What must have run at an earlier tick before `kind` of (`mb`, chunk `g`)."""
    if kind == "F":
        return [("F", mb, g - 1)] if g > 0 else []
    if kind == "W":
        return [("B", mb, g)]
    deps: list[_Key] = [("F", mb, g)]
    if g < n_chunks - 1:
        deps.append(("B", mb, g + 1))
    return deps


@final
@dataclasses.dataclass(frozen=True)
class TickTable:
    """A pipeline schedule as a table of actions, indexed `grid[tick][stage]`.

    **Arguments:**

    - `stages`: the number of pipeline stages (devices) `p`.
    - `microbatches`: the number of microbatches `m` per step.
    - `virtual`: the number of virtual stages (model chunks) per device `v`.
    - `grid`: one row per tick, each row one entry per stage: an `Action` or `None`
      (idle). Lists are accepted and stored as tuples.

    The constructor checks only the shape and the index ranges; call `validate()` to
    check the dependencies.
    """

    stages: int
    microbatches: int
    virtual: int
    grid: tuple[tuple[Action | None, ...], ...]

    def __post_init__(self):
        for name in ("stages", "microbatches", "virtual"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TickTable({name}={value!r}): must be a positive int.")
        grid = tuple(tuple(row) for row in self.grid)
        object.__setattr__(self, "grid", grid)
        p, m, v = self.stages, self.microbatches, self.virtual
        for t, row in enumerate(grid):
            if len(row) != p:
                raise ValueError(
                    f"TickTable: tick {t} has {len(row)} entries but stages={p}; every "
                    f"row of `grid` needs one entry (an Action or None) per stage."
                )
            for s, a in enumerate(row):
                if a is None:
                    continue
                if not isinstance(a, Action):
                    raise ValueError(
                        f"TickTable: tick {t}, stage {s} holds {a!r}; entries must be "
                        f"Action or None."
                    )
                if a.microbatch >= m or a.virtual >= v:
                    raise ValueError(
                        f"TickTable: tick {t}, stage {s} holds {_describe(a, s, p)}, out of "
                        f"range for microbatches={m}, virtual={v}."
                    )

    @property
    def num_ticks(self) -> int:
        """The number of ticks (rows of `grid`)."""
        return len(self.grid)

    @property
    def split_backward(self) -> bool:
        """Whether the backward is split into `B` (input gradient) and `W` (weight
        gradient) actions."""
        return any(a is not None and a.kind == "W" for row in self.grid for a in row)

    @property
    def num_slots(self) -> int:
        """Activation-buffer slots per device the executor allocates when it runs this
        table: the most (microbatch, chunk) pairs one device holds at once, from the
        tick an input arrives (or, on chunk 0, its forward) to its last backward action
        (`W` when the backward is split, else `B`). At least `max_in_flight()`; more by
        the inputs that arrive before their forward can run."""
        return int(self.as_arrays()["slot"].max(initial=-1)) + 1 if self.grid else 0

    def program(self, stage: int) -> list[Action]:
        """The actions of one stage in the order it runs them (idle ticks dropped).

        **Arguments:**

        - `stage`: the stage index, `0 <= stage < stages`.

        **Returns:**

        A list of `Action`.
        """
        self._check_stage(stage)
        return [row[stage] for row in self.grid if row[stage] is not None]  # pyright: ignore

    def split(self) -> TickTable:
        """The same schedule with every backward split into `B` then `W`: what the
        executor runs.

        Each `B(mb, v)` of a device's program becomes `B(mb, v), W(mb, v)` (a table whose
        backward is split already keeps its programs), and the programs are simulated
        into unit ticks again. `B` computes the input gradient and sends it on at once;
        `W` the weight gradient, from the layer gradients `B` stored. Every action then
        costs about one chunk forward (a matmul's forward, input-gradient and
        weight-gradient products cost the same), so a tick-synchronous step costs the
        MPMD schedule's time. The activations of a (microbatch, chunk) are freed by its
        `W`, one tick after the `B`: 1F1B still holds at most `p` on stage 0.

        **Returns:**

        A validated `TickTable` with `split_backward` true.
        """
        if self.split_backward:
            return self.validate()
        programs = []
        for s in range(self.stages):
            program: list[Action] = []
            for a in self.program(s):
                program.append(a)
                if a.kind == "B":
                    program.append(Action("W", a.microbatch, a.virtual))
            programs.append(program)
        return _simulate(programs, self.stages, self.microbatches, self.virtual)

    def bubble_fraction(self) -> float:
        r"""The idle fraction of the step, counted on the grid.

        Every action takes one unit slot (forward and backward of a chunk cost the
        same), so this is $\text{idle slots} / (\text{ticks} \cdot \text{stages})$.
        For GPipe and 1F1B it equals $(p-1)/(m+p-1)$, split or not.

        **Returns:**

        A float in `[0, 1)`.
        """
        total = self.num_ticks * self.stages
        idle = sum(a is None for row in self.grid for a in row)
        return idle / total if total else 0.0

    def max_in_flight(self, stage: int | None = None) -> int:
        """The most (microbatch, chunk) pairs forwarded but not yet released at once
        (by the backward, or by `W` when the backward is split).

        This is the number of activation slots the executor keeps on that stage (each
        chunk of each microbatch counted separately). 1F1B needs `min(p, m)` on stage
        0, GPipe `m`.

        **Arguments:**

        - `stage`: one stage, or `None` for the maximum over stages.

        **Returns:**

        An int.
        """
        if stage is None:
            return max(self.max_in_flight(s) for s in range(self.stages))
        self._check_stage(stage)
        release = "W" if self.split_backward else "B"
        alive, most = 0, 0
        for a in self.program(stage):
            alive += 1 if a.kind == "F" else -1 if a.kind == release else 0
            most = max(most, alive)
        return most

    def validate(self) -> TickTable:
        """Checks every dependency of every action; raises `ValueError` on the first breach.

        With global chunk `g = virtual·p + stage`:

        - `F(mb, g)` needs `F(mb, g-1)` at an earlier tick (its output reaches the next
          device one tick later);
        - `B(mb, g)` needs its own `F(mb, g)` at an earlier tick, and `B(mb, g+1)` at
          an earlier tick unless `g` is the last chunk `p·v - 1`;
        - `W(mb, g)` needs `B(mb, g)` at an earlier tick;
        - every (microbatch, chunk) has exactly one `F` and one `B`, and either every
          one has one `W` or none has.

        **Returns:**

        The table itself, so that `table = schedule.table(p, m).validate()` reads well.
        """
        p, m, v = self.stages, self.microbatches, self.virtual
        n_chunks = p * v
        when = self._when()
        for t, row in enumerate(self.grid):
            for s, a in enumerate(row):
                if a is None:
                    continue
                g = a.virtual * p + s
                for dep in _dependencies(a.kind, a.microbatch, g, n_chunks):
                    kind, mb, dg = dep
                    need = f"{kind}(microbatch={mb}) of chunk {dg} on {_where(dg, p)}"
                    if dep not in when:
                        raise ValueError(
                            f"Invalid schedule: tick {t}, stage {s}: {_describe(a, s, p)} "
                            f"needs {need} at an earlier tick, but that never runs."
                        )
                    t_dep, _ = when[dep]
                    if t_dep >= t:
                        raise ValueError(
                            f"Invalid schedule: tick {t}, stage {s}: {_describe(a, s, p)} "
                            f"needs {need} at an earlier tick, but that runs at tick "
                            f"{t_dep}. Move it to tick {t_dep + 1} or later."
                        )
        for kind in ("F", "B", "W") if self.split_backward else ("F", "B"):
            for mb in range(m):
                for g in range(n_chunks):
                    if (kind, mb, g) not in when:
                        raise ValueError(
                            f"Invalid schedule: {kind}(microbatch={mb}) of chunk {g} never "
                            f"runs on {_where(g, p)}. Each (microbatch, chunk) has "
                            f"exactly one F and one B"
                            + (" (and one W when the backward is split)." if kind == "W" else ".")
                        )
        return self

    def _when(self) -> dict[_Key, tuple[int, int]]:
        """`(kind, microbatch, chunk) -> (tick, stage)`; raises on an action that runs
        twice."""
        p = self.stages
        when: dict[_Key, tuple[int, int]] = {}
        for t, row in enumerate(self.grid):
            for s, a in enumerate(row):
                if a is None:
                    continue
                key = (a.kind, a.microbatch, a.virtual * p + s)
                if key in when:
                    raise ValueError(
                        f"Invalid schedule: tick {t}, stage {s}: {_describe(a, s, p)} runs "
                        f"a second time (it already ran at tick {when[key][0]}). Each "
                        f"(microbatch, chunk) has exactly one F and one B."
                    )
                when[key] = (t, s)
        return when

    def step_time(
        self,
        t_f: float = 1.0,
        t_b: float = 1.0,
        t_w: float = 1.0,
        *,
        latency: float = 0.0,
        recompute: bool = False,
    ) -> float:
        r"""The modeled step time of this table run tick by tick, every tick as long as
        its slowest device (the SPMD executor inside `shard_map`).

        Tick `t` costs $\max_s \text{cost}(\text{grid}[t][s])$, plus `latency` when some
        device sends in it. Per chunk and microbatch, `F` costs `t_f`; `B` costs `t_b`,
        plus `t_w` when the table has no `W` actions (its backward then computes the
        weight gradient too); `W` costs `t_w`. With `recompute`, every backward action
        first recomputes its chunk's forward (`+ t_f`), as eqxpar's executor before
        version 2 did.

        With `t_b + t_w = 2 t_f` (Megatron's usual assumption): a schedule's table pays
        `2(m+p-1)·max(t_f, t_b + t_w)`, `table.split()` pays `(m+p-1)(t_f+t_b+t_w)` when
        `t_b = t_w = t_f`, the MPMD ideal (`ideal_time`).

        **Arguments:**

        - `t_f`, `t_b`, `t_w`: forward, input-gradient and weight-gradient times of
          one chunk for one microbatch.
        - `latency`: the time of one point-to-point send between neighbouring stages.
        - `recompute`: backward actions recompute their forward.

        **Returns:**

        A float, in the unit of the times.
        """
        cost = _costs(t_f, t_b, t_w, self.split_backward, recompute)
        p, n_chunks = self.stages, self.stages * self.virtual
        total = 0.0
        for row in self.grid:
            total += max(0.0 if a is None else cost[a.kind] for a in row)
            if any(
                a is not None and _target(a, s, p, n_chunks) is not None for s, a in enumerate(row)
            ):
                total += latency
        return total

    def ideal_time(
        self,
        t_f: float = 1.0,
        t_b: float = 1.0,
        t_w: float = 1.0,
        *,
        latency: float = 0.0,
        recompute: bool = False,
    ) -> float:
        """The step time of the same per-device programs run MPMD: each device starts
        its next action as soon as it is free and that action's inputs have arrived
        (`latency` after the neighbour finished). Arguments as for `step_time`.

        For 1F1B (split or not) this is `(m + p - 1)(t_f + t_b + t_w)` without latency.

        **Returns:**

        A float, in the unit of the times.
        """
        cost = _costs(t_f, t_b, t_w, self.split_backward, recompute)
        p, n_chunks = self.stages, self.stages * self.virtual
        programs = [self.program(s) for s in range(p)]
        pos, free = [0] * p, [0.0] * p
        finish: dict[_Key, float] = {}
        while any(pos[s] < len(programs[s]) for s in range(p)):
            progressed = False
            for s in range(p):
                while pos[s] < len(programs[s]):
                    a = programs[s][pos[s]]
                    g = a.virtual * p + s
                    deps = _dependencies(a.kind, a.microbatch, g, n_chunks)
                    if any(d not in finish for d in deps):
                        break
                    ready = [finish[d] + (latency if d[2] % p != s else 0.0) for d in deps]
                    free[s] = max([free[s], *ready]) + cost[a.kind]
                    finish[(a.kind, a.microbatch, g)] = free[s]
                    pos[s] += 1
                    progressed = True
            if not progressed:  # pragma: no cover - validate() rules this out
                raise RuntimeError("ideal_time: the programs deadlock.")
        return max(free)

    def as_arrays(self) -> dict[str, np.ndarray]:
        """The program an executor runs: the table as arrays.

        This is the one conversion from a table to what `pipeline_loss` executes (it
        runs `table.split().as_arrays()`), and `num_slots` is read from it. Every
        (microbatch, chunk) on a device owns one buffer slot from the tick its input
        arrives (the previous chunk's forward ran the tick before; chunk 0: its own
        forward) to the tick of its last backward action (`W` when the backward is
        split, else `B`), which frees it for later ticks; slots are taken
        lowest-free-first in order of arrival. Its stored activations, its output
        gradient and its layers' output gradients live in that slot.

        **Returns:**

        A dict of numpy arrays. Of shape `(num_ticks, stages)`:

        - `"kind"` (int32): 0 idle, 1 forward, 2 backward (`B`), 3 weight gradient (`W`);
        - `"mb"` (int32): the microbatch;
        - `"virt"` (int32): the virtual-stage (chunk) index on that device;
        - `"slot"` (int32): the buffer slot of that (microbatch, chunk) on that device,
          in `[0, num_slots)`;
        - `"first_chunk"` (bool): the action is on global chunk 0 (its forward reads
          the microbatch input; its backward also differentiates the input layers);
        - `"last_chunk"` (bool): the action is on global chunk `p·v - 1` (its forward
          feeds the loss and, when differentiating, starts the backward);
        - `"recv_f"` (int32): the slot that stores the activation arriving at this tick
          (sent by the previous chunk's forward one tick earlier), or -1;
        - `"recv_b"` (int32): the slot that stores the output gradient arriving at this
          tick (sent by the next chunk's `B` one tick earlier), or -1.

        Of shape `(num_ticks,)`, `"permute_f"` and `"permute_b"` (int32): which of
        `send_pairs("F")` (`send_pairs("B")`) carries the activations (gradients)
        arriving at this tick; 0, the empty set, on ticks where nothing arrives.

        Idle entries hold 0 in the int arrays (-1 in `recv_*`) and `False` in the bool
        ones; mask with `kind`. Raises `ValueError` (from `validate()`) for an invalid
        table.
        """
        return {k: a.copy() for k, a in self._program.items()}

    @functools.cached_property
    def _compiled(self) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
        self.validate()
        p, v, ticks = self.stages, self.virtual, self.num_ticks
        n_chunks = p * v
        when = self._when()
        slot_of = _assign_slots(when, p, "W" if self.split_backward else "B")
        out: dict[str, np.ndarray] = {
            k: np.zeros((ticks, p), np.int32) for k in ("kind", "mb", "virt", "slot")
        }
        out |= {k: np.zeros((ticks, p), bool) for k in ("first_chunk", "last_chunk")}
        out |= {k: np.full((ticks, p), -1, np.int32) for k in ("recv_f", "recv_b")}
        sends = {d: [set() for _ in range(ticks)] for d in "FB"}
        for (kind, mb, g), (t, s) in when.items():
            out["kind"][t, s] = KINDS.index(kind) + 1
            out["mb"][t, s], out["virt"][t, s] = mb, g // p
            out["slot"][t, s] = slot_of[(mb, g)]
            out["first_chunk"][t, s], out["last_chunk"][t, s] = g == 0, g == n_chunks - 1
            # What this action sends arrives at the neighbouring chunk's device next tick.
            to = _target(Action(kind, mb, g // p), s, p, n_chunks)  # pyright: ignore
            if to is not None and t + 1 < ticks:
                out["recv_f" if kind == "F" else "recv_b"][t + 1, to % p] = slot_of[(mb, to)]
                sends[kind][t + 1].add((s, to % p))
        sets = {}
        for d in "FB":
            per_tick = [tuple(sorted(x)) for x in sends[d]]
            sets[d] = ((), *sorted(set(per_tick) - {()}, key=lambda x: (len(x), x)))
            out[f"permute_{d.lower()}"] = np.asarray([sets[d].index(x) for x in per_tick], np.int32)
        return out, sets

    @property
    def _program(self) -> dict[str, np.ndarray]:
        return self._compiled[0]

    def send_pairs(self, direction: str) -> tuple[tuple[tuple[int, int], ...], ...]:
        """The distinct sets of `(source stage, target stage)` pairs that carry data on
        some tick, forward (`"F"`: activations) or backward (`"B"`: gradients); the
        first is the empty set, the others sorted by size. `as_arrays()["permute_f"][t]`
        (`"permute_b"`) indexes this tuple: the executor's tick `t` runs the permute of
        that set, so only the stage boundaries with something to send communicate."""
        if direction not in ("F", "B"):
            raise ValueError(f"send_pairs(direction={direction!r}): use 'F' or 'B'.")
        return self._compiled[1][direction]

    def __str__(self) -> str:
        """A text chart: one line per stage, one column per tick, `.` for idle."""
        cells = [[str(a) if a is not None else "." for a in row] for row in self.grid]
        width = max((len(c) for row in cells for c in row), default=1)
        lines = [
            f"TickTable(stages={self.stages}, microbatches={self.microbatches}, "
            f"virtual={self.virtual}): {self.num_ticks} ticks, "
            f"bubble {self.bubble_fraction():.3f}"
        ]
        for s in range(self.stages):
            lines.append(f"stage {s}: " + " ".join(row[s].rjust(width) for row in cells))
        return "\n".join(lines)

    def _check_stage(self, stage: int):
        if not 0 <= stage < self.stages:
            raise ValueError(f"stage={stage} is out of range for stages={self.stages}.")


def _costs(t_f: float, t_b: float, t_w: float, split: bool, recompute: bool) -> dict:
    redo = t_f if recompute else 0.0
    return {"F": t_f, "B": t_b + (0.0 if split else t_w) + redo, "W": t_w + redo}


def _target(a: Action, stage: int, p: int, n_chunks: int) -> int | None:
    """The global chunk that `a`'s output goes to, or `None` when it sends nothing."""
    g = a.virtual * p + stage
    to = g + 1 if a.kind == "F" else g - 1 if a.kind == "B" else -1
    return to if 0 <= to < n_chunks else None


def _assign_slots(when: dict, p: int, release: str) -> dict:
    """`(microbatch, global chunk) -> slot` on its device, for the lifetimes
    `[arrival, release]` (arrival: the previous chunk's forward tick + 1; chunk 0: its
    own forward; release: its `release` action), lowest free slot first in order of
    arrival."""
    spans: dict[int, list[tuple[int, int, int, int]]] = {s: [] for s in range(p)}
    for (kind, mb, g), (t, s) in when.items():
        if kind == "F":
            start = t if g == 0 else when[("F", mb, g - 1)][0] + 1
            spans[s].append((start, when[(release, mb, g)][0], mb, g))
    slot_of: dict[tuple[int, int], int] = {}
    for stage_spans in spans.values():
        busy_until: list[int] = []  # per slot: the tick of the action that frees it
        for start, end, mb, g in sorted(stage_spans):
            slot = next((i for i, b in enumerate(busy_until) if b < start), len(busy_until))
            if slot == len(busy_until):
                busy_until.append(end)
            busy_until[slot] = end
            slot_of[(mb, g)] = slot
    return slot_of


def _simulate(programs: Sequence[Sequence[Action]], p: int, m: int, v: int) -> TickTable:
    """Runs the per-device programs tick by tick, each action as early as it can go."""
    n_chunks = p * v
    pos = [0] * p
    done: set[_Key] = set()
    grid: list[tuple[Action | None, ...]] = []
    while any(pos[s] < len(programs[s]) for s in range(p)):
        row: list[Action | None] = []
        for s in range(p):
            a = programs[s][pos[s]] if pos[s] < len(programs[s]) else None
            if a is not None and all(
                dep in done
                for dep in _dependencies(a.kind, a.microbatch, a.virtual * p + s, n_chunks)
            ):
                pos[s] += 1
                row.append(a)
            else:
                row.append(None)
        if all(a is None for a in row):
            waiting = {s: str(programs[s][pos[s]]) for s in range(p) if pos[s] < len(programs[s])}
            raise RuntimeError(
                f"Schedule deadlocks at tick {len(grid)}: every device waits "
                f"(next actions by stage: {waiting}). This is a bug in the schedule's "
                f"program order."
            )
        # Results become visible at the next tick, so commit after the whole row.
        for s, a in enumerate(row):
            if a is not None:
                done.add((a.kind, a.microbatch, a.virtual * p + s))
        grid.append(tuple(row))
    return TickTable(stages=p, microbatches=m, virtual=v, grid=tuple(grid)).validate()


def _check_sizes(schedule: AbstractSchedule, stages: int, microbatches: int):
    for name, value in (("stages", stages), ("microbatches", microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"{type(schedule).__name__}().table({name}={value!r}): {name} must be a "
                f"positive int."
            )


class AbstractSchedule(abc.ABC):
    """A pipeline schedule: builds the `TickTable` for `p` stages and `m` microbatches.

    Subclasses implement `table`; everything else derives from it.
    """

    @abc.abstractmethod
    def table(self, stages: int, microbatches: int) -> TickTable:
        """The schedule's tick table.

        **Arguments:**

        - `stages`: the number of pipeline stages (devices) `p`.
        - `microbatches`: the number of microbatches `m` per step.

        **Returns:**

        A validated `TickTable`.
        """

    def bubble_fraction(self, stages: int, microbatches: int) -> float:
        """The idle fraction of the step, counted on `self.table(stages, microbatches)`.

        **Arguments:**

        - `stages`: the number of pipeline stages `p`.
        - `microbatches`: the number of microbatches `m`.

        **Returns:**

        A float; see `TickTable.bubble_fraction`.
        """
        return self.table(stages, microbatches).bubble_fraction()


@final
@dataclasses.dataclass(frozen=True)
class GPipe(AbstractSchedule):
    """GPipe (Huang et al. 2019): all forwards, then all backwards.

    Every stage runs `F0 ... F(m-1)`, then `B(m-1) ... B0`. The step takes
    `2(m + p - 1)` ticks, bubble fraction `(p-1)/(m+p-1)`; every stage holds the
    activations of all `m` microbatches at the turn.
    """

    def table(self, stages: int, microbatches: int) -> TickTable:
        _check_sizes(self, stages, microbatches)
        m = microbatches
        program = [Action("F", i) for i in range(m)] + [Action("B", i) for i in reversed(range(m))]
        return _simulate([program] * stages, stages, m, 1)


@final
@dataclasses.dataclass(frozen=True)
class OneFOneB(AbstractSchedule):
    """Megatron's non-interleaved one-forward-one-backward schedule (PipeDream-Flush).

    Stage `s` runs `min(p - s - 1, m)` warm-up forwards, then alternates one forward
    and one backward, then drains the remaining backwards. Same `2(m + p - 1)` ticks
    and bubble fraction `(p-1)/(m+p-1)` as GPipe, but stage `s` holds at most
    `min(p - s, m)` microbatches of activations instead of `m`.
    """

    def table(self, stages: int, microbatches: int) -> TickTable:
        _check_sizes(self, stages, microbatches)
        p, m = stages, microbatches
        programs = []
        for s in range(p):
            warmup = min(p - s - 1, m)
            program = [Action("F", i) for i in range(warmup)]
            for i in range(m - warmup):
                program += [Action("F", warmup + i), Action("B", i)]
            program += [Action("B", i) for i in range(m - warmup, m)]
            programs.append(program)
        return _simulate(programs, p, m, 1)


@final
@dataclasses.dataclass(frozen=True)
class Interleaved1F1B(AbstractSchedule):
    r"""Megatron's interleaved 1F1B schedule (Narayanan et al. 2021) with `v` chunks per device.

    The model is cut into `p·v` chunks; device `d` holds chunks `d, d+p, d+2p, ...`.
    Each device walks `m·v` (microbatch, chunk) steps. Forward step `k` runs chunk
    `(k // p) % v` of microbatch `(k // (p·v))·p + k % p` (groups of `p` microbatches
    per chunk); backward step `k` the same with the chunks reversed. Stage `s` runs
    `min((p-s-1)·2 + (v-1)·p, m·v)` warm-up forwards, then alternates one forward and
    one backward, then drains the backwards.

    With unit-time chunk slots the step takes $2(mv + p - 1)$ ticks: the bubble
    fraction is $(p-1)/(mv + p - 1)$, the GPipe/1F1B bubble divided by about `v`,
    at `v` times the point-to-point messages.

    **Arguments:**

    - `virtual`: the number of model chunks per device `v`, at least 2 (use
      `OneFOneB()` for one).

    `table` requires `microbatches` to be a multiple of `stages`, as Megatron does.
    """

    virtual: int

    def __post_init__(self):
        v = self.virtual
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            raise ValueError(
                f"Interleaved1F1B(virtual={v!r}): virtual must be an int >= 2; for one "
                f"chunk per device use OneFOneB()."
            )

    def table(self, stages: int, microbatches: int) -> TickTable:
        _check_sizes(self, stages, microbatches)
        p, m, v = stages, microbatches, self.virtual
        if m % p:
            lo, hi = (m // p) * p, (m // p + 1) * p
            hint = f"microbatches={hi}" + (f" or microbatches={lo}" if lo else "")
            raise ValueError(
                f"Interleaved1F1B(virtual={v}).table(stages={p}, microbatches={m}): the "
                f"interleaved schedule walks microbatches in groups of `stages`, so "
                f"microbatches must be a multiple of stages={p}. Use {hint}, or "
                f"OneFOneB() for any count."
            )
        total = m * v

        def step(k: int, backward: bool) -> tuple[int, int]:
            chunk = (k // p) % v
            if backward:
                chunk = v - 1 - chunk
            return (k // (p * v)) * p + k % p, chunk

        programs = []
        for s in range(p):
            warmup = min((p - s - 1) * 2 + (v - 1) * p, total)
            program = [Action("F", *step(k, False)) for k in range(warmup)]
            for i in range(total - warmup):
                program += [Action("F", *step(warmup + i, False)), Action("B", *step(i, True))]
            program += [Action("B", *step(k, True)) for k in range(total - warmup, total)]
            programs.append(program)
        return _simulate(programs, p, m, v)


@final
@dataclasses.dataclass(frozen=True)
class ZeroBubbleH1(AbstractSchedule):
    r"""Zero-bubble ZB-H1 (Qi et al. 2023): 1F1B with the backward split into `B` and `W`.

    `B` (the input gradient) stays on the critical path, in 1F1B's order; `W` (the
    weight gradient) is deferred: stage `s` runs `W` of microbatch `i - s` after
    `B` of microbatch `i`, and its last `s` weight gradients at the end, where 1F1B
    idles. Every stage then holds at most `p` microbatches' activations, 1F1B's peak
    (stage 0's), and with $t_F = t_B = t_W$ the bubble is $(p-1)(t_F + t_B - t_W)$,
    a third of 1F1B's $(p-1)(t_F + t_B + t_W)$ (`TickTable.ideal_time`).
    """

    def table(self, stages: int, microbatches: int) -> TickTable:
        _check_sizes(self, stages, microbatches)
        p, m = stages, microbatches
        programs = []
        for s in range(p):
            warmup = min(p - s - 1, m)
            program = [Action("F", i) for i in range(warmup)]
            for i in range(m):
                if warmup + i < m:
                    program.append(Action("F", warmup + i))
                program.append(Action("B", i))
                if i >= s:
                    program.append(Action("W", i - s))
            program += [Action("W", i) for i in range(max(m - s, 0), m)]
            programs.append(program)
        return _simulate(programs, p, m, 1)
