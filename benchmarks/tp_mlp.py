"""A transformer MLP block, forward and backward, timed six ways in one run.

The block is `x -> gelu(x W1^T + b1) W2^T + b2` with `x: (batch, seq, h)`, `W1: (4h, h)`
and `W2: (h, 4h)` (the layout of `eqx.nn.Linear`). One step is the loss
`sum(block(x) ** 2)` and its gradients with respect to `x` and all four parameters.

Variants, all computing the same numbers from the same weights:

1. `dense, 1 device`: `jax.jit` of the dense step on one device. Every ratio is
   against this one.
2. `GSPMD`: the same dense step under `jax.jit`, its inputs placed with
   `NamedSharding` (batch over `data`, `W1` by rows and `W2` by columns over `tensor`),
   XLA's SPMD partitioner choosing the collectives.
3. `eqxpar TP`: `ColumnParallelLinear` -> `RowParallelLinear` in
   `eqxpar.filter_shard_map` (one all-reduce forward, one backward).
4. `eqxpar TP+SP`: the same with `sequence_parallel=True` (all-gather + reduce-scatter).
5. `eqxpar async uni` / 6. `eqxpar async bidi`: `collective_matmul="unidirectional"` /
   `"bidirectional"`, the sequence collectives as rings of collective-permutes.

`--hlo-diff` prints, instead, GSPMD's and eqxpar TP's compiled steps dot by dot (shapes,
contracting dims, the kernel XLA chose, each dot timed alone) beside the step times,
with a third column: eqxpar TP traced with the layers' matmul written `x @ weight.T`, as
it was before `linear_matmul` (the weight-gradient dots then leave YNNPACK on XLA:CPU).

Run alone with `python benchmarks/tp_mlp.py --help` for the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import _hlo_dots
import equinox as eqx
import jax
import jax.numpy as jnp
from _common import (
    add_common_flags,
    check_close,
    collective_cells,
    compile_timed,
    format_table,
    make_mesh,
    mesh_text,
    peak_matmul,
    start_devices,
    time_round_robin,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eqxpar as ep
import eqxpar.nn._linear as eqxpar_linear
from eqxpar.nn import ColumnParallelLinear, RowParallelLinear
from eqxpar.profile import CollectiveReport, count_collectives

Params = dict[str, jax.Array]
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute")
PEAK_N = 2048
PEAK = "peak matmul"
SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "collective-permute": "CP"}


# -- the dense computation (the plain-JAX alternatives) ---------------------------------


def init_params(h: int, key: jax.Array) -> Params:
    """Weights of two `eqx.nn.Linear` layers, `h -> 4h -> h`, as a dict.

    **Returns:**

    `{"w1": (4h, h), "b1": (4h,), "w2": (h, 4h), "b2": (h,)}`, global arrays.
    """
    k1, k2 = jax.random.split(key)
    up, down = eqx.nn.Linear(h, 4 * h, key=k1), eqx.nn.Linear(4 * h, h, key=k2)
    assert up.bias is not None and down.bias is not None
    return {"w1": up.weight, "b1": up.bias, "w2": down.weight, "b2": down.bias}


def dense_mlp(params: Params, x: jax.Array) -> jax.Array:
    """The MLP block on `(..., h)` inputs, exactly what `eqx.nn.Linear` computes."""
    hidden = jax.nn.gelu(x @ params["w1"].T + params["b1"])
    return hidden @ params["w2"].T + params["b2"]


def dense_step(params: Params, x: jax.Array) -> tuple[jax.Array, Params]:
    """The loss `sum(mlp(x) ** 2)` and its gradients.

    **Returns:**

    `(loss, grads)`, `grads` holding `w1, b1, w2, b2` and `x`.
    """

    def loss(p: Params, x: jax.Array) -> jax.Array:
        return jnp.sum(dense_mlp(p, x) ** 2)

    value, (grads, grad_x) = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    return value, {**grads, "x": grad_x}


# -- the eqxpar block ---------------------------------------------------------------------


class TPMLP(eqx.Module):
    """The MLP block from eqxpar's layers: column-parallel up, row-parallel down."""

    up: ColumnParallelLinear
    down: RowParallelLinear

    def __init__(self, params: Params, *, key: jax.Array, **parallel: Any):
        """**Arguments:**

        - `params`: the dense weights (`init_params`), copied in exactly.
        - `key`: PRNG key (the initial weights are replaced by `params`).
        - `**parallel`: `sequence_parallel` and `collective_matmul`, for both layers.
        """
        out_h, h = params["w1"].shape
        k1, k2 = jax.random.split(key)
        up = ColumnParallelLinear(h, out_h, **parallel, key=k1)
        down = RowParallelLinear(out_h, h, **parallel, key=k2)
        self.up = eqx.tree_at(lambda m: (m.weight, m.bias), up, (params["w1"], params["b1"]))
        self.down = eqx.tree_at(lambda m: (m.weight, m.bias), down, (params["w2"], params["b2"]))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Per-shard `(batch, seq, h)` in and out (`seq` split over `tensor` with SP)."""
        return self.down(jax.nn.gelu(self.up(x)))


def eqxpar_step(mesh: jax.sharding.Mesh, x_spec: P) -> Callable:
    """The step of `dense_step` for a `TPMLP`, its block inside `filter_shard_map`.

    **Arguments:**

    - `mesh`: the mesh.
    - `x_spec`: the spec of `x` and of the block's output.

    **Returns:**

    A `filter_jit`-ed `step(mlp, x) -> (loss, grads)`, `grads` keyed like `dense_step`'s.
    """
    block = ep.filter_shard_map(
        lambda mlp, x: mlp(x), mesh=mesh, in_specs=(None, x_spec), out_specs=x_spec
    )

    @eqx.filter_jit
    def step(mlp: TPMLP, x: jax.Array) -> tuple[jax.Array, Params]:
        loss = eqx.filter_value_and_grad(lambda mx: jnp.sum(block(*mx) ** 2))
        value, (g, grad_x) = loss((mlp, x))
        names = {"w1": g.up.weight, "b1": g.up.bias, "w2": g.down.weight, "b2": g.down.bias}
        return value, {**names, "x": grad_x}

    return step


# -- the six variants ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """A way to run the step: `build(params, x, mesh)` gives the jitted step and its
    placed arguments."""

    name: str
    build: Callable[[Params, jax.Array, jax.sharding.Mesh], tuple[Any, tuple]]


def _dense_one_device(params: Params, x: jax.Array, mesh: jax.sharding.Mesh):
    """Variant 1: everything on the mesh's first device."""
    device = mesh.devices.flat[0]
    return jax.jit(dense_step), jax.device_put((params, x), device)


def _gspmd(params: Params, x: jax.Array, mesh: jax.sharding.Mesh):
    """Variant 2: Megatron's placement as `NamedSharding`s; XLA picks the collectives."""
    specs = {"w1": P("tensor"), "b1": P("tensor"), "w2": P(None, "tensor"), "b2": P()}
    placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    return jax.jit(dense_step), (placed, jax.device_put(x, NamedSharding(mesh, P("data"))))


def _eqxpar(**parallel: Any) -> Callable:
    """Variants 3-6: a `TPMLP` with these layer options, placed by its declared specs."""

    def build(params: Params, x: jax.Array, mesh: jax.sharding.Mesh):
        x_spec = P("data", "tensor") if parallel.get("sequence_parallel") else P("data")
        mlp = ep.place(TPMLP(params, **parallel, key=jax.random.key(0)), mesh)
        return eqxpar_step(mesh, x_spec), (mlp, jax.device_put(x, NamedSharding(mesh, x_spec)))

    return build


VARIANTS = (
    Variant("dense, 1 device", _dense_one_device),
    Variant("GSPMD (jit + NamedSharding)", _gspmd),
    Variant("eqxpar TP", _eqxpar()),
    Variant("eqxpar TP+SP", _eqxpar(sequence_parallel=True)),
    Variant(
        "eqxpar async uni",
        _eqxpar(sequence_parallel=True, collective_matmul="unidirectional"),
    ),
    Variant(
        "eqxpar async bidi",
        _eqxpar(sequence_parallel=True, collective_matmul="bidirectional"),
    ),
)


# -- checks and reporting -----------------------------------------------------------------


def step_flops(batch: int, seq: int, h: int) -> int:
    """FLOPs of one step: forward 2 matmuls of `2 * b*s*h*4h` each, backward twice that
    (input and weight gradients); biases and GELU not counted."""
    forward = 2 * (2 * batch * seq * h * 4 * h)
    return 3 * forward


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(
        description="Tensor-parallel MLP block (h -> 4h -> h), forward + backward: plain "
        "JAX against eqxpar's sync, sequence-parallel and async layers."
    )
    add_common_flags(parser)
    parser.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    parser.add_argument("--hidden", type=int, default=512, help="h; the MLP is 4h (default 512)")
    parser.add_argument(
        "--rtol",
        type=float,
        default=1e-4,
        help="allowed relative error of each variant's loss and gradients (default 1e-4)",
    )
    parser.add_argument(
        "--hlo-diff",
        action="store_true",
        help="instead of the six variants: GSPMD's and eqxpar TP's compiled dots one by one "
        "(and eqxpar TP with the old x @ weight.T), each timed alone, beside the steps",
    )
    return parser


def check_sizes(args: argparse.Namespace) -> None:
    """Fails early, with the fix, on sizes the mesh cannot split."""
    data, tensor = args.mesh["data"], args.mesh["tensor"]
    if args.batch % data:
        raise SystemExit(f"tp_mlp: --batch {args.batch} must be a multiple of data={data}.")
    if args.seq % (2 * tensor):
        raise SystemExit(
            f"tp_mlp: --seq {args.seq} must be a multiple of 2 * tensor = {2 * tensor}: "
            f"sequence parallelism splits it {tensor} ways and the bidirectional ring "
            f"halves each block."
        )
    if (4 * args.hidden) % tensor:
        raise SystemExit(f"tp_mlp: 4 * --hidden must be a multiple of tensor={tensor}.")


@dataclasses.dataclass(frozen=True)
class Measured:
    """What one variant gave: compile seconds, the collectives of its compiled step, and
    its errors against the baseline (loss, worst gradient)."""

    compile_s: float
    collectives: CollectiveReport
    loss_err: float
    grad_err: float


def measure(
    args: argparse.Namespace, mesh: jax.sharding.Mesh
) -> tuple[dict[str, Measured], dict[str, float], float]:
    """Compiles and checks every variant, then times them all round-robin.

    A one-device square matmul (`PEAK_N`) is timed in the same rounds, as the peak.

    **Returns:**

    Variant name -> `Measured`, variant name -> median ms per step, and the peak in
    GFLOP/s.
    """
    kx, kp = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (args.batch, args.seq, args.hidden))
    params = init_params(args.hidden, kp)
    peak_fn, peak_args, peak_flops = peak_matmul(mesh.devices.flat[0], PEAK_N)
    measured, calls, reference = {}, {PEAK: (peak_fn, peak_args)}, None
    for variant in VARIANTS:
        jitted, placed = variant.build(params, x, mesh)
        compiled, seconds = compile_timed(jitted, *placed)
        out = jax.block_until_ready(compiled(*placed))
        reference = out if reference is None else reference
        errs = check_close(
            out,
            reference,
            rtol=args.rtol,
            what=f"tp_mlp: variant {variant.name!r}",
            baseline="the single-device dense baseline",
            fix="The parallel schedule is wrong; run the tests (make test).",
        )
        measured[variant.name] = Measured(seconds, count_collectives(compiled, mesh), *errs)
        calls[variant.name] = (compiled, placed)
    median_ms = time_round_robin(calls, repeats=args.repeats, warmup=args.warmup)
    peak = peak_flops / (median_ms.pop(PEAK) * 1e-3) / 1e9
    return measured, median_ms, peak


def report(
    args: argparse.Namespace,
    devices: str,
    peak: float,
    measured: dict[str, Measured],
    median_ms: dict[str, float],
) -> str:
    """The header, the timing table, the collectives table and the caveat, as text."""
    b, s, h = args.batch, args.seq, args.hidden
    flops = step_flops(b, s, h)
    base = median_ms[VARIANTS[0].name]
    timing = []
    for name, ms in median_ms.items():
        m, rate = measured[name], flops / (ms * 1e-3) / 1e9
        timing.append(
            (name, f"{m.compile_s:.2f}", f"{ms:.1f}", f"{ms / base:.2f}", f"{rate:.0f}",
             f"{100 * rate / peak:.0f}%", f"{m.loss_err:.0e}", f"{m.grad_err:.0e}")
        )  # fmt: skip
    comms = [
        (name, *collective_cells(measured[name].collectives, KINDS, "tensor", others=True))
        for name in median_ms
    ]
    lines = [
        f"## tp_mlp: MLP block h={h} -> {4 * h} -> {h}, batch={b}, seq={s}, f32, "
        f"forward + backward",
        f"devices: {devices}; mesh {mesh_text(args.mesh)}",
        f"median of {args.repeats} timed steps per variant (round-robin, {args.warmup} "
        f"warm-up each); FLOPs per step {flops / 1e9:.2f} G = forward 2 matmuls of "
        f"2*b*s*h*4h, backward twice the forward",
        f"peak: a {PEAK_N}x{PEAK_N} f32 matmul on one device, timed in the same rounds: "
        f"{peak:.0f} GFLOP/s",
        "",
        format_table(
            (
                "variant",
                "compile s",
                "median ms",
                "x base",
                "GFLOP/s",
                "% peak",
                "loss err",
                "grad err",
            ),
            timing,
        ),  # fmt: skip
        "",
        "Collectives in the compiled step, `count / MB`: executions, and per-device output "
        "bytes summed",
        "(1 MB = 1e6 B). AR/AG/RS/CP: all-reduce, all-gather, reduce-scatter, "
        "collective-permute over",
        "`tensor` alone; `other`: collectives over any other axes (data-parallel gradient "
        "sums, the loss).",
        "",
        format_table(("variant", *(f"{SHORT[k]} tensor" for k in KINDS), "other"), comms),
    ]
    if jax.devices()[0].platform == "cpu" and len(jax.devices()) > 1:
        lines += [
            "",
            f"Note: the {len(jax.devices())} simulated devices share this machine's "
            f"{os.cpu_count()} CPU core(s) with the single-device",
            "baseline, and collectives are memory copies: this measures each schedule's "
            "overhead and",
            "correctness, not speed-up (an `x base` below 1 only means 8 device threads kept "
            "the cores",
            "busier than one device's program). Real speed-ups need a multi-GPU machine: "
            "--devices 0 there.",
        ]
    return "\n".join(lines)


# -- --hlo-diff: the compiled steps of GSPMD and eqxpar TP, dot by dot -------------------

OLD_MATMUL = "eqxpar TP, x @ weight.T"
ROLE_ORDER = ("fwd", "bwd dX", "bwd dW")
SUMMARY_HEADERS = ("step", "YNNPACK dots", "other dots", "layout copies", "sum dots alone ms",
                   "step ms", "x GSPMD")  # fmt: skip


@contextlib.contextmanager
def transposed_weight_matmul():
    """Traces eqxpar's TP layers with their matmul written `x @ weight.T`, as it was
    before `linear_matmul`: the `pvary` of the weight then comes after its transpose."""
    saved = eqxpar_linear.linear_matmul
    eqxpar_linear.linear_matmul = lambda x, weight: x @ weight.T
    try:
        yield
    finally:
        eqxpar_linear.linear_matmul = saved


def diff_steps(params: Params, x: jax.Array, mesh: jax.sharding.Mesh) -> dict[str, tuple]:
    """GSPMD, eqxpar TP and eqxpar TP with `x @ weight.T`: name -> (compiled, args)."""
    steps = {}
    for name, build, old in (
        (VARIANTS[1].name, _gspmd, False),
        (VARIANTS[2].name, _eqxpar(), False),
        (OLD_MATMUL, _eqxpar(), True),
    ):
        with transposed_weight_matmul() if old else contextlib.nullcontext():
            jitted, placed = build(params, x, mesh)
            steps[name] = (compile_timed(jitted, *placed)[0], placed)
    return steps


def dot_role(dot: _hlo_dots.HloDot, tokens: int) -> str:
    """`fwd`; backward, `bwd dW` when it contracts the tokens, else `bwd dX`."""
    if not dot.backward:
        return "fwd"
    return "bwd dW" if dot.contracted == tokens else "bwd dX"


def _alone_key(dot: _hlo_dots.HloDot) -> str:
    """The name of this dot's shapes and dimension numbers timed alone."""
    return f"dot {dot.text()} {dot.dims_text()}"


def dot_table(dots: dict[str, list], tokens: int, ms: dict, alone_kernel: dict) -> str:
    """One row per kind of dot of each step: role, shapes, contracting dims, kernel, how
    many, and one such dot compiled alone: its time and the kernel it gets alone."""
    rows = []
    for name, found in dots.items():
        kinds: dict[tuple, list] = {}
        for dot in found:
            kinds.setdefault((dot_role(dot, tokens), dot.text(), dot.dims_text()), []).append(dot)
        for key in sorted(kinds, key=lambda k: (ROLE_ORDER.index(k[0]), k[1:])):
            same = kinds[key]
            alone = _alone_key(same[0])
            kernels = "/".join(sorted({d.kernel for d in same}))
            rows.append((name, *key, kernels, len(same), f"{ms[alone]:.2f}", alone_kernel[alone]))
    headers = ("step", "role", "dot (lhs x rhs -> out)", "contracting", "kernel in step", "n",
               "alone ms", "kernel alone")  # fmt: skip
    return format_table(headers, rows)


def hlo_diff(args: argparse.Namespace, devices: str, mesh: jax.sharding.Mesh) -> str:
    """Compiles the three steps of `diff_steps`, lists their dots, times every distinct
    dot alone on one device and the steps, all round-robin, and formats the tables."""
    kx, kp = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (args.batch, args.seq, args.hidden))
    steps = diff_steps(init_params(args.hidden, kp), x, mesh)
    texts = {name: _hlo_dots.compiled_text(c) for name, (c, _) in steps.items()}
    dots = {name: _hlo_dots.parse_dots(text) for name, text in texts.items()}
    calls, alone_kernel = dict(steps), {}
    for dot in (d for found in dots.values() for d in found):
        if _alone_key(dot) not in calls:
            fn, operands, kernel = _hlo_dots.isolated(dot, mesh.devices.flat[0])
            calls[_alone_key(dot)], alone_kernel[_alone_key(dot)] = (fn, operands), kernel
    ms = time_round_robin(calls, repeats=args.repeats, warmup=args.warmup)
    tokens = args.batch // args.mesh["data"] * args.seq
    table = dot_table(dots, tokens, ms, alone_kernel)
    base = ms[VARIANTS[1].name]
    summary = []
    for name, found in dots.items():
        ynn = sum(d.kernel == "YNNPACK" for d in found)
        copies = _hlo_dots.layout_copies(texts[name])
        summary.append(
            (name, ynn, len(found) - ynn, len(copies),
             f"{sum(ms[_alone_key(d)] for d in found):.1f}", f"{ms[name]:.1f}",
             f"{ms[name] / base:.3f}")
        )  # fmt: skip
    return hlo_diff_text(args, devices, table, summary)


def hlo_diff_text(args: argparse.Namespace, devices: str, table: str, summary: list) -> str:
    """`hlo_diff`'s header, tables and notes, as text."""
    b, s, h = args.batch, args.seq, args.hidden
    lines = [
        f"## tp_mlp --hlo-diff: MLP block h={h} -> {4 * h} -> {h}, batch={b}, seq={s}, f32",
        f"devices: {devices}; mesh {mesh_text(args.mesh)}; median of {args.repeats} "
        f"round-robin calls (steps and the dots alone, alternated)",
        "",
        "Dots of each compiled step (per device). `alone ms`: that dot compiled by itself "
        "(`lax.dot_general`, row-major operands) on one device.",
        "",
        table,
        "",
        format_table(SUMMARY_HEADERS, summary),
        "",
        "`layout copies`: copies and transposes of rank >= 2 outside fusion bodies. "
        "`sum dots alone ms`: one device's dots, each at its time alone.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints its tables."""
    args = build_parser().parse_args(argv)
    check_sizes(args)
    devices = start_devices(args.devices)
    mesh = make_mesh(args.mesh)
    if args.hlo_diff:
        print(hlo_diff(args, devices, mesh))
        return
    measured, median_ms, peak = measure(args, mesh)
    print(report(args, devices, peak, measured, median_ms))


if __name__ == "__main__":
    main()
