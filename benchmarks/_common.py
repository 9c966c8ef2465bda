"""Pieces every benchmark shares: devices, the mesh flag, timing, checks and tables.

`--mesh` and `--devices` mean what they mean in the examples: `eqxpar.cli.parse_mesh`
and `eqxpar.cli.start_devices` (re-exported here). Nothing here starts a JAX backend on
import, so a benchmark can parse its flags and call `start_devices` before the first
array exists.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

import eqxpar as ep
from eqxpar.cli import parse_mesh, start_devices
from eqxpar.profile import CollectiveReport

__all__ = [
    "MIB",
    "add_common_flags",
    "add_run_flags",
    "check_close",
    "collective_cells",
    "compile_timed",
    "format_table",
    "make_mesh",
    "mesh_flag",
    "mesh_text",
    "mib",
    "peak_matmul",
    "ratio",
    "relative_error",
    "start_devices",
    "temp_bytes",
    "time_round_robin",
]

# The mesh axes the benchmarks' `--mesh` takes; the others stay 1.
MESH_AXES = ("data", "tensor")
MIB = 2.0**20


# -- flags and devices -------------------------------------------------------------------


def mesh_flag(text: str) -> dict[str, int]:
    """`--mesh`: `eqxpar.cli.parse_mesh(text)`, limited to `MESH_AXES`, each present.

    **Returns:**

    `{"data": ..., "tensor": ...}`, an axis not named being 1, as in `eqxpar.make_mesh`.
    Raises `argparse.ArgumentTypeError` naming an entry for another axis.
    """
    sizes = parse_mesh(text)
    for name, size in sizes.items():
        if name not in MESH_AXES:
            raise argparse.ArgumentTypeError(
                f"bad entry '{name}={size}': the benchmarks' meshes have the axes "
                f"{' and '.join(MESH_AXES)} only (e.g. data=2,tensor=4)"
            )
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def mesh_text(sizes: dict[str, int]) -> str:
    """`"data=2,tensor=4"`: the axes of size > 1 (`"data=1"` when there are none)."""
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "data=1"


def _count(text: str) -> int:
    """`--devices`: an integer >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return int(text)


def add_run_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the flags `run.py` passes on to every benchmark: `--devices`, `--repeats`."""
    parser.add_argument(
        "--devices",
        type=_count,
        default=8,
        help="simulate this many CPU devices (default 8); 0 keeps JAX's own platform, "
        "e.g. on a GPU machine (so does JAX_PLATFORMS=cuda)",
    )
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed calls per variant (default 20)"
    )
    return parser


def add_common_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the flags every benchmark takes: those of `add_run_flags`, `--mesh` and
    `--warmup`."""
    add_run_flags(parser)
    parser.add_argument(
        "--mesh",
        type=mesh_flag,
        default=mesh_flag("data=2,tensor=4"),
        help="mesh axis sizes (default data=2,tensor=4); uses the first data*tensor devices",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed calls per variant (default 2)"
    )
    return parser


def make_mesh(sizes: dict[str, int]) -> jax.sharding.Mesh:
    """An eqxpar mesh of these axis sizes (`mesh_flag`'s) on the first devices it needs."""
    needed = math.prod(sizes.values())
    devices = jax.devices()
    if needed > len(devices):
        raise SystemExit(
            f"--mesh {mesh_text(sizes)} needs {needed} devices but JAX has {len(devices)}; "
            f"pass --devices {needed} (CPU) or a smaller --mesh."
        )
    return ep.make_mesh(**sizes, devices=devices[:needed])


# -- timing ------------------------------------------------------------------------------


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """Lowers and compiles `jitted` for `args`.

    **Returns:**

    The compiled callable (a `jax.stages.Compiled` or Equinox's wrapper of one) and the
    seconds that tracing, lowering and compiling took.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_round_robin(
    calls: dict[str, tuple[Callable, Sequence[Any]]], *, repeats: int, warmup: int
) -> dict[str, float]:
    """Median wall time of each call, in ms, timing the calls in turn.

    Each call is warmed up `warmup` times, then the calls are timed round-robin,
    `repeats` rounds, each call waited on with `jax.block_until_ready`. Interleaving
    spreads any slow phase of a shared machine over every variant alike.

    **Arguments:**

    - `calls`: name -> `(fn, args)`; `fn(*args)` is what gets timed.
    - `repeats`: timed rounds (at least 1).
    - `warmup`: untimed calls of each `fn` first.

    **Returns:**

    Name -> median milliseconds.
    """
    times = round_robin_times(calls, repeats=repeats, warmup=warmup)
    return {name: statistics.median(ts) for name, ts in times.items()}


def round_robin_times(
    calls: dict[str, tuple[Callable, Sequence[Any]]], *, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """`time_round_robin`'s loop: every timed call's wall time in ms, by name."""
    for fn, args in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(max(repeats, 1)):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


# -- checks ------------------------------------------------------------------------------


def relative_error(got: Any, want: Any) -> float:
    """`|got - want| / |want|` in the L2 norm, in float64 (`|want|` at least 1e-30)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check_close(
    got: tuple[Any, Any], want: tuple[Any, Any], *, rtol: float, what: str, baseline: str, fix: str
) -> tuple[float, float]:
    """Exits unless a `(loss, grads)` pair matches the baseline's within `rtol`.

    **Arguments:**

    - `got`, `want`: `(loss, grads)` of the variant and of the baseline. The two `grads`
      may be different pytrees, as long as their arrays come in the same order; the
      key paths of `got`'s name them.
    - `rtol`: the largest relative error allowed (`relative_error`, for the loss and for
      each gradient array).
    - `what`: who computed `got`, the message's start, e.g. `"tp_mlp: variant 'TP'"`.
    - `baseline`: who computed `want`, e.g. `"the single-device dense baseline"`.
    - `fix`: the message's last sentence, what to do about it.

    **Returns:**

    The relative error of the loss and the largest relative error of any gradient.
    Raises `SystemExit` with a one-line message otherwise.
    """
    (loss, grads), (ref_loss, ref_grads) = got, want
    loss_err = relative_error(loss, ref_loss)
    if not loss_err <= rtol:
        raise SystemExit(
            f"{what} computed loss {float(loss):.8g}, but {baseline} computed "
            f"{float(ref_loss):.8g}: relative error {loss_err:.2e} > --rtol {rtol:g}. {fix}"
        )
    leaves, refs = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)
    if len(leaves) != len(refs):
        raise SystemExit(
            f"{what}: {len(leaves)} gradient arrays, but {baseline} has {len(refs)}. {fix}"
        )
    errs = {
        jax.tree_util.keystr(path, simple=True, separator="."): relative_error(g, w)
        for (path, g), w in zip(leaves, refs)
    }
    worst = max(errs, key=errs.__getitem__, default=None)
    if worst is not None and not errs[worst] <= rtol:
        raise SystemExit(
            f"{what}: the gradient of {worst!r} differs from {baseline}'s by relative L2 "
            f"error {errs[worst]:.2e} > --rtol {rtol:g} (its loss matched). {fix}"
        )
    return loss_err, 0.0 if worst is None else errs[worst]


# -- report cells --------------------------------------------------------------------------


def mib(nbytes: float, digits: int = 3) -> str:
    """`nbytes` in MiB (2^20 B), with `digits` decimals."""
    return f"{nbytes / MIB:.{digits}f}"


def ratio(value: float | None, base: float | None) -> str:
    """`"x1.50"`; `"-"` when either is missing or `base` is 0 (e.g. no collective)."""
    return "-" if value is None or not base else f"x{value / base:.2f}"


def temp_bytes(compiled: Any) -> int:
    """Per-device temporaries of a compiled step (Equinox's wrapper or JAX's
    `Compiled`): `memory_analysis().temp_size_in_bytes`."""
    compiled = getattr(compiled, "compiled", compiled)
    return int(compiled.memory_analysis().temp_size_in_bytes)


def collective_cells(
    report: CollectiveReport, kinds: Sequence[str], axis: str, *, others: bool = False
) -> list[str]:
    """`count / MB` for each of `kinds` over `axis` alone; `"-"` where there is none.

    **Arguments:**

    - `report`: `eqxpar.profile.count_collectives` of a compiled step.
    - `kinds`: the collective kinds, one cell each, e.g. `("all-reduce", "all-gather")`.
    - `axis`: the mesh axis; a collective counts when its axes are exactly `(axis,)`.
    - `others`: add one cell for every collective over any other axes.

    **Returns:**

    The cells: executions, and per-device output bytes summed in MB (1e6 B).
    """

    def cell(count: int, nbytes: float) -> str:
        return f"{count} / {nbytes / 1e6:.2f}" if count else "-"

    cells = [cell(report.count(k, axis=axis), report.bytes(k, axis=axis)) for k in kinds]
    if others:
        rest = [r for r in report.records if r.axes != (axis,)]
        cells.append(cell(sum(r.count for r in rest), sum(r.count * r.nbytes for r in rest)))
    return cells


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, columns padded; the first column left-aligned, the rest right."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


def peak_matmul(device: jax.Device, n: int) -> tuple[Callable, tuple[jax.Array], int]:
    """A compiled `n x n @ n x n` f32 matmul on `device`: the yardstick for "% of peak".

    Time it together with the benchmark (`time_round_robin`), so that it runs under
    the same load as the variants.

    **Returns:**

    The compiled matmul, its argument, and its FLOPs, `2 n^3`.
    """
    a = jax.device_put(jax.numpy.ones((n, n), jax.numpy.float32), device)
    return jax.jit(lambda a: a @ a).lower(a).compile(), (a,), 2 * n**3
