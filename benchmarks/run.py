"""Runs every benchmark with its default sizes and prints their tables (`make bench`).

Each benchmark is also a script of its own, with flags for its sizes and mesh:
`python benchmarks/tp_mlp.py --help`.
"""

from __future__ import annotations

import argparse
import importlib
import time

from _common import add_run_flags, start_devices

# Module names in benchmarks/; each has `main(argv)`.
BENCHMARKS = ("tp_mlp",)


def main(argv: list[str] | None = None) -> None:
    """Starts the devices once, then runs each benchmark's `main` in turn."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_flags(parser)
    parser.add_argument(
        "--only", choices=BENCHMARKS, action="append", help="run just this benchmark"
    )
    args = parser.parse_args(argv)
    print(f"# eqxpar benchmarks on {start_devices(args.devices)}\n")
    for name in args.only or BENCHMARKS:
        start = time.perf_counter()
        module = importlib.import_module(name)
        module.main(["--devices", str(args.devices), "--repeats", str(args.repeats)])
        print(f"\n({name}: {time.perf_counter() - start:.0f} s)\n")


if __name__ == "__main__":
    main()
