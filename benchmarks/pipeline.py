"""Pipeline parallelism: bubble fractions, step time, memory and collectives per schedule.

For `eqxpar.pipeline`'s four schedules, `GPipe()`, `OneFOneB()`, `Interleaved1F1B(2)`
and `ZeroBubbleH1()`, with `p = --stages` (default 4) pipeline stages:

1. **Bubble**: for `m` in `--microbatches` (default 4, 8, 16, 32), the idle fraction
   of each schedule's tick table (`TickTable.bubble_fraction()`) next to the theory,
   `(p-1)/(m+p-1)` for GPipe and 1F1B and `(p-1)/(v·m+p-1)` for the interleaved
   schedule with `v` virtual stages (Narayanan et al. 2021). PASS when they are equal.
2. **Tick-time model** (`TickTable.step_time`, `TickTable.ideal_time`): for every
   schedule and `m`, the step time of the schedule as the executor runs it
   (`table.split()`, tick-synchronous) and as the executor before version 2 ran it
   (forward and backward ticks, every backward recomputing its forward), each against
   the MPMD ideal of the schedule, with `t_F = t_B = t_W`. PASS when the executor is
   within 5% of the ideal at `m >= 2p`, and ZB-H1's bubble is at most 0.4 x 1F1B's.
3. **Memory**: the compiled training step's temporaries
   (`compiled.memory_analysis().temp_size_in_bytes`, per device) of a
   `models.PPClassifier` for each `m`, the batch growing with `m` (`--batch` rows per
   microbatch per data shard), next to each table's activation-buffer slot count
   (`TickTable.num_slots`, the stage inputs the executor keeps) and
   `max_in_flight()`. The claim checked: 1F1B's temporaries stay flat as `m` grows,
   GPipe's grow linearly (see `--gpipe-growth` for the threshold).
   The steps are compiled only, never run.
4. **Time**: one training step (loss and gradients) at `m = --time-microbatches`
   (default 16), per schedule, in ms, for each `--time-batch` (rows per microbatch per
   data shard; default 64 and 256). On CPU the simulated devices share the same cores,
   so this is the executor's overhead, not a speed-up (an idle device frees its core).
   Beside it, the plain step accumulated over microbatches of the same rows (what small
   matmuls cost here), and what the barrier of a sending tick costs (a scan of ticks of
   one matmul per device, with and without a `ppermute` per tick). PASS when the 1F1B
   step costs at most `--slowdown` times the plain step at the largest `--time-batch`.
5. **Collectives** over `pipeline` in each compiled step
   (`eqxpar.profile.count_collectives`): only collective-permutes (one per set of
   stage pairs the table sends over, `TickTable.send_pairs`, each in a per-tick switch
   branch, so every one is counted on every tick) and the final all-reduces of the loss
   and of the first and last stage's gradients. Asserted; beside them the permutes the
   switches run (the ticks where some stage receives).

The pipeline step is the one a user writes:

    eqx.filter_jit(eqx.filter_value_and_grad(filter_shard_map(
        lambda model, x, y: pmean(model.loss(x, y, schedule=..., microbatches=m), "data"),
        mesh=make_mesh(pipeline=p, data=d), ...)))

Side by side, the **plain-JAX alternative**: the same model without a pipeline, all
layers on every device, `jax.jit(jax.value_and_grad(loss))` with the parameters
replicated and the batch split over a data-parallel mesh of the same `p·d` devices
(XLA's SPMD partitioner inserts the gradient all-reduce). Its loss is checked against
the pipeline's.

Run alone with `python benchmarks/pipeline.py --help` for the flags.
"""

from __future__ import annotations

import argparse
import time
from fractions import Fraction
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from _common import add_run_flags, format_table, mib, start_devices, temp_bytes, time_round_robin
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eqxpar as ep
from eqxpar.pipeline import AbstractSchedule, GPipe, Interleaved1F1B, OneFOneB, ZeroBubbleH1
from eqxpar.profile import CollectiveReport, count_collectives
from models import PPClassifier

PLAIN = "plain jax.jit DP"
ACCUM = "plain DP, accumulated"


def schedules(virtual: int) -> dict[str, AbstractSchedule]:
    """The schedules compared, by name."""
    return {
        "GPipe": GPipe(),
        "1F1B": OneFOneB(),
        f"interleaved v={virtual}": Interleaved1F1B(virtual),
        "ZB-H1": ZeroBubbleH1(),
    }


def virtual_of(schedule: AbstractSchedule) -> int:
    """`v` of an interleaved schedule, else 1."""
    return schedule.virtual if isinstance(schedule, Interleaved1F1B) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_flags(parser)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages p (default 4)")
    parser.add_argument("--data", type=int, default=2, help="data-parallel size (default 2)")
    parser.add_argument("--virtual", type=int, default=2, help="interleaved v (default 2)")
    parser.add_argument(
        "--microbatches", type=int, nargs="+", default=[4, 8, 16, 32],
        help="m for the bubble and memory tables (default 4 8 16 32)",
    )  # fmt: skip
    parser.add_argument("--width", type=int, default=512, help="residual width (default 512)")
    parser.add_argument("--hidden", type=int, default=512, help="MLP hidden size (default 512)")
    parser.add_argument("--depth", type=int, default=8, help="residual blocks (default 8)")
    parser.add_argument("--features", type=int, default=16, help="input features (default 16)")
    parser.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    parser.add_argument(
        "--batch", type=int, default=512,
        help="memory table: rows per microbatch per data shard (default 512)",
    )  # fmt: skip
    parser.add_argument(
        "--time-batch", type=int, nargs="+", default=[64, 256],
        help="timing: rows per microbatch per data shard, each timed in turn; the 1F1B check "
        "is made at the largest (default 64 256)",
    )  # fmt: skip
    parser.add_argument("--time-microbatches", type=int, default=16, help="timing: m (default 16)")
    parser.add_argument(
        "--slowdown", type=float, default=1.2,
        help="PASS needs the 1F1B step at most this times the plain step (default 1.2)",
    )  # fmt: skip
    parser.add_argument(
        "--flat", type=float, default=1.5,
        help="PASS needs 1F1B's temp at the largest m below this times its smallest-m value",
    )  # fmt: skip
    parser.add_argument(
        "--gpipe-growth", type=float, default=2.0,
        help="PASS needs GPipe's temp at the largest m above this times its smallest-m value "
        "(default 2; see the README for why not 4)",
    )  # fmt: skip
    return parser


# -- the steps ---------------------------------------------------------------------------


def make_model(args: argparse.Namespace, virtual: int) -> PPClassifier:
    """The classifier, split into `stages x virtual` chunks (the same key for every `v`:
    the same weights, stacked differently)."""
    return PPClassifier(
        args.features, args.classes, width=args.width, hidden=args.hidden, depth=args.depth,
        stages=args.stages, virtual=virtual, key=jax.random.key(0),
    )  # fmt: skip


def pipeline_step(mesh: jax.sharding.Mesh, schedule: AbstractSchedule, m: int) -> Any:
    """`step(model, x, y) -> (loss, grads)`: value-and-grad of the pipelined loss."""

    def per_shard(model: PPClassifier, x: jax.Array, y: jax.Array) -> jax.Array:
        loss = model.loss(x, y, schedule=schedule, microbatches=m)
        return jax.lax.pmean(loss, "data")  # the mean over the data shards

    mapped = ep.filter_shard_map(
        per_shard, mesh=mesh, in_specs=(None, P("data"), P("data")), out_specs=P()
    )
    return eqx.filter_jit(eqx.filter_value_and_grad(mapped))


def plain_step(static: Any) -> Any:
    """The plain-JAX alternative: `jax.jit` of value-and-grad of the layers in order."""

    @jax.jit
    def step(params: Any, x: jax.Array, y: jax.Array):
        return jax.value_and_grad(lambda p: eqx.combine(p, static).loss(x, y))(params)

    return step


def accumulated_step(static: Any, mesh: jax.sharding.Mesh, rows: int) -> Any:
    """The plain step with gradient accumulation, as a JAX user writes it: on each device
    of a data-only `mesh`, `lax.scan` over its batch in microbatches of `rows` rows, the
    mean loss and gradients then averaged over `data`. The matmuls are the pipeline's
    (one microbatch at a time), so this is the plain step's cost at the pipeline's
    microbatch size."""

    def per_device(params: Any, x: jax.Array, y: jax.Array) -> tuple:
        k = x.shape[0] // rows
        xs, ys = x.reshape(k, rows, *x.shape[1:]), y.reshape(k, rows)

        def add(total: tuple, xy: tuple) -> tuple[tuple, None]:
            loss = jax.value_and_grad(lambda p: eqx.combine(p, static).loss(*xy))(params)
            return jax.tree.map(jnp.add, total, loss), None

        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        zero = jax.tree.map(lambda z: jax.lax.pcast(z, ("data",), to="varying"), zero)
        total, _ = jax.lax.scan(add, zero, (xs, ys))
        return jax.tree.map(lambda a: jax.lax.pmean(a / k, "data"), total)

    specs = (P(), P("data"), P("data"))
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P()))


def batch(args: argparse.Namespace, rows: int, sharding: NamedSharding) -> tuple:
    """Random inputs `(rows, features)` and labels `(rows,)`, split over `data`."""
    x = jax.random.normal(jax.random.key(1), (rows, args.features))
    y = jax.random.randint(jax.random.key(2), (rows,), 0, args.classes)
    return jax.device_put(x, sharding), jax.device_put(y, sharding)


# -- the tables --------------------------------------------------------------------------


def bubble_section(args: argparse.Namespace) -> tuple[list[str], list[tuple[str, bool]]]:
    """The bubble table from the tick tables, against the theory."""
    p, v = args.stages, args.virtual
    scheds = schedules(v)
    rows, checks = [], []
    for m in args.microbatches:
        flat, inter = Fraction(p - 1, m + p - 1), Fraction(p - 1, v * m + p - 1)
        cells: list[Any] = [m]
        for name, schedule in scheds.items():
            if isinstance(schedule, ZeroBubbleH1):
                continue  # its bubble is in the tick-time section: B and W differ in time
            theory = inter if virtual_of(schedule) > 1 else flat
            got = schedule.bubble_fraction(p, m)
            ok = abs(got - float(theory)) < 1e-12
            checks.append((f"bubble {name} p={p} m={m}: table {got:.4f}, theory {theory}", ok))
            cells += [f"{got:.4f}", f"{float(theory):.4f}", "PASS" if ok else "FAIL"]
        rows.append(cells)
    headers = ["m"]
    for name, schedule in scheds.items():
        if not isinstance(schedule, ZeroBubbleH1):
            headers += [f"{name} table", "theory", ""]
    lines = [
        f"## pipeline: bubble fraction, p={p}, from the tick tables",
        "theory: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v*m+p-1) interleaved",
        "",
        format_table(headers, rows),
    ]
    return lines, checks


def model_section(
    args: argparse.Namespace, *_meshes: Any
) -> tuple[list[str], list[tuple[str, bool]]]:
    """The tick-time model: each schedule as the executor runs it against the MPMD ideal."""
    p, v = args.stages, args.virtual
    rows, checks = [], []
    for m in args.microbatches:
        for name, schedule in schedules(v).items():
            table = schedule.table(p, m)
            t = 1.0 / virtual_of(schedule)  # a chunk is a v-th of a stage
            ideal = table.ideal_time(t, t, t)
            now = table.split().step_time(t, t, t)
            before = table.step_time(t, t, t, recompute=True)
            rows.append((m, name, f"{ideal:.2f}", f"{now:.2f}", f"{now / ideal:.3f}",
                         f"{before:.2f}", f"{before / ideal:.3f}"))  # fmt: skip
            if not isinstance(schedule, ZeroBubbleH1) and m >= 2 * p:
                checks.append(
                    (f"{name} m={m}: executor / MPMD ideal = {now / ideal:.3f} (<= 1.05 wanted)",
                     now <= 1.05 * ideal)
                )  # fmt: skip
    lines = [
        f"## pipeline: tick-time model, p={p}, t_F = t_B = t_W = 1 per stage "
        "(t_B + t_W = 2 t_F: the whole backward is twice the forward)",
        "MPMD ideal: table.ideal_time, each device runs its program as soon as its inputs "
        "arrive (Megatron's 1F1B:",
        "(m+p-1)(t_F+t_B+t_W)); executor v2: table.split().step_time, tick-synchronous, every "
        "tick as long as its",
        "slowest device; v1: the unsplit table with forward and backward ticks, each "
        "backward recomputing its forward.",
        "",
        format_table(
            (
                "m",
                "schedule",
                "MPMD ideal",
                "v2 executor",
                "v2 / ideal",
                "v1 executor",
                "v1 / ideal",
            ),
            rows,
        ),  # fmt: skip
    ]
    m = 2 * p
    work = 3 * m
    zb = ZeroBubbleH1().table(p, m).ideal_time() - work
    one = OneFOneB().table(p, m).ideal_time() - work
    one_split = OneFOneB().table(p, m).split().step_time() - work
    lines += [
        "",
        f"ZB-H1 at m=2p={m}, t_F = t_B = t_W: bubble {zb:g} against 1F1B's {one:g} (MPMD "
        f"ideal) and {one_split:g} (1F1B as the v2 executor runs it); theory (p-1)(F+B-W) = "
        f"{p - 1} and (p-1)(F+B+W) = {3 * (p - 1)}",
    ]
    checks.append((f"ZB-H1 bubble {zb:g} <= 0.4 x 1F1B's {one:g}", zb <= 0.4 * one))
    return lines, checks


def memory_section(
    args: argparse.Namespace, pipe_mesh: jax.sharding.Mesh, dp_mesh: jax.sharding.Mesh
) -> tuple[list[str], list[tuple[str, bool]]]:
    """Compiles the step for every schedule and `m`; temporaries and slots as a table."""
    p, d = args.stages, args.data
    scheds = schedules(args.virtual)
    models = {name: make_model(args, virtual_of(s)) for name, s in scheds.items()}
    placed = {name: ep.place(model, pipe_mesh) for name, model in models.items()}
    dyn, static = eqx.partition(models["1F1B"], eqx.is_array)
    plain_params = jax.device_put(dyn, NamedSharding(dp_mesh, P()))
    temps: dict[str, dict[int, int]] = {name: {} for name in [*scheds, PLAIN]}
    slots: dict[str, dict[int, tuple[int, int]]] = {name: {} for name in scheds}
    start = time.perf_counter()
    for m in args.microbatches:
        rows = m * args.batch * d
        x, y = batch(args, rows, NamedSharding(pipe_mesh, P("data")))
        for name, schedule in scheds.items():
            table = schedule.table(p, m).split()  # what the executor runs
            slots[name][m] = (table.num_slots, table.max_in_flight())
            compiled = pipeline_step(pipe_mesh, schedule, m).lower(placed[name], x, y).compile()
            temps[name][m] = temp_bytes(compiled)
        x, y = batch(args, rows, NamedSharding(dp_mesh, P("data")))
        temps[PLAIN][m] = temp_bytes(plain_step(static).lower(plain_params, x, y).compile())
    compile_s = time.perf_counter() - start

    ms = args.microbatches
    rows_out = []
    for m in ms:
        cells: list[Any] = [m, m * args.batch * d]
        for name in scheds:
            n_slots, in_flight = slots[name][m]
            cells += [f"{n_slots} / {in_flight}", mib(temps[name][m], 1)]
        cells.append(mib(temps[PLAIN][m], 1))
        rows_out.append(cells)
    headers = ["m", "global batch"]
    for name in scheds:
        headers += [f"{name} slots / in flight", f"{name} temp MiB"]
    headers.append(f"{PLAIN} temp MiB")

    lo, hi = ms[0], ms[-1]
    one, gpipe = temps["1F1B"], temps["GPipe"]
    steps = [(gpipe[b] - gpipe[a]) / (b - a) for a, b in zip(ms, ms[1:])]
    checks = [
        (
            f"1F1B temp at m={hi} is {one[hi] / one[lo]:.2f}x its m={lo} value "
            f"(< {args.flat:g}x wanted)",
            one[hi] < args.flat * one[lo],
        ),
        (
            f"GPipe temp at m={hi} is {gpipe[hi] / gpipe[lo]:.2f}x its m={lo} value "
            f"(> {args.gpipe_growth:g}x wanted)",
            gpipe[hi] > args.gpipe_growth * gpipe[lo],
        ),
    ]
    if steps:  # two m values or more
        checks.append(
            (
                f"GPipe temp grows linearly, by one slot per microbatch: "
                f"{', '.join(mib(g) for g in steps)} MiB per microbatch between the m values",
                max(steps) <= 1.05 * min(steps),
            )
        )
    lines = [
        "## pipeline: compiled temporaries of a training step per device",
        f"model: PPClassifier features={args.features}, width={args.width}, "
        f"hidden={args.hidden}, depth={args.depth}, classes={args.classes}, f32; "
        f"mesh pipeline={p}, data={d}; {args.batch} rows per microbatch per data shard",
        "slots / in flight: the executor's buffer slots per device "
        "(table.split().num_slots) / max_in_flight() (a slot: the chunk's stored "
        "activations, its output gradient and its layers' gradients);",
        "temp MiB: compiled.memory_analysis().temp_size_in_bytes (2^20 B), compiled only. "
        f"{PLAIN}: the same model, no pipeline,",
        f"params replicated, the same global batch split over data={p * d} "
        f"({len(scheds) + 1} x {len(ms)} steps compiled in {compile_s:.0f} s).",
        "",
        format_table(headers, rows_out),
    ]
    return lines, checks


def pipeline_collectives(report: CollectiveReport) -> tuple[int, int, list[str]]:
    """Permutes over `pipeline`, all-reduces whose group includes `pipeline`, and any
    other collective kind over `pipeline` (should be none)."""
    permutes = report.count("collective-permute", "pipeline")
    reduces = sum(
        r.count for r in report.records if r.kind == "all-reduce" and "pipeline" in r.axes
    )
    others = sorted(
        {
            r.kind
            for r in report.records
            if "pipeline" in r.axes and r.kind not in ("collective-permute", "all-reduce")
        }
    )
    return permutes, reduces, others


def time_steps(
    args: argparse.Namespace,
    pipe_mesh: jax.sharding.Mesh,
    dp_mesh: jax.sharding.Mesh,
    rows_per_mb: int,
) -> tuple[dict[str, float], dict[str, Any], list[tuple[str, bool]]]:
    """Times one training step per schedule, the plain-JAX step and the accumulated one
    at `rows_per_mb` rows per microbatch per data shard: `(ms by variant, collective
    report by schedule, loss checks)`."""
    d, m = args.data, args.time_microbatches
    rows = m * rows_per_mb * d
    calls, reports = {}, {}
    x, y = batch(args, rows, NamedSharding(pipe_mesh, P("data")))
    for name, schedule in schedules(args.virtual).items():
        model = ep.place(make_model(args, virtual_of(schedule)), pipe_mesh)
        compiled = pipeline_step(pipe_mesh, schedule, m).lower(model, x, y).compile()
        calls[name] = (compiled, (model, x, y))
        reports[name] = count_collectives(compiled, pipe_mesh)
    dyn, static = eqx.partition(make_model(args, 1), eqx.is_array)
    params = jax.device_put(dyn, NamedSharding(dp_mesh, P()))
    xd, yd = batch(args, rows, NamedSharding(dp_mesh, P("data")))
    calls[PLAIN] = (plain_step(static).lower(params, xd, yd).compile(), (params, xd, yd))
    # A mesh of "data" alone: eqxpar's mesh names every axis, which binds the pipeline.
    plain_mesh = jax.make_mesh((dp_mesh.size,), ("data",), devices=list(dp_mesh.devices.flat))
    params_a = jax.device_put(dyn, NamedSharding(plain_mesh, P()))
    xa, ya = batch(args, rows, NamedSharding(plain_mesh, P("data")))
    accumulated = accumulated_step(static, plain_mesh, rows_per_mb).lower(params_a, xa, ya)
    calls[ACCUM] = (accumulated.compile(), (params_a, xa, ya))

    # Every variant computes the same loss (the same weights and batch).
    ref = float(calls[PLAIN][0](*calls[PLAIN][1])[0])
    checks = []
    for name in [*reports, ACCUM]:
        loss = float(calls[name][0](*calls[name][1])[0])
        checks.append(
            (f"{rows_per_mb} rows: {name} loss {loss:.6f} = plain loss {ref:.6f}",
             abs(loss - ref) <= 1e-4 * abs(ref))
        )  # fmt: skip
    return time_round_robin(calls, repeats=args.repeats, warmup=args.warmup), reports, checks


BARRIER_TICKS = 100


def barrier_calls(args: argparse.Namespace, mesh: jax.sharding.Mesh, rows: int) -> dict:
    """Two scans of `BARRIER_TICKS` ticks of one `[rows, width] x [width, width]` matmul
    per device, the same work on every device: one without collectives, one with a
    `ppermute` around the pipeline ring at every tick (a barrier of all the devices)."""
    spec = P(tuple(mesh.axis_names))  # each device its own rows
    p = mesh.shape["pipeline"]
    ring = [(i, (i + 1) % p) for i in range(p)]

    def scan(send: bool) -> Any:
        def per_device(x: jax.Array, w: jax.Array) -> jax.Array:
            def tick(x: jax.Array, _: None) -> tuple[jax.Array, None]:
                y = jnp.tanh(x @ w)
                return (jax.lax.ppermute(y, "pipeline", ring) if send else y), None

            return jax.lax.scan(tick, x, None, length=BARRIER_TICKS)[0]

        return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, P()), out_specs=spec))

    x = jax.random.normal(jax.random.key(3), (mesh.size * rows, args.width))
    w = jax.random.normal(jax.random.key(4), (args.width, args.width)) / args.width**0.5
    x, w = jax.device_put(x, NamedSharding(mesh, spec)), jax.device_put(w, NamedSharding(mesh, P()))
    return {"no send": (scan(False), (x, w)), "ppermute": (scan(True), (x, w))}


def barrier_row(
    args: argparse.Namespace, mesh: jax.sharding.Mesh, rows: int, sending: int, gap: float
) -> tuple:
    """The barrier table's row at `rows`: the two scans' times, the cost of one sending
    tick, that times the `sending` ticks of 1F1B, beside `gap` (1F1B - plain, ms)."""
    ms = time_round_robin(barrier_calls(args, mesh, rows), repeats=args.repeats, warmup=args.warmup)
    per_tick = (ms["ppermute"] - ms["no send"]) / BARRIER_TICKS
    return (rows, f"{ms['no send']:.1f}", f"{ms['ppermute']:.1f}", f"{per_tick:.2f}",
            f"{100 * per_tick * BARRIER_TICKS / ms['no send']:.0f}%",
            f"{sending * per_tick:.0f}", f"{gap:.0f}")  # fmt: skip


def collective_rows(tables: dict, reports: dict) -> tuple[list[tuple], list[tuple[str, bool]]]:
    """The collectives table's rows and checks: per schedule, the permutes over the
    pipeline (one per pair set on every tick) and the final all-reduces, nothing else."""
    rows, checks = [], []
    for name, table in tables.items():
        permutes, reduces, others = pipeline_collectives(reports[name])
        branches = len(table.send_pairs("F")) + len(table.send_pairs("B")) - 2
        arrays = table.as_arrays()
        runs = int((arrays["permute_f"] > 0).sum() + (arrays["permute_b"] > 0).sum())
        rows.append(
            (name, table.num_ticks, branches, permutes, runs, reduces, ", ".join(others) or "-")
        )  # fmt: skip
        checks.append(
            (
                f"{name}: over pipeline only collective-permutes ({permutes} = {branches} "
                f"pair sets x {table.num_ticks} ticks) and {reduces} final all-reduce(s)",
                not others and permutes == branches * table.num_ticks and 1 <= reduces <= 3,
            )
        )
    return rows, checks


def time_lines(args: argparse.Namespace, tables: tuple, sending: int) -> list[str]:
    """The time section's text around its three tables `(steps, barrier, collectives)`."""
    p, d, m = args.stages, args.data, args.time_microbatches
    rows_out, barrier_rows, coll_rows = tables
    return [
        f"## pipeline: one training step (loss + grads), m={m}, at each --time-batch "
        f"(rows per microbatch per data shard; global batch m x rows x data={d})",
        f"median of {args.repeats} timed steps per variant (round-robin, {args.warmup} "
        f"warm-up each); mesh pipeline={p}, data={d}; {PLAIN} on data={p * d}; {ACCUM}: "
        f"the same, each device's",
        f"batch in {m // p} microbatches of `rows` rows (lax.scan): the plain step at the "
        "pipeline's microbatch size",
        "",
        format_table(("rows", "variant", "ms/step", "x plain", "ticks", "bubble"), rows_out),
        "",
        "Note: the simulated devices share this machine's CPU cores and a collective is a "
        "memory copy: an idle",
        "device frees its core for the others, so this measures the executor's overhead, "
        "not the bubble; the tick-time",
        "model above is what a schedule costs on devices that run in parallel. A pipeline "
        f"works a microbatch at a time: {ACCUM}",
        "is the plain step at that size, and what small matmuls cost on this CPU shows in "
        "it; the 1F1B check is made at",
        "the largest rows. ticks and bubble: of table.split(), what runs.",
        "",
        f"The barrier: {BARRIER_TICKS} ticks of one [rows, {args.width}] x [{args.width}, "
        f"{args.width}] matmul per device, the same on every device, without",
        "collectives and with a ppermute per tick; the cost of one sending tick, and that "
        f"cost times the {sending} ticks of the split 1F1B table",
        "that send, beside the 1F1B step's time over the plain step's.",
        "",
        format_table(
            (
                "rows",
                "no send ms",
                "ppermute ms",
                "ms per tick",
                "+",
                f"x {sending} ticks ms",
                "1F1B - plain ms",
            ),
            barrier_rows,
        ),  # fmt: skip
        "",
        "Collectives over `pipeline` in each compiled step (count_collectives): permutes "
        "(one per pair set, each in a",
        "switch branch counted on every tick: an upper bound; `run` is the permutes the "
        "table's ticks select), all-reduces",
        "whose group includes `pipeline` (the loss, and the gradients of the embedding, "
        "norm and head, held on",
        "every stage), and any other kind (none wanted).",
        "",
        format_table(
            ("schedule", "ticks", "pair sets", "permutes", "run", "all-reduces", "other kinds"),
            coll_rows,
        ),
    ]


def time_section(
    args: argparse.Namespace, pipe_mesh: jax.sharding.Mesh, dp_mesh: jax.sharding.Mesh
) -> tuple[list[str], list[tuple[str, bool]]]:
    """Times one step per schedule and the plain-JAX step at each `--time-batch`;
    counts the collectives; checks the 1F1B step at the largest `--time-batch`."""
    p, m = args.stages, args.time_microbatches
    tables = {name: s.table(p, m).split() for name, s in schedules(args.virtual).items()}
    arrays = tables["1F1B"].as_arrays()
    sending = int(((arrays["permute_f"] > 0) | (arrays["permute_b"] > 0)).sum())
    rows_out, barrier_rows, checks = [], [], []
    for rows_per_mb in sorted(args.time_batch):  # the last, the largest, is checked
        ms, reports, loss_checks = time_steps(args, pipe_mesh, dp_mesh, rows_per_mb)
        checks += loss_checks
        gap = ms["1F1B"] - ms[PLAIN]
        barrier_rows.append(barrier_row(args, pipe_mesh, rows_per_mb, sending, gap))
        for name, table in tables.items():
            rows_out.append(
                (rows_per_mb, name, f"{ms[name]:.1f}", f"{ms[name] / ms[PLAIN]:.2f}",
                 table.num_ticks, f"{table.bubble_fraction():.3f}")
            )  # fmt: skip
        rows_out.append((rows_per_mb, PLAIN, f"{ms[PLAIN]:.1f}", "1.00", "-", "-"))
        rows_out.append(
            (rows_per_mb, ACCUM, f"{ms[ACCUM]:.1f}", f"{ms[ACCUM] / ms[PLAIN]:.2f}", "-", "-")
        )
    largest = max(args.time_batch)
    checks.append(
        (
            f"at {largest} rows per microbatch the 1F1B step costs {ms['1F1B'] / ms[PLAIN]:.2f}x "
            f"the plain step (<= {args.slowdown:g}x wanted)",
            ms["1F1B"] <= args.slowdown * ms[PLAIN],
        )
    )

    coll_rows, coll_checks = collective_rows(tables, reports)  # the same at every rows
    checks += coll_checks
    return time_lines(args, (rows_out, barrier_rows, coll_rows), sending), checks


def check_args(args: argparse.Namespace) -> None:
    p, d, v = args.stages, args.data, args.virtual
    if args.depth % (p * v):
        raise SystemExit(f"--depth {args.depth} must be a multiple of stages x virtual = {p * v}.")
    bad = [m for m in [*args.microbatches, args.time_microbatches] if m % p]
    if bad:
        raise SystemExit(
            f"microbatches {bad} are not multiples of --stages {p}, which the interleaved "
            f"schedule needs."
        )
    if len(jax.devices()) < p * d:
        raise SystemExit(
            f"--stages {p} x --data {d} needs {p * d} devices but JAX has "
            f"{len(jax.devices())}; pass --devices {p * d}."
        )


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints its tables; exits non-zero if a check fails."""
    args = build_parser().parse_args(argv)
    args.microbatches = sorted(set(args.microbatches))
    devices = start_devices(args.devices)
    check_args(args)
    devs = jax.devices()[: args.stages * args.data]
    pipe_mesh = ep.make_mesh(pipeline=args.stages, data=args.data, devices=devs)
    dp_mesh = ep.make_mesh(data=args.stages * args.data, devices=devs)
    lines, checks = bubble_section(args)
    lines.insert(1, f"devices: {devices}")
    failed = [text for text, ok in checks if not ok]
    lines += ["", *(f"{text}: FAIL" for text in failed)]
    lines.append(f"every table's bubble equals the theory: {'FAIL' if failed else 'PASS'}")
    print("\n".join(lines) + "\n", flush=True)

    for section in (model_section, memory_section, time_section):
        lines, checks = section(args, pipe_mesh, dp_mesh)
        lines += ["", *(f"{text}: {'PASS' if ok else 'FAIL'}" for text, ok in checks)]
        print("\n".join(lines) + "\n", flush=True)
        failed += [text for text, ok in checks if not ok]
    if failed:
        raise SystemExit(f"pipeline: FAIL: {'; '.join(failed)}.")


if __name__ == "__main__":
    main()
