"""Runs the side-by-side benchmark cases and prints one table (`make bench`).

Each case runs in its own process (`benchmarks/_harness.py`), with its own device
count; the table, `bench.json` and the chart `bench.png` go to `--results`.
`--modules` runs the older per-module benchmarks instead (each also a script of its
own: `python benchmarks/tp_mlp.py --help`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time

from _common import start_devices
from _harness import all_cases, drive

# Module names in benchmarks/; each has `main(argv)`.
BENCHMARKS = ("tp_mlp", "transformer_compile", "memory", "pipeline", "context")
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_JSON = os.path.join(HERE, "RESULTS.json")  # committed; docs/hooks.py charts it


def merge_results(results: dict[str, dict | str], path: str = RESULTS_JSON) -> None:
    """Writes the cases that ran (and succeeded) into `path`, keeping the other cases'
    entries, so `--only X` replaces just X's entry."""
    merged = {}
    if os.path.isfile(path):
        with open(path) as f:
            merged = json.load(f)
    merged.update({n: r for n, r in results.items() if not isinstance(r, str)})
    with open(path, "w") as f:
        json.dump(merged, f, indent=1)
        f.write("\n")


def run_modules(names: list[str], devices: int, repeats: int) -> None:
    """Starts the devices once, then runs each benchmark module's `main` in turn."""
    print(f"# eqxpar benchmarks on {start_devices(devices)}\n")
    failed = []
    for name in names:
        start = time.perf_counter()
        module = importlib.import_module(name)
        status = ""
        try:
            module.main(["--devices", str(devices), "--repeats", str(repeats)])
        except SystemExit as e:  # a failed check: report it, run the rest, exit non-zero
            if not e.code:
                raise
            failed.append(name)
            status = "FAILED, "
            print(f"\n{e.code}", flush=True)
        print(f"\n({name}: {status}{time.perf_counter() - start:.0f} s)\n", flush=True)
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)}")


def build_parser(cases: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--only", choices=cases, action="append", help="run just this case")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (tests the code)")
    parser.add_argument(
        "--gpu", action="store_true", help="the GPU cases: bf16, a ~1B Transformer, cuDNN"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls (default 1)")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument(
        "--modules", choices=BENCHMARKS, nargs="*", help="run the per-module benchmarks"
    )
    parser.add_argument(
        "--devices", type=int, default=8, help="--modules: simulated CPU devices (0: JAX's own)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    cases = all_cases()
    args = build_parser(list(cases)).parse_args(argv)
    if args.modules is not None:
        run_modules(args.modules or list(BENCHMARKS), args.devices, args.repeats)
        return
    gpu = [n for n, c in cases.items() if c.gpu]
    names = args.only or (gpu if args.gpu else [n for n in cases if n not in gpu])
    if args.list:
        for name in names:
            print(f"{name:<24}{cases[name].devices:>3} devices  {cases[name].about}")
        return
    sizes = (
        ("gpu-smoke" if args.smoke else "gpu") if args.gpu else ("smoke" if args.smoke else "full")
    )
    results = drive(
        names, folder=args.results, sizes=sizes, repeats=args.repeats, warmup=args.warmup
    )
    if sizes in ("full", "gpu") and os.path.abspath(args.results) == os.path.join(HERE, "results"):
        merge_results(results)
    failed = [n for n, r in results.items() if isinstance(r, str)]
    if failed:
        raise SystemExit(f"cases failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
