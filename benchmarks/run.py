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
BENCHMARKS = ("tp_mlp", "transformer_compile", "memory", "pipeline", "context")


def main(argv: list[str] | None = None) -> None:
    """Starts the devices once, then runs each benchmark's `main` in turn."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_flags(parser)
    parser.add_argument(
        "--only", choices=BENCHMARKS, action="append", help="run just this benchmark"
    )
    args = parser.parse_args(argv)
    print(f"# eqxpar benchmarks on {start_devices(args.devices)}\n")
    failed = []
    for name in args.only or BENCHMARKS:
        start = time.perf_counter()
        module = importlib.import_module(name)
        status = ""
        try:
            module.main(["--devices", str(args.devices), "--repeats", str(args.repeats)])
        except SystemExit as e:  # a failed check: report it, run the rest, exit non-zero
            if not e.code:
                raise
            failed.append(name)
            status = "FAILED, "
            print(f"\n{e.code}", flush=True)
        print(f"\n({name}: {status}{time.perf_counter() - start:.0f} s)\n", flush=True)
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
