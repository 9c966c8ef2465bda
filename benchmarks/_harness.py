"""One harness for every side-by-side case: eqxpar against what a JAX user writes.

A case is a `Case`: a device count and a `build(sizes)` that returns a `Built`, the
variants of one step (name -> compiled callable and its arguments) and a probe per
variant giving `(loss, gradients)`. The harness runs each case in its own process
(`python benchmarks/_harness.py --case NAME`, with the case's device count simulated
before JAX starts), checks every variant's loss and gradients against the first one
(the baseline), or against the variant `Built.references` names for it, times all
variants and a peak matmul round-robin, and writes the figures as JSON. `run.py`
starts those processes, prints one table across the cases and writes the JSON and a
PNG chart to `benchmarks/results/`.

Nothing here starts a JAX backend on import.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# The case modules, in the order of the table; each defines `CASES: dict[str, Case]`.
CASE_MODULES = ("cases_transformer", "cases_blocks", "cases_moe")
SIZES = ("full", "smoke", "gpu", "gpu-smoke")


@dataclasses.dataclass
class Variant:
    """One way of running the step.

    **Fields:**

    - `fn`, `args`: `fn(*args)` is the timed step (a compiled callable).
    - `compiled`: the `jax.stages.Compiled` (or Equinox's wrapper) for the HLO and
      memory figures; `mesh`: the mesh its collectives are named by (`None`: one device).
    - `compile_s`: seconds to trace, lower and compile it.
    - `probe`: runs the step once from the case's initial state and returns
      `(loss, gradient leaves)`, the leaves in the baseline's order.
    - `theory_bytes`: the analytic minimum of collective bytes per device and step
      (`None` where the report has no theory for this model).
    - `collectives`: `(executions, bytes per device)` of the step's collectives, where
      `count_collectives`' count is only an upper bound (the pipeline executor's
      permutes in per-tick switch branches: `communication_report` counts the ones
      that run); `None`: counted from the compiled HLO.
    """

    fn: Callable
    args: Sequence[Any]
    compiled: Any
    mesh: Any
    compile_s: float
    probe: Callable[[], tuple[Any, Any]]
    theory_bytes: float | None = None
    collectives: tuple[int, int] | None = None


@dataclasses.dataclass
class Built:
    """A case ready to run: `variants` in table order, the first the baseline.

    `baselines` names the variants a ratio is taken against (the fastest of them);
    `flops` and `tokens` are per step (model FLOPs, `models.flops_per_token` style);
    `rtol` the allowed relative error of the loss and of each gradient.
    `references` maps a variant to the variant its loss and gradients are checked
    against, or to `None` for a reference itself (a variant of another model, such as
    the dense model beside an MoE one); a variant it does not name is checked against
    the first variant."""

    title: str
    variants: dict[str, Variant]
    flops: float
    tokens: int
    baselines: tuple[str, ...]
    rtol: float = 2e-4
    references: dict[str, str | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Case:
    """A registered case: `devices` to simulate and `build(sizes)`, `sizes` one of
    `SIZES` (`"smoke"`: tiny, to test the code path)."""

    devices: int
    build: Callable[[str], Built]
    about: str
    gpu: bool = False  # a `--gpu` case (run with `sizes` "gpu" or "gpu-smoke")


def all_cases() -> dict[str, Case]:
    """Every case of every module in `CASE_MODULES`, in order (imports them)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cases: dict[str, Case] = {}
    for name in CASE_MODULES:
        cases.update(importlib.import_module(name).CASES)
    return cases


# -- inside a case's process --------------------------------------------------------------


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """`jitted.lower(*args).compile()` and the seconds it took."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def peak_matmul(n: int, dtype: Any) -> tuple[Callable, tuple, int]:
    """A compiled `n x n @ n x n` matmul on the first device, its argument, its FLOPs."""
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones((n, n), dtype), jax.devices()[0])
    return jax.jit(lambda a: a @ a).lower(a).compile(), (a,), 2 * n**3


def memory_bytes(compiled: Any) -> int:
    """Per-device bytes of a compiled step: arguments + outputs + temporaries, less
    the outputs aliased to arguments (`memory_analysis()`)."""
    m = getattr(compiled, "compiled", compiled).memory_analysis()
    alias = getattr(m, "alias_size_in_bytes", 0)
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - alias)


def collective_bytes(compiled: Any, mesh: Any) -> tuple[int, int]:
    """`(executions, per-device output bytes)` of every collective in the step."""
    if mesh is None or mesh.size == 1:
        return 0, 0
    from eqxpar.profile import count_collectives

    records = count_collectives(compiled, mesh).records
    return sum(r.count for r in records), sum(r.count * r.nbytes for r in records)


def check(built: Built) -> dict[str, tuple[float, float]]:
    """Probes every variant; exits unless each matches its reference within `rtol`
    (`built.references`, by default the first variant). Returns name -> (loss error,
    worst gradient error), `(0, 0)` for a reference."""
    from _common import check_close

    first = next(iter(built.variants))
    probed: dict[str, tuple[Any, Any]] = {}

    def probe(name: str) -> tuple[Any, Any]:
        if name not in probed:
            probed[name] = built.variants[name].probe()
        return probed[name]

    errors = {}
    for name in built.variants:
        ref = built.references.get(name, first) if name != first else None
        if ref is None:
            errors[name] = (0.0, 0.0)
            continue
        if ref not in built.variants:
            raise SystemExit(f"{built.title}: variant {name!r}'s reference {ref!r} is no variant.")
        errors[name] = check_close(
            probe(name),
            probe(ref),
            rtol=built.rtol,
            what=f"{built.title}: variant {name!r}",
            baseline=f"the reference {ref!r}" if ref != first else f"the baseline {ref!r}",
            fix="The variant does not compute the baseline's step; fix it before timing.",
        )
    return errors


def measure(built: Built, *, repeats: int, warmup: int, peak_dtype: Any) -> dict[str, Any]:
    """Checks, times and counts one built case; returns its JSON-ready figures."""
    import jax

    errors = check(built)
    peak_fn, peak_args, peak_flops = peak_matmul(
        2048 if peak_dtype == "float32" else 8192, peak_dtype
    )
    calls = {n: (v.fn, v.args) for n, v in built.variants.items()}
    from _common import round_robin_times

    times = round_robin_times(
        {**calls, "_peak": (peak_fn, peak_args)}, repeats=repeats, warmup=warmup
    )
    peak = peak_flops / (statistics.median(times.pop("_peak")) / 1e3)
    devices = jax.devices()
    # Simulated CPU devices share the host's cores, which the one-device matmul uses
    # already: the machine's peak is that matmul's. Real devices add theirs up.
    simulated = devices[0].platform == "cpu"
    medians = {n: statistics.median(ts) for n, ts in times.items()}
    best = min(medians[n] for n in built.baselines)
    rows = []
    for name, v in built.variants.items():
        ms = medians[name]
        count, nbytes = v.collectives or collective_bytes(v.compiled, v.mesh)
        n = 1 if simulated or v.mesh is None else v.mesh.size
        rows.append(
            dict(
                variant=name,
                baseline=name in built.baselines,
                ms=ms,
                ms_min=min(times[name]),
                ms_max=max(times[name]),
                ratio=ms / best,
                tokens_per_s=built.tokens / (ms / 1e3),
                mfu=built.flops / (ms / 1e3) / (peak * n),
                collectives=count,
                coll_bytes=nbytes,
                theory_bytes=v.theory_bytes,
                mem_bytes=memory_bytes(v.compiled),
                compile_s=v.compile_s,
                loss_err=errors[name][0],
                grad_err=errors[name][1],
            )
        )
    return dict(title=built.title, peak_flops=peak, repeats=repeats, warmup=warmup, rows=rows)


def collective_table(built: Built) -> str:
    """Every variant's collectives by kind and axes: executions and MB (1e6 B) per
    device and step, from the compiled HLO (`count_collectives`)."""
    from _common import format_table

    from eqxpar.profile import count_collectives

    rows = []
    for name, v in built.variants.items():
        if v.mesh is None or v.mesh.size == 1:
            continue
        sums: dict[tuple[str, str], list[int]] = {}
        for r in count_collectives(v.compiled, v.mesh).records:
            cell = sums.setdefault((r.kind, ",".join(r.axes)), [0, 0])
            cell[0] += r.count
            cell[1] += r.count * r.nbytes
        for (kind, axes), (count, nbytes) in sorted(sums.items()):
            rows.append([name, kind, axes, count, f"{nbytes / 1e6:.2f}"])
    return format_table(["variant", "collective", "axes", "count", "MB"], rows)


def case_main(argv: list[str] | None = None) -> None:
    """`python benchmarks/_harness.py --case NAME --out FILE`: one case, JSON to FILE."""
    parser = argparse.ArgumentParser(description=case_main.__doc__)
    parser.add_argument("--case", required=True)
    parser.add_argument("--out", help="the JSON file to write (timed runs)")
    parser.add_argument("--sizes", choices=SIZES, default="full")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--collectives", action="store_true", help="print the collectives by kind; no timing"
    )
    args = parser.parse_args(argv)
    case = all_cases()[args.case]
    from _common import start_devices

    gpu = args.sizes.startswith("gpu")
    described = start_devices(0 if gpu and args.sizes == "gpu" else case.devices)
    import jax

    start = time.perf_counter()
    built = case.build(args.sizes)
    if args.collectives:
        print(f"{built.title}\n\n{collective_table(built)}")
        return
    dtype = "bfloat16" if gpu and jax.default_backend() != "cpu" else "float32"
    result = measure(built, repeats=args.repeats, warmup=args.warmup, peak_dtype=dtype)
    result.update(case=args.case, devices=described, seconds=time.perf_counter() - start)
    result.update(peak_dtype=dtype)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


# -- the driver ---------------------------------------------------------------------------


def run_case(name: str, out: str, *, sizes: str, repeats: int, warmup: int) -> dict | str:
    """Runs one case in a fresh process; its figures, or the error text if it failed."""
    command = [sys.executable, os.path.abspath(__file__), "--case", name, "--out", out]
    command += ["--sizes", sizes, "--repeats", str(repeats), "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        lines = [
            line
            for line in (done.stderr or done.stdout).strip().splitlines()
            if line.strip() and not line.startswith(("For simplicity", "-----"))
        ]
        return lines[-1] if lines else f"exit code {done.returncode}"
    with open(out) as f:
        return json.load(f)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def table(results: dict[str, dict | str]) -> str:
    """One Markdown table across cases: a line per variant, a line per failed case."""
    from _common import format_table

    headers = [
        "case / variant", "ms/step", "min-max ms", "x best base", "tokens/s", "MFU",
        "coll MB", "theory MB", "mem MiB", "compile s",
    ]  # fmt: skip
    rows = []
    for case, result in results.items():
        if isinstance(result, str):
            rows.append([f"{case}: FAILED: {result[:80]}"] + ["-"] * (len(headers) - 1))
            continue
        for r in result["rows"]:
            mark = " (base)" if r["baseline"] else ""
            rows.append(
                [
                    f"{case} / {r['variant']}{mark}",
                    f"{r['ms']:.1f}",
                    f"{r['ms_min']:.0f}-{r['ms_max']:.0f}",
                    f"{r['ratio']:.2f}",
                    f"{r['tokens_per_s']:.0f}",
                    f"{100 * r['mfu']:.1f}%",
                    _mb(r["coll_bytes"] or None),
                    _mb(r["theory_bytes"]),
                    f"{r['mem_bytes'] / 2**20:.1f}",
                    f"{r['compile_s']:.1f}",
                ]
            )
    return format_table(headers, rows)


def chart(results: dict[str, dict | str], path: str) -> None:
    """A PNG bar chart: each variant's step time over its case's best baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ratios, colours = [], [], []
    for case, result in results.items():
        if isinstance(result, str):
            continue
        for r in result["rows"]:
            labels.append(f"{case} / {r['variant']}")
            ratios.append(r["ratio"])
            colours.append("tab:grey" if r["baseline"] else "tab:blue")
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(labels) + 1.2))
    ax.barh(range(len(labels)), ratios, color=colours)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("step time / fastest baseline of the case (grey: baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def drive(
    names: Sequence[str], *, folder: str, sizes: str, repeats: int, warmup: int
) -> dict[str, dict | str]:
    """Runs the cases one process each, prints the table, writes JSON and the chart."""
    os.makedirs(folder, exist_ok=True)
    results: dict[str, dict | str] = {}
    for name in names:
        start = time.perf_counter()
        out = os.path.join(folder, f"{name}.json")
        results[name] = run_case(name, out, sizes=sizes, repeats=repeats, warmup=warmup)
        status = "FAILED: " + results[name] if isinstance(results[name], str) else "ok"
        print(f"({name}: {status}, {time.perf_counter() - start:.0f} s)", flush=True)
    text = table(results)
    print("\n" + text)
    with open(os.path.join(folder, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    chart(results, os.path.join(folder, "bench.png"))
    print(f"\nwrote {folder}/bench.json and {folder}/bench.png")
    return results


if __name__ == "__main__":
    case_main()
