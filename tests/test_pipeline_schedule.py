"""Pipeline schedules as tick tables: validity, the bubble and memory theory, plotting."""

import dataclasses
from fractions import Fraction

import numpy as np
import pytest

from eqxpar.pipeline import (
    AbstractSchedule,
    Action,
    GPipe,
    Interleaved1F1B,
    OneFOneB,
    TickTable,
    ZeroBubbleH1,
    plot_schedule,
)

# (p, m): m in {p, 2p, 4p}, plus some m < p.
FLAT_SIZES = [(p, m) for p in (2, 3, 4) for m in (p, 2 * p, 4 * p)] + [(3, 2), (4, 1), (4, 3)]
INTERLEAVED_SIZES = [(p, m, v) for p in (2, 3, 4) for m in (p, 2 * p, 4 * p) for v in (2, 3)]


def _idle(table: TickTable) -> int:
    return sum(a is None for row in table.grid for a in row)


def _leading_forwards(program: list[Action]) -> int:
    n = 0
    for a in program:
        if a.kind != "F":
            break
        n += 1
    return n


# --- Theory: ticks, bubble, activations in flight -------------------------------------


@pytest.mark.parametrize("schedule", [GPipe(), OneFOneB()], ids=["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", FLAT_SIZES)
def test_flat_schedules_match_theory(schedule, p, m):
    table = schedule.table(p, m)
    assert (table.stages, table.microbatches, table.virtual) == (p, m, 1)
    assert table.num_ticks == 2 * (m + p - 1)
    # Exact: idle slots over all slots is (p - 1) / (m + p - 1).
    assert Fraction(_idle(table), table.num_ticks * p) == Fraction(p - 1, m + p - 1)
    assert table.bubble_fraction() == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert schedule.bubble_fraction(p, m) == table.bubble_fraction()
    table.validate()


@pytest.mark.parametrize("p,m", FLAT_SIZES)
def test_gpipe_keeps_every_microbatch_alive(p, m):
    table = GPipe().table(p, m)
    assert [table.max_in_flight(s) for s in range(p)] == [m] * p
    assert table.max_in_flight() == m
    for s in range(p):
        program = table.program(s)
        assert [str(a) for a in program] == [f"F{i}" for i in range(m)] + [
            f"B{i}" for i in reversed(range(m))
        ]


@pytest.mark.parametrize("p,m", FLAT_SIZES)
def test_1f1b_memory_and_warmup(p, m):
    table = OneFOneB().table(p, m)
    assert table.max_in_flight(0) == min(p, m)
    assert [table.max_in_flight(s) for s in range(p)] == [min(p - s, m) for s in range(p)]
    for s in range(p):
        program = table.program(s)
        # p - s - 1 warm-up forwards, then the first steady forward, then a backward.
        assert _leading_forwards(program) == min(p - s, m)
        assert sorted(str(a) for a in program if a.kind == "F") == sorted(f"F{i}" for i in range(m))


@pytest.mark.parametrize("p,m,v", INTERLEAVED_SIZES)
def test_interleaved_matches_theory(p, m, v):
    table = Interleaved1F1B(v).table(p, m)
    assert (table.stages, table.microbatches, table.virtual) == (p, m, v)
    # Narayanan et al. 2021: the bubble is (p - 1) chunk-times of forward and backward,
    # against v·m chunk-times of work: fraction (p - 1) / (v·m + p - 1).
    assert table.num_ticks == 2 * (v * m + p - 1)
    assert Fraction(_idle(table), table.num_ticks * p) == Fraction(p - 1, v * m + p - 1)
    # Smaller than the non-interleaved bubble, by a factor close to v for large m.
    flat = (p - 1) / (m + p - 1)
    assert table.bubble_fraction() < flat
    assert flat / table.bubble_fraction() == pytest.approx(v * (m + (p - 1) / v) / (m + p - 1))
    table.validate()


@pytest.mark.parametrize("p,m,v", INTERLEAVED_SIZES)
def test_interleaved_warmup_and_counts(p, m, v):
    table = Interleaved1F1B(v).table(p, m)
    for s in range(p):
        program = table.program(s)
        warmup = min((p - s - 1) * 2 + (v - 1) * p, m * v)
        assert _leading_forwards(program) == min(warmup + 1, m * v)
        assert len(program) == 2 * m * v
        assert len({(a.kind, a.microbatch, a.virtual) for a in program}) == 2 * m * v


def test_interleaved_order_by_hand():
    # p=2, m=4, v=2: forwards walk p microbatches per chunk; backwards the chunks reversed.
    table = Interleaved1F1B(2).table(2, 4)
    program = table.program(0)
    forwards = [str(a) for a in program if a.kind == "F"]
    backwards = [str(a) for a in program if a.kind == "B"]
    assert forwards == ["F0", "F1", "F0.1", "F1.1", "F2", "F3", "F2.1", "F3.1"]
    assert backwards == ["B0.1", "B1.1", "B0", "B1", "B2.1", "B3.1", "B2", "B3"]


def test_numbers_for_p4_m8():
    gpipe, one, inter = GPipe().table(4, 8), OneFOneB().table(4, 8), Interleaved1F1B(2).table(4, 8)
    assert (gpipe.num_ticks, one.num_ticks, inter.num_ticks) == (22, 22, 38)
    assert gpipe.bubble_fraction() == pytest.approx(3 / 11)
    assert one.bubble_fraction() == pytest.approx(3 / 11)
    assert inter.bubble_fraction() == pytest.approx(3 / 19)
    assert (gpipe.max_in_flight(), one.max_in_flight(), inter.max_in_flight()) == (8, 4, 11)


# --- Errors -----------------------------------------------------------------------------


def test_interleaved_needs_multiple_of_stages():
    with pytest.raises(ValueError, match=r"multiple of stages=4.*microbatches=8 or microbatches=4"):
        Interleaved1F1B(2).table(4, 6)
    with pytest.raises(ValueError, match=r"virtual must be an int >= 2.*OneFOneB"):
        Interleaved1F1B(1)


def test_bad_sizes_and_abstract():
    with pytest.raises(ValueError, match="stages must be a positive int"):
        GPipe().table(0, 4)
    with pytest.raises(ValueError, match="microbatches must be a positive int"):
        OneFOneB().table(2, 0)
    with pytest.raises(TypeError):
        AbstractSchedule()  # pyright: ignore
    with pytest.raises(ValueError, match="kind must be 'F', 'B' or 'W'"):
        Action("X", 0)  # pyright: ignore
    with pytest.raises(ValueError, match="tick 0 has 1 entries but stages=2"):
        TickTable(2, 1, 1, ((Action("F", 0),),))
    with pytest.raises(ValueError, match="tick 0, stage 1 .* out of range"):
        TickTable(2, 1, 1, ((None, Action("F", 3)),))


def _with(table: TickTable, changes: dict[tuple[int, int], Action | None]) -> TickTable:
    grid = [list(row) for row in table.grid]
    for (t, s), a in changes.items():
        grid[t][s] = a
    return dataclasses.replace(table, grid=tuple(tuple(row) for row in grid))


def _find(table: TickTable, kind: str, mb: int, stage: int, virtual: int = 0) -> int:
    for t, row in enumerate(table.grid):
        if row[stage] == Action(kind, mb, virtual):  # pyright: ignore
            return t
    raise AssertionError("not found")


def test_validate_rejects_swapped_forwards():
    table = GPipe().table(3, 3)  # stage 1: F0 at tick 1, F1 at tick 2
    broken = _with(table, {(1, 1): Action("F", 1), (2, 1): Action("F", 0)})
    with pytest.raises(ValueError, match=r"tick 1, stage 1: F\(microbatch=1.*runs at tick 1"):
        broken.validate()


def test_validate_rejects_backward_before_forward():
    table = OneFOneB().table(3, 3)
    s = 2  # last stage: F0 then B0 right after
    t_f, t_b = _find(table, "F", 0, s), _find(table, "B", 0, s)
    broken = _with(table, {(t_f, s): Action("B", 0), (t_b, s): Action("F", 0)})
    with pytest.raises(ValueError, match=rf"tick {t_f}, stage {s}: B\(microbatch=0.*F\(micro"):
        broken.validate()


def test_validate_rejects_swapped_chunks():
    table = Interleaved1F1B(2).table(2, 2)
    t0, t1 = _find(table, "F", 0, 0, 0), _find(table, "F", 0, 0, 1)
    broken = _with(table, {(t0, 0): Action("F", 0, 1), (t1, 0): Action("F", 0, 0)})
    with pytest.raises(ValueError, match=rf"tick {t0}, stage 0: F\(microbatch=0, virtual=1"):
        broken.validate()


def test_validate_rejects_dropped_actions():
    table = OneFOneB().table(3, 4)
    # Dropping F0 on stage 0 starves F0 on stage 1 at tick 1.
    with pytest.raises(ValueError, match=r"tick 1, stage 1: F\(microbatch=0.*never runs"):
        _with(table, {(0, 0): None}).validate()
    # Dropping the very last backward leaves nothing waiting on it: named by stage.
    last = table.num_ticks - 1
    assert table.grid[last][0] == Action("B", 3)
    with pytest.raises(ValueError, match=r"B\(microbatch=3\) of chunk 0 never runs on stage 0"):
        _with(table, {(last, 0): None}).validate()


def test_validate_rejects_duplicates():
    table = GPipe().table(2, 2)
    t = table.num_ticks
    grid = table.grid + ((Action("F", 1), None),)
    with pytest.raises(ValueError, match=rf"tick {t}, stage 0: F\(microbatch=1.*second time"):
        TickTable(2, 2, 1, grid).validate()


# --- Arrays for an executor -------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["table", "split"])
@pytest.mark.parametrize(
    "schedule,p,m",
    [(GPipe(), 3, 5), (OneFOneB(), 4, 7), (OneFOneB(), 4, 2), (Interleaved1F1B(2), 3, 6)]
    + [(Interleaved1F1B(3), 4, 8), (ZeroBubbleH1(), 4, 6), (ZeroBubbleH1(), 3, 2)],
)
def test_as_arrays_replays(schedule, p, m, split):
    table = schedule.table(p, m)
    table = table.split() if split else table
    arrays = table.as_arrays()
    flags = {"first_chunk", "last_chunk"}
    per_tick = {"permute_f", "permute_b"}
    assert set(arrays) == {"kind", "mb", "virt", "slot", "recv_f", "recv_b"} | flags | per_tick
    for name, x in arrays.items():
        assert x.shape == ((table.num_ticks,) if name in per_tick else (table.num_ticks, p)), name
        assert x.dtype == (bool if name in flags else np.int32), name
    kind, mb, virt, slot = arrays["kind"], arrays["mb"], arrays["virt"], arrays["slot"]
    v, w = table.virtual, table.split_backward
    assert (kind == 0).sum() == _idle(table)
    assert (kind == 1).sum() == (kind == 2).sum() == m * v * p
    assert (kind == 3).sum() == (m * v * p if w else 0)
    n_slots = table.num_slots
    # A slot is held from the input's arrival, which can precede its forward.
    assert table.max_in_flight() <= n_slots <= table.max_in_flight() + p
    assert slot.min() >= 0 and slot.max() == n_slots - 1
    # A permute runs exactly on the ticks where something arrives, over exactly the
    # stage pairs whose target receives, each from its neighbouring chunk's stage.
    for recv, step in (("f", 1), ("b", -1)):
        sets = table.send_pairs(recv.upper())
        assert sets[0] == () and len(set(sets)) == len(sets)
        for t in range(table.num_ticks):
            pairs = sets[arrays[f"permute_{recv}"][t]]
            assert (
                sorted(b for _, b in pairs)
                == np.flatnonzero(arrays[f"recv_{recv}"][t] >= 0).tolist()
            )
            assert all(b == (a + step) % p for a, b in pairs)
    # Replay as the executor does: an arriving activation (or chunk 0's forward) fills
    # its slot, the forward reads it, B reads it (and its arrived gradient), W after B,
    # and the last of them frees it. No slot is overwritten while held.
    buffers = [[None] * n_slots for _ in range(p)]
    grads = [[None] * n_slots for _ in range(p)]
    for t in range(table.num_ticks):
        for s in range(p):
            for recv, store in (("recv_f", buffers), ("recv_b", grads)):
                k = arrays[recv][t, s]
                if k >= 0:
                    assert store[s][k] is None, f"{recv} overwrites slot {k}, stage {s}, tick {t}"
                    store[s][k] = "arrived"
        for s in range(p):
            a = table.grid[t][s]
            if a is None:
                assert kind[t, s] == 0 and not arrays["first_chunk"][t, s]
                continue
            assert (mb[t, s], virt[t, s]) == (a.microbatch, a.virtual)
            assert kind[t, s] == "FBW".index(a.kind) + 1
            g = a.virtual * p + s
            assert arrays["first_chunk"][t, s] == (g == 0)
            assert arrays["last_chunk"][t, s] == (g == p * v - 1)
            k, held = slot[t, s], (a.microbatch, a.virtual)
            if a.kind == "F":
                assert buffers[s][k] == ("arrived" if g else None), (t, s, k)
                buffers[s][k] = held
            elif a.kind == "B":
                assert buffers[s][k] == held
                assert grads[s][k] == (None if g == p * v - 1 else "arrived")
                if w:
                    grads[s][k] = "layer grads"
                else:
                    buffers[s][k] = grads[s][k] = None
            else:
                assert buffers[s][k] == held and grads[s][k] == "layer grads"
                buffers[s][k] = grads[s][k] = None
    assert all(b is None for stage in buffers + grads for b in stage)


def test_str_chart():
    text = str(OneFOneB().table(2, 2))
    assert text.splitlines()[1:] == ["stage 0: F0 F1  . B0  . B1", "stage 1:  . F0 B0 F1 B1  ."]


# --- Plot -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule", [GPipe(), OneFOneB(), Interleaved1F1B(2)], ids=["gpipe", "1f1b", "interleaved"]
)
def test_plot_writes_png(schedule, tmp_path):
    path = tmp_path / "schedule.png"
    out = plot_schedule(schedule.table(4, 8), path, title=type(schedule).__name__)
    assert out == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- Split backward, zero bubble and the tick-time model ----------------------------------


@pytest.mark.parametrize(
    "schedule,p,m", [(GPipe(), 3, 5), (OneFOneB(), 4, 8), (Interleaved1F1B(2), 4, 8)]
)
def test_split_runs_each_weight_gradient_right_after_its_backward(schedule, p, m):
    table = schedule.table(p, m)
    split = table.split()
    assert split.split_backward and not table.split_backward
    for s in range(p):
        program = split.program(s)
        assert [a for a in program if a.kind != "W"] == table.program(s)
        for i, a in enumerate(program):
            if a.kind == "B":
                assert program[i + 1] == Action("W", a.microbatch, a.virtual)
    assert split.split() == split
    assert split.max_in_flight() == table.max_in_flight()
    # Three unit actions per (microbatch, chunk): the bubble formula is unchanged.
    v = table.virtual
    assert split.bubble_fraction() <= (p - 1) / (m * v + p - 1) + 1e-12


def test_ideal_time_by_hand():
    # p=2, m=1: F on stage 0 [0,1], F on stage 1 [1,2], B on stage 1 [2,4], B on 0 [4,6].
    table = OneFOneB().table(2, 1)
    assert table.ideal_time(1.0, 2.0, 0.0) == 6.0
    # Each send between the stages adds the latency: F1 [1.5,2.5], B1 [2.5,4.5], B0 [5,7].
    assert table.ideal_time(1.0, 2.0, 0.0, latency=0.5) == 7.0
    # Tick by tick: 4 ticks, the backward ticks cost 2; 2 ticks send.
    assert table.step_time(1.0, 2.0, 0.0) == 6.0
    assert table.step_time(1.0, 2.0, 0.0, latency=0.5) == 7.0
    assert table.step_time(1.0, 2.0, 0.0, recompute=True) == 8.0


@pytest.mark.parametrize("schedule", [GPipe(), OneFOneB(), Interleaved1F1B(2)], ids=str)
@pytest.mark.parametrize("m", [8, 16, 32])
def test_the_executor_costs_the_mpmd_ideal(schedule, m):
    # t_B = 2 t_F, split evenly into input and weight gradients (a matmul's three
    # products cost the same); an interleaved chunk is half a stage.
    p = 4
    table = schedule.table(p, m)
    t = 1.0 / table.virtual
    ideal = table.ideal_time(t, t, t)
    if table.virtual == 1:
        assert ideal == pytest.approx(3 * (m + p - 1) * t)
    assert table.split().step_time(t, t, t) <= 1.05 * ideal
    # Version 1 of the executor: forward and backward ticks, each backward recomputing.
    assert table.step_time(t, t, t, recompute=True) >= 1.3 * ideal


@pytest.mark.parametrize("p,m", [(2, 2), (3, 2), (4, 4), (4, 8), (4, 16), (3, 7)])
def test_zero_bubble_h1(p, m):
    table = ZeroBubbleH1().table(p, m)
    assert table.split_backward and table.split() == table
    # Every stage holds at most p microbatches: 1F1B's peak (stage 0's).
    assert table.max_in_flight() == OneFOneB().table(p, m).max_in_flight() == min(p, m)
    for s in range(p):
        program = table.program(s)
        assert [a for a in program if a.kind != "W"] == OneFOneB().table(p, m).program(s)
    one = OneFOneB().table(p, m)
    work = 3 * m  # F + B + W per microbatch, unit times
    zb_bubble = table.ideal_time(1, 1, 1) - work
    one_bubble = one.ideal_time(1, 1, 1) - work
    if m >= p:
        # Qi et al.: (p-1)(F+B-W) against 1F1B's (p-1)(F+B+W).
        assert zb_bubble == pytest.approx(p - 1)
        assert one_bubble == pytest.approx(3 * (p - 1))
        # Run tick by tick (every action one unit) it costs the same.
        assert table.step_time(1, 1, 1) == pytest.approx(table.ideal_time(1, 1, 1))
    if m == 2 * p:
        assert zb_bubble <= 0.4 * one_bubble
