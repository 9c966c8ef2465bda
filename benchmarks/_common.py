"""Pieces every benchmark shares: device start-up, the mesh flag, timing and tables.

Nothing here starts a JAX backend on import, so a benchmark can parse its flags and
call `start_devices` before the first array exists.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

import eqxpar as ep

MESH_AXES = ("data", "tensor")


def start_devices(n: int) -> str:
    """Simulates `n` CPU devices, unless told not to; call it before JAX starts.

    **Arguments:**

    - `n`: how many CPU devices to simulate. `0` leaves JAX's platform alone (use it on
      a GPU machine). Ignored too when `JAX_PLATFORMS` names anything but `cpu`.

    **Returns:**

    A one-line description of the devices JAX then has (this starts the backend).
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if n > 0 and platforms in ("", "cpu"):
        ep.simulate_cpu_devices(n)
    devices = jax.devices()
    cores = os.cpu_count()
    simulated = devices[0].platform == "cpu" and len(devices) > 1
    note = f", simulated on {cores} CPU core(s)" if simulated else ""
    return f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}{note})"


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,tensor=4"` -> `{"data": 2, "tensor": 4}`; missing axes are 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name not in MESH_AXES or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(
                f"bad entry {part!r}; write AXIS=SIZE pairs joined by commas, AXIS "
                f"one of {', '.join(MESH_AXES)}, SIZE >= 1 (e.g. data=2,tensor=4)."
            )
        sizes[name] = int(value)
    return sizes


def add_run_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the flags `run.py` passes on to every benchmark: `--devices`, `--repeats`."""
    parser.add_argument(
        "--devices",
        type=int,
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
        type=parse_mesh,
        default=parse_mesh("data=2,tensor=4"),
        help="mesh axis sizes (default data=2,tensor=4); uses the first data*tensor devices",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed calls per variant (default 2)"
    )
    return parser


def make_mesh(sizes: dict[str, int]) -> jax.sharding.Mesh:
    """An eqxpar mesh on the first `data * tensor` devices."""
    needed = sizes["data"] * sizes["tensor"]
    devices = jax.devices()
    if needed > len(devices):
        raise SystemExit(
            f"--mesh data={sizes['data']},tensor={sizes['tensor']} needs {needed} devices "
            f"but JAX has {len(devices)}; pass --devices {needed} (CPU) or a smaller --mesh."
        )
    return ep.make_mesh(**sizes, devices=devices[:needed])


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
    for fn, args in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(max(repeats, 1)):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


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
