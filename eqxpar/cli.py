"""Command-line helpers for scripts built on eqxpar: the `--mesh` flag and device start-up.

The examples and the benchmarks both use these, so `--mesh` and `--devices` mean the
same thing everywhere:

    parser.add_argument("--mesh", type=eqxpar.cli.parse_mesh, default="data=2,tensor=4")
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()
    print(eqxpar.cli.start_devices(args.devices))  # before the first JAX array
    mesh = eqxpar.make_mesh(**args.mesh)           # axes not named are 1

Importing this module does not start a JAX backend.
"""

from __future__ import annotations

import argparse
import difflib
import os

import jax

from ._mesh import AXIS_ORDER, simulate_cpu_devices

__all__ = ["parse_mesh", "start_devices"]


def parse_mesh(text: str) -> dict[str, int]:
    """Parses a mesh flag, `"data=2,tensor=4"` -> `{"data": 2, "tensor": 4}`.

    Use it as an `argparse` type: `parser.add_argument("--mesh", type=parse_mesh)`.

    **Arguments:**

    - `text`: `AXIS=SIZE` entries joined by commas; each `AXIS` one of
      `eqxpar.AXIS_ORDER` (`pipeline`, `data`, `expert`, `context`, `tensor`), at most
      once, and each `SIZE` an integer >= 1. Blank entries are skipped.

    **Returns:**

    The named axes only, in the order written. Axes not named are left to the caller;
    `eqxpar.make_mesh(**sizes)` makes them 1.

    Raises `argparse.ArgumentTypeError` with a one-line message naming the bad entry
    (argparse prints it after the flag's name).
    """
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = (s.strip() for s in part.partition("="))
        if eq and name in AXIS_ORDER and value.isdigit() and int(value) >= 1:
            if name in sizes:
                raise argparse.ArgumentTypeError(
                    f"bad entry {part!r}: axis {name!r} is already {name}={sizes[name]}; "
                    f"name each axis once (e.g. data=2,tensor=4)"
                )
            sizes[name] = int(value)
            continue
        guess = difflib.get_close_matches(name, AXIS_ORDER, n=1)
        hint = f"; did you mean {guess[0]}={value or 'SIZE'}?" if guess and name != guess[0] else ""
        raise argparse.ArgumentTypeError(
            f"bad entry {part!r}; write AXIS=SIZE pairs joined by commas, AXIS one of "
            f"{', '.join(AXIS_ORDER)}, SIZE >= 1 (e.g. data=2,tensor=4){hint}"
        )
    return sizes


def start_devices(n: int) -> str:
    """Simulates `n` CPU devices, unless told not to; call it before JAX starts.

    **Arguments:**

    - `n`: how many CPU devices to simulate (`eqxpar.simulate_cpu_devices(n)`). `0`
      leaves JAX's platform alone (use it on a GPU or TPU machine). Ignored too when
      the `JAX_PLATFORMS` environment variable names any platform but `cpu`.

    **Returns:**

    A one-line description of the devices JAX then has, e.g.
    `"8 x cpu (cpu, simulated on 2 CPU core(s))"`. Getting it starts the backend.

    Raises `ValueError` for a negative `n`.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(
            f"start_devices(n={n!r}): n must be an int >= 0 (0 keeps JAX's own platform)."
        )
    platforms = {p.strip().lower() for p in os.environ.get("JAX_PLATFORMS", "").split(",")}
    if n > 0 and platforms <= {"", "cpu"}:
        simulate_cpu_devices(n)
    devices = jax.devices()
    simulated = devices[0].platform == "cpu" and len(devices) > 1
    note = f", simulated on {os.cpu_count()} CPU core(s)" if simulated else ""
    return f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}{note})"
