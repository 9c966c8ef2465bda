"""Compile time of a Transformer training step: layers scanned against layers unrolled.

`models.Transformer` stacks its blocks on a leading dim and runs them with
`jax.lax.scan`, so the program XLA compiles holds one block body whatever the depth.
This benchmark checks that claim on a full training step, the loss and its gradients
with respect to the whole model:

    eqx.filter_jit(eqx.filter_value_and_grad(filter_shard_map(loss, mesh=...)))

on a `data x tensor` mesh (default `data=2,tensor=4`), for several depths, two ways:

1. `scan`: `models.Transformer` itself (`Transformer.per_token_loss`).
2. `unrolled`: the plain-JAX alternative, the same weights and the same
   `models.TransformerBlock`s, unstacked into a Python list (`a[i]` of every stacked
   array) and called in a Python for-loop inside the same `filter_shard_map`. JAX then
   traces, and XLA compiles, every layer separately.

Each step is traced and lowered (`.lower(...)`), then compiled (`.compile()`), timed
apart. Every compile uses a fresh `filter_jit` of fresh functions, so no cache of JAX's
hides the cost (the persistent compilation cache is switched off). The scanned steps are
compiled `--compile-repeats` times, round-robin over the depths, and the median is
reported; the unrolled ones once each (the deep ones are slow). Both versions are then
run once and their losses and gradients compared, and their step times measured.

The issue's acceptance: the scanned `--compare` deep model (default 24 layers) compiles
in under `--max-ratio` (1.5) times the time of the shallow one (2 layers). `main` exits
non-zero when it does not. By default (`--judge cpu`) the times compared are the CPU
seconds the compiles take (all threads): on a shared machine their wall time swings by
2x with other jobs' load, their CPU time does not. `--judge wall` compares the median
wall times instead, for a quiet machine. Both ratios are printed.

Run alone with `python benchmarks/transformer_compile.py --help` for the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from _common import (
    add_common_flags,
    check_close,
    format_table,
    make_mesh,
    mesh_text,
    ratio,
    start_devices,
    time_round_robin,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eqxpar as ep
from eqxpar.nn import LayerNorm, RMSNorm, VocabParallelEmbedding, vocab_parallel_cross_entropy
from models import Transformer, TransformerBlock, TransformerConfig

KINDS = ("scan", "unrolled")
JUDGED = {"cpu": "CPU time", "wall": "wall time"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = ", re.MULTILINE)


# -- the unrolled alternative ---------------------------------------------------------------


class UnrolledTransformer(eqx.Module):
    """`models.Transformer` with its blocks in a Python list, run by a Python loop.

    Built from a `Transformer`, it shares every weight: the embedding, final norm and
    head as they are, and block `i` as the `i`-th slice of the stacked layers. Its
    forward pass is `Transformer.__call__` with the scan replaced by a for-loop.
    """

    embed: VocabParallelEmbedding
    blocks: list[TransformerBlock]
    norm: RMSNorm | LayerNorm
    head: Any  # a ColumnParallelLinear
    config: TransformerConfig = eqx.field(static=True)

    def __init__(self, model: Transformer):
        """**Arguments:**

        - `model`: the scanned model to unstack (untied head, no dropout, one dtype).
        """
        c = model.config
        if c.tie_embeddings or c.dropout or c.attention_dropout or c.remat != "none":
            raise ValueError("UnrolledTransformer: untied head, no dropout, no remat only.")
        if c.param_dtype != c.compute_dtype:
            raise ValueError("UnrolledTransformer: param_dtype must equal compute_dtype.")
        dynamic, static = eqx.partition(model.layers, eqx.is_array)
        self.blocks = [
            eqx.combine(jax.tree.map(lambda a, i=i: a[i], dynamic), static)
            for i in range(c.num_layers)
        ]
        self.embed, self.norm, self.head, self.config = model.embed, model.norm, model.head, c

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """`(batch, seq)` tokens -> per-shard logits `(batch, seq, vocab / t)`."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def per_token_loss(self, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        """As `Transformer.per_token_loss`: vocab-parallel cross-entropy per position."""
        return vocab_parallel_cross_entropy(self(tokens), targets, axis_name=self.config.axis_name)

    def stacked_grads(self) -> dict[str, Any]:
        """This model's arrays laid out like a `Transformer`'s (blocks stacked), by part."""
        blocks = [eqx.filter(b, eqx.is_array) for b in self.blocks]
        layers = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
        return {"embed": self.embed, "layers": layers, "norm": self.norm, "head": self.head}


def parts(model: Transformer) -> dict[str, Any]:
    """A `Transformer`'s arrays by part, to compare with `UnrolledTransformer.stacked_grads`."""
    return {"embed": model.embed, "layers": model.layers, "norm": model.norm, "head": model.head}


# -- the step ------------------------------------------------------------------------------


def make_step(mesh: jax.sharding.Mesh, tokens: int) -> Callable:
    """A new `filter_jit`-ed training step, built from new functions on every call.

    **Arguments:**

    - `mesh`: the mesh; the batch is split over `data`, the model by its declared specs.
    - `tokens`: tokens in the global batch (the loss is their mean).

    **Returns:**

    `step(model, x, y) -> (loss, grads)`, for a `Transformer` or an `UnrolledTransformer`.
    Fresh closures each time: JAX's tracing and compilation caches cannot be hit.
    """

    def local_loss(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jax.lax.psum(jnp.sum(model.per_token_loss(x, y)), "data") / tokens

    loss = ep.filter_shard_map(
        local_loss, mesh=mesh, in_specs=(None, P("data"), P("data")), out_specs=P()
    )
    return eqx.filter_jit(eqx.filter_value_and_grad(loss))


def cpu_seconds() -> float:
    """CPU time of this process, all threads, plus that of its finished child processes
    (a GPU compiler may run `ptxas` as one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One lowering and compilation of a step: wall seconds for `.lower` and for
    `.compile`, CPU seconds of `.compile` (`cpu_seconds`), the program, and its
    optimized HLO's instruction and `while`-loop counts."""

    lower_s: float
    compile_s: float
    compile_cpu_s: float
    program: Any
    instructions: int
    whiles: int


def compile_step(mesh: jax.sharding.Mesh, args: tuple) -> Compiled:
    """Builds a fresh step, then times its `.lower(*args)` and `.compile()` apart."""
    step = make_step(mesh, int(args[1].size))
    start = time.perf_counter()
    lowered = step.lower(*args)
    lowered_at, cpu_at = time.perf_counter(), cpu_seconds()
    program = lowered.compile()
    compile_s, cpu_s = time.perf_counter() - lowered_at, cpu_seconds() - cpu_at
    text = getattr(program, "compiled", program).as_text()
    return Compiled(
        lowered_at - start,
        compile_s,
        cpu_s,
        program,
        len(_INSTRUCTION.findall(text)),
        text.count(" while("),
    )


def check_same(layers: int, scan_out: tuple, unrolled_out: tuple, rtol: float) -> float:
    """Aborts unless both versions give the same loss and gradients; returns the largest
    relative error over the loss and every gradient array."""
    (loss, grads), (ref_loss, ref_grads) = scan_out, unrolled_out
    errs = check_close(
        (loss, parts(grads)),
        (ref_loss, ref_grads.stacked_grads()),
        rtol=rtol,
        what=f"transformer_compile: the scanned {layers}-layer model",
        baseline="the unrolled one",
        fix="The unrolled alternative is not the same model.",
    )
    return max(errs)


# -- flags, measurement, report ----------------------------------------------------------


def int_list(text: str) -> list[int]:
    """`"1,2,8"` -> `[1, 2, 8]`, each at least 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: write positive integers joined by commas")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(
        description="Compile time of a Transformer training step (loss + gradients in "
        "filter_shard_map) by depth: layers run with jax.lax.scan against a Python loop."
    )
    add_common_flags(parser)  # --repeats / --warmup: the step-time measurement
    parser.add_argument(
        "--layers", type=int_list, default=[1, 2, 8, 24], help="depths (default 1,2,8,24)"
    )
    parser.add_argument(
        "--compare",
        type=int_list,
        default=[2, 24],
        help="SHALLOW,DEEP: the depths of the acceptance ratio (default 2,24); added to --layers",
    )
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=1.5,
        help="pass when the scanned compile time at DEEP / at SHALLOW is below this (default 1.5)",
    )
    parser.add_argument(
        "--judge",
        choices=("cpu", "wall"),
        default="cpu",
        help="which compile time --max-ratio applies to: 'cpu' (default; the compile's CPU "
        "seconds, steady on a shared machine) or 'wall' (median wall seconds; use it on a "
        "quiet machine)",
    )
    parser.add_argument(
        "--compile-repeats",
        type=int,
        default=3,
        help="compiles per scanned depth, round-robin; the median is shown (default 3)",
    )
    parser.add_argument(
        "--unrolled-max-layers",
        type=int,
        default=24,
        help="skip the unrolled version above this depth: its compile grows with depth "
        "(default 24, about 5-15 s here)",
    )
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary (default 256)")
    parser.add_argument("--dim", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--seq", type=int, default=64, help="sequence length (default 64)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    parser.add_argument(
        "--rtol",
        type=float,
        default=1e-4,
        help="allowed relative error between the two versions' loss and gradients",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Fails early, with the fix, on flags that cannot work."""
    data, tensor = args.mesh["data"], args.mesh["tensor"]
    if len(args.compare) != 2 or args.compare[0] >= args.compare[1]:
        raise SystemExit("transformer_compile: --compare takes SHALLOW,DEEP, SHALLOW < DEEP.")
    if args.batch % data:
        raise SystemExit(f"transformer_compile: --batch must be a multiple of data={data}.")
    for flag, value in (("--vocab", args.vocab), ("--heads", args.heads)):
        if value % tensor:
            raise SystemExit(f"transformer_compile: {flag} must be a multiple of tensor={tensor}.")
    if args.compile_repeats < 1:
        raise SystemExit("transformer_compile: --compile-repeats must be at least 1.")
    args.layers = sorted({*args.layers, *args.compare})


@dataclasses.dataclass
class Depth:
    """Everything measured at one depth: the scanned compiles (one per repeat), the
    unrolled compile (None when skipped), the largest scan-vs-unrolled error, and the
    median step ms of each version."""

    scan: list[Compiled] = dataclasses.field(default_factory=list)
    unrolled: Compiled | None = None
    error: float | None = None
    step_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    def median(self, field: str) -> float:
        return statistics.median(getattr(c, field) for c in self.scan)


def measure(args: argparse.Namespace, mesh: jax.sharding.Mesh) -> dict[int, Depth]:
    """Compiles, checks and times both versions at every depth in `args.layers`."""
    kx, km = jax.random.split(jax.random.key(0))
    x = jax.random.randint(kx, (args.batch, args.seq), 0, args.vocab)
    batch = NamedSharding(mesh, P("data"))
    x, y = jax.device_put(x, batch), jax.device_put(jnp.roll(x, -1, axis=1), batch)
    models: dict[int, dict[str, Any]] = {}
    for layers in args.layers:
        config = TransformerConfig(
            vocab_size=args.vocab,
            dim=args.dim,
            num_layers=layers,
            num_heads=args.heads,
            max_seq_len=args.seq,
        )
        scanned = Transformer(config, key=km)
        models[layers] = {"scan": ep.place(scanned, mesh)}
        if layers <= args.unrolled_max_layers:
            models[layers]["unrolled"] = ep.place(UnrolledTransformer(scanned), mesh)
    # One untimed compile first: the process's first one pays one-off start-up costs.
    compile_step(mesh, (models[args.layers[0]]["scan"], x, y))
    results = {layers: Depth() for layers in args.layers}
    for _ in range(args.compile_repeats):
        for layers in args.layers:  # round-robin: machine load hits every depth alike
            results[layers].scan.append(compile_step(mesh, (models[layers]["scan"], x, y)))
    calls = {}
    for layers, depth in results.items():
        if "unrolled" in models[layers]:
            depth.unrolled = compile_step(mesh, (models[layers]["unrolled"], x, y))
        for kind in models[layers]:
            program = (depth.scan[-1] if kind == "scan" else depth.unrolled).program
            calls[(layers, kind)] = (program, (models[layers][kind], x, y))
        if depth.unrolled is not None:
            outs = [jax.block_until_ready(fn(*a)) for fn, a in (calls[(layers, k)] for k in KINDS)]
            depth.error = check_same(layers, outs[0], outs[1], args.rtol)
    step_ms = time_round_robin(calls, repeats=args.repeats, warmup=args.warmup)
    for (layers, kind), ms in step_ms.items():
        results[layers].step_ms[kind] = ms
    return results


def report(args: argparse.Namespace, devices: str, results: dict[int, Depth]) -> tuple[str, bool]:
    """The header, the two tables and the verdict, as text; and whether it passed."""
    shallow, deep = (results[n] for n in args.compare)

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def unrolled(depth: Depth, field: str) -> float | None:
        return None if depth.unrolled is None else getattr(depth.unrolled, field)

    fields = ("lower_s", "compile_s", "compile_cpu_s")
    rows = [
        (n, *(secs(d.median(f)) for f in fields), *(secs(unrolled(d, f)) for f in fields))
        for n, d in results.items()
    ]
    rows.append(
        (f"{args.compare[1]} / {args.compare[0]}",
         *(ratio(deep.median(f), shallow.median(f)) for f in fields),
         *(ratio(unrolled(deep, f), unrolled(shallow, f)) for f in fields))
    )  # fmt: skip
    programs = [
        (n, d.scan[-1].instructions, d.scan[-1].whiles,
         "-" if d.unrolled is None else d.unrolled.instructions,
         "-" if d.unrolled is None else d.unrolled.whiles,
         f"{d.step_ms['scan']:.1f}",
         f"{d.step_ms['unrolled']:.1f}" if "unrolled" in d.step_ms else "-",
         "-" if d.error is None else f"{d.error:.0e}")
        for n, d in results.items()
    ]  # fmt: skip
    wall_ratio = deep.median("compile_s") / shallow.median("compile_s")
    cpu_ratio = deep.median("compile_cpu_s") / shallow.median("compile_cpu_s")
    judged, other = (cpu_ratio, wall_ratio) if args.judge == "cpu" else (wall_ratio, cpu_ratio)
    passed = judged < args.max_ratio
    skipped = ", ".join(str(n) for n, d in results.items() if d.unrolled is None)
    skip_note = f" (skipped above --unrolled-max-layers: {skipped})" if skipped else ""
    lines = [
        "## transformer_compile: training-step compile time by depth, scan vs unrolled",
        f"devices: {devices}; mesh {mesh_text(args.mesh)}",
        f"model: vocab={args.vocab}, dim={args.dim}, heads={args.heads}, "
        f"mlp={4 * args.dim}, rmsnorm, gelu, f32; batch={args.batch}, seq={args.seq}",
        "step: filter_jit(filter_value_and_grad(filter_shard_map(loss))), gradients "
        "w.r.t. the whole model",
        f"scan: median of {args.compile_repeats} fresh compiles per depth (round-robin); "
        f"unrolled: 1 compile per depth{skip_note}",
        "s: wall seconds; CPU s: CPU seconds of the compile, all threads (XLA compiles on "
        "more than one)",
        "",
        format_table(
            (
                "layers",
                "scan trace+lower s",
                "scan compile s",
                "scan compile CPU s",
                "unrolled trace+lower s",
                "unrolled compile s",
                "unrolled compile CPU s",
            ),
            rows,
        ),
        "",
        f"scanned compile, {args.compare[1]} layers / {args.compare[0]} layers, in "
        f"{JUDGED[args.judge]}: x{judged:.2f} (< x{args.max_ratio:g} wanted): "
        f"{'PASS' if passed else 'FAIL'}",
        f"(in {JUDGED['wall' if args.judge == 'cpu' else 'cpu']}: x{other:.2f}; --judge "
        "picks which one decides)",
        "",
        "The compiled programs: HLO instructions (all computations) and `while` loops in "
        "the optimized HLO,",
        f"median ms per step ({args.repeats} timed round-robin, {args.warmup} warm-up), "
        "and the largest relative",
        "error between the two versions over the loss and every gradient.",
        "",
        format_table(
            (
                "layers",
                "scan HLO instrs",
                "scan whiles",
                "unrolled HLO instrs",
                "unrolled whiles",
                "scan step ms",
                "unrolled step ms",
                "max rel err",
            ),
            programs,
        ),
    ]
    return "\n".join(lines), passed


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints its tables; exits non-zero if the ratio fails."""
    args = build_parser().parse_args(argv)
    check_args(args)
    devices = start_devices(args.devices)
    if jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles
    mesh = make_mesh(args.mesh)
    text, passed = report(args, devices, measure(args, mesh))
    print(text, flush=True)
    if not passed:
        raise SystemExit(
            f"transformer_compile: FAIL: the scanned {args.compare[1]}-layer step compiles "
            f"in more than {args.max_ratio:g}x the {args.judge} time of the "
            f"{args.compare[0]}-layer one."
        )


if __name__ == "__main__":
    main()
