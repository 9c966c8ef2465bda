"""Per-device memory of a Transformer training step: DP, ZeRO-1, ZeRO-2 and FSDP.

For a `models.Transformer` big enough that its parameters dominate the step's memory,
on each `--mesh` (default `data=8` and `data=2,tensor=4`), and for each strategy
`dp`, `zero1`, `zero2`, `fsdp` of `eqxpar.train`:

1. the train state is built on the mesh with `eqxpar.train.init_state` (Adam);
2. the train step is compiled: `make_train_step(...).lower(state, x, y).compile()`;
3. `eqxpar.train.memory_report(state, strategy, mesh, compiled=compiled)` gives the
   per-device bytes of the parameters, gradients and optimizer state, the ZeRO paper's
   numbers for them, and the compiled step's temporaries (`memory_analysis`).

Two more rows per mesh:

- `fsdp, remat=full`: the FSDP state with `Transformer.with_config(remat="full")`, so
  each layer, its weight all-gathers included, is recomputed in the backward pass.
- `plain jax.jit DP`: the plain-JAX alternative, the same weights replicated with
  `NamedSharding(mesh, P())`, the batch split over `data`, `jax.jit` of
  `value_and_grad` and `optax.adam` (XLA's SPMD partitioner inserts the gradient
  all-reduce).

The check: FSDP keeps `1 / (data * tensor)` of the parameters and optimizer state on
each device, within `--tolerance` (5%); `main` exits non-zero when it does not.

A second table counts the collectives over `data` in each compiled step
(`eqxpar.profile.count_collectives(compiled, mesh)`), as the counter reports them
(per-device *output* bytes) and converted to the bytes a ring algorithm sends per
device, the measure the usual "FSDP moves 1.5x DP's volume" is stated in.

Run alone with `python benchmarks/memory.py --help` for the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _common import (
    add_run_flags,
    collective_cells,
    format_table,
    make_mesh,
    mesh_flag,
    mesh_text,
    mib,
    ratio,
    start_devices,
    temp_bytes,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from eqxpar.profile import CollectiveReport, count_collectives
from eqxpar.train import init_state, make_train_step, memory_report
from models import Transformer, TransformerConfig

STRATEGIES = ("dp", "zero1", "zero2", "fsdp")
REMAT = "fsdp, remat=full"
PLAIN = "plain jax.jit DP"
DEFAULT_MESHES = ("data=8", "data=2,tensor=4")
KINDS = ("all-reduce", "all-gather", "reduce-scatter")
SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS"}


def ring_factor(kind: str, n: int) -> float:
    """Bytes a ring algorithm sends per device, per byte of the op's per-device output,
    over a group of `n` devices.

    An all-reduce sends `2 (n-1)/n` of its (full-size) result, an all-gather `(n-1)/n`
    of its (full) result; a reduce-scatter sends `(n-1)/n` of its input, which is `n`
    times its result, so `n - 1` times the result. A permute sends its result once.
    """
    factors = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n,
               "reduce-scatter": n - 1, "all-to-all": (n - 1) / n}  # fmt: skip
    return factors.get(kind, 1.0)


def global_bytes(tree: Any) -> int:
    """Bytes of all of `tree`'s arrays, each counted once (global shapes)."""
    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree`'s arrays on the device holding the most of them."""
    totals: dict[Any, int] = {}
    for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values(), default=0)


# -- the variants ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One variant on one mesh: per-device bytes (measured and theory), the compiled
    step's temporaries, its collectives, and the seconds `init_state` and the compile
    took."""

    mesh: str
    name: str
    data_size: int
    params: int
    grads: int
    opt_state: int
    theory: float
    temp: int
    collectives: CollectiveReport
    init_s: float
    compile_s: float

    @property
    def states(self) -> int:
        return self.params + self.grads + self.opt_state

    @property
    def label(self) -> str:
        return f"{self.mesh}: {self.name}"


def loss_fn(model: Transformer, x: jax.Array, y: jax.Array, key: Any) -> jax.Array:
    """Mean next-token cross-entropy over this device's batch shard."""
    return jnp.mean(model.per_token_loss(x, y))


def plain_step(static: Any, optimizer: optax.GradientTransformation) -> Callable:
    """The plain-JAX data-parallel step: `jax.jit` of value-and-grad and the update.

    **Arguments:**

    - `static`: the model's non-array part (`eqx.partition(model, eqx.is_array)[1]`).
    - `optimizer`: the Optax optimizer.

    **Returns:**

    `step(params, opt_state, x, y) -> (params, opt_state, loss)`; placed on replicated
    parameters and a batch split over `data`, XLA's SPMD partitioner adds the gradient
    all-reduce.
    """

    @jax.jit
    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array):
        def loss(p: Any) -> jax.Array:
            return jnp.mean(eqx.combine(p, static).per_token_loss(x, y))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def eqxpar_row(
    mesh: jax.sharding.Mesh, name: str, kind: str, state: Any, batch: tuple, init_s: float
) -> Row:
    """Compiles eqxpar's train step for `state` and measures it with `memory_report`.

    **Arguments:**

    - `mesh`: the mesh; `name`: the row's name; `kind`: the strategy.
    - `state`: the `TrainState` (from `init_state` with this strategy).
    - `batch`: `(optimizer, x, y)`; `init_s`: the seconds `state` took to build.
    """
    optimizer, x, y = batch
    start = time.perf_counter()
    step = make_train_step(loss_fn, optimizer, mesh=mesh, strategy=kind)
    compiled = step.lower(state, x, y).compile()
    compile_s = time.perf_counter() - start
    report = memory_report(state, kind, mesh, compiled=compiled)
    theory = report.theory_params + report.theory_grads + report.theory_opt_state
    assert report.temp is not None
    return Row(mesh_text(dict(mesh.shape)), name, report.data_size, report.params, report.grads,
               report.opt_state, theory, report.temp, count_collectives(compiled, mesh),
               init_s, compile_s)  # fmt: skip


def measure_mesh(
    args: argparse.Namespace, sizes: dict[str, int], config: TransformerConfig
) -> tuple[list[Row], int]:
    """Builds, compiles and measures every variant on one mesh.

    **Returns:**

    The rows, and the global bytes of the parameters plus the Adam state (for the
    FSDP check).
    """
    mesh = make_mesh(sizes)
    optimizer = optax.adam(args.lr)
    x = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab)
    split = NamedSharding(mesh, P("data"))
    batch = (optimizer, jax.device_put(x, split), jax.device_put(jnp.roll(x, -1, axis=1), split))
    rows, states = [], {}
    for kind in STRATEGIES:
        start = time.perf_counter()
        states[kind] = init_state(Transformer, config, key=jax.random.key(0),
                                  optimizer=optimizer, mesh=mesh, strategy=kind)  # fmt: skip
        init_s = time.perf_counter() - start
        rows.append(eqxpar_row(mesh, kind, kind, states[kind], batch, init_s))
    fsdp = states["fsdp"]
    total = global_bytes(fsdp.model) + global_bytes(fsdp.opt_state)

    # FSDP with full remat: the same arrays, each layer recomputed in the backward pass.
    # The optimizer state holds the model's skeleton, config included: rebuild it too.
    model = fsdp.model.with_config(remat="full")
    skeleton = eqx.filter_eval_shape(optimizer.init, eqx.filter(model, eqx.is_array))
    opt_state = jax.tree.unflatten(jax.tree.structure(skeleton), jax.tree.leaves(fsdp.opt_state))
    remat = dataclasses.replace(fsdp, model=model, opt_state=opt_state)
    rows.append(eqxpar_row(mesh, REMAT, "fsdp", remat, batch, 0.0))

    # The plain-JAX alternative: the DP state's weights, replicated; jax.jit + optax.
    start = time.perf_counter()
    replicated = NamedSharding(mesh, P())
    params, static = eqx.partition(states["dp"].model, eqx.is_array)
    params = jax.device_put(params, replicated)
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
    built = time.perf_counter()
    compiled = plain_step(static, optimizer).lower(params, opt_state, *batch[1:]).compile()
    compile_s = time.perf_counter() - built
    param_bytes = per_device_bytes(params)
    rows.append(
        Row(mesh_text(sizes), PLAIN, sizes["data"], param_bytes, param_bytes,
            per_device_bytes(opt_state), 2 * global_bytes(params) + global_bytes(opt_state),
            temp_bytes(compiled),
            count_collectives(compiled, mesh), built - start, compile_s)
    )  # fmt: skip
    return rows, total


# -- flags, report -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(
        description="Per-device memory of a Transformer training step under DP, ZeRO-1, "
        "ZeRO-2 and FSDP (eqxpar.train.memory_report), against a plain jax.jit DP step."
    )
    add_run_flags(parser)  # --repeats is accepted (run.py passes it) but nothing is timed
    parser.add_argument(
        "--mesh",
        type=mesh_flag,
        action="append",
        help="a mesh to measure on, e.g. data=2,tensor=4; repeat the flag for several "
        f"(default: {' and '.join(DEFAULT_MESHES)})",
    )
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary (default 1024)")
    parser.add_argument("--dim", type=int, default=256, help="model width (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="layers (default 4)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--seq", type=int, default=64, help="sequence length (default 64)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="FSDP check: params + optimizer state per device within this fraction of "
        "their total / (data * tensor) (default 0.05)",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Fills in the default meshes; fails early, with the fix, on sizes they cannot split."""
    if not args.mesh:
        args.mesh = [mesh_flag(text) for text in DEFAULT_MESHES]
    for sizes in args.mesh:
        data, tensor = sizes["data"], sizes["tensor"]
        if args.batch % data:
            raise SystemExit(f"memory: --batch {args.batch} must be a multiple of data={data}.")
        for flag, value in (("--vocab", args.vocab), ("--heads", args.heads)):
            if value % tensor:
                raise SystemExit(f"memory: {flag} must be a multiple of tensor={tensor}.")


def data_bytes(row: Row) -> tuple[int, float]:
    """Over `data`: the counter's per-device output bytes, and the ring-model bytes sent."""
    records = [r for r in row.collectives.records if r.axes == ("data",)]
    counted = sum(r.count * r.nbytes for r in records)
    ring = sum(r.count * r.nbytes * ring_factor(r.kind, row.data_size) for r in records)
    return counted, ring


def report(
    args: argparse.Namespace, devices: str, rows: list[Row], checks: list[tuple[str, bool]]
) -> str:
    """The header, the memory table, the checks and the collectives table, as text."""
    memory = [
        (r.label, mib(r.params), mib(r.grads), mib(r.opt_state), mib(r.states),
         mib(r.theory), f"{r.states / r.theory:.3f}", mib(r.temp), mib(r.states + r.temp))
        for r in rows
    ]  # fmt: skip
    dp = {r.mesh: data_bytes(r) for r in rows if r.name == "dp"}
    comms = []
    for r in rows:
        counted, ring = data_bytes(r)
        base_counted, base_ring = dp[r.mesh]
        comms.append(
            (r.label, *collective_cells(r.collectives, KINDS, "data"), f"{counted / 1e6:.2f}",
             ratio(counted, base_counted), f"{ring / 1e6:.2f}", ratio(ring, base_ring),
             f"{r.init_s:.1f}" if r.name != REMAT else "-", f"{r.compile_s:.1f}")
        )  # fmt: skip
    lines = [
        "## memory: per-device memory of a training step, DP / ZeRO-1 / ZeRO-2 / FSDP",
        f"devices: {devices}; meshes: {'; '.join(dict.fromkeys(r.mesh for r in rows))}",
        f"model: vocab={args.vocab}, dim={args.dim}, layers={args.layers}, heads={args.heads}, "
        f"mlp={4 * args.dim}, rmsnorm, gelu, f32, untied head; Adam; batch={args.batch}, "
        f"seq={args.seq}",
        "MiB per device (2^20 B) on the fullest device. params / opt state: measured on the "
        "placed state;",
        "grads: from the layout the step reduces them to (not stored between steps); theory: "
        "the ZeRO paper's",
        "split of Psi (one tensor-parallel replica; f32 Adam: params Psi + grads Psi + "
        "moments 2 Psi);",
        "step temp: the compiled step's temporaries (memory_analysis().temp_size_in_bytes).",
        "",
        format_table(
            (
                "mesh: variant",
                "params",
                "grads",
                "opt state",
                "model states",
                "theory",
                "meas/theory",
                "step temp",
                "states + temp",
            ),
            memory,
        ),  # fmt: skip
        "",
        *(f"{text}: {'PASS' if ok else 'FAIL'}" for text, ok in checks),
        "",
        "Collectives over `data` per step (`count_collectives(compiled, mesh)`): `count / MB`, "
        "per-device",
        "output bytes (1 MB = 1e6 B). counted: the counter's total (all-gather: the full "
        "gathered array;",
        "reduce-scatter: the shard). ring: the bytes a ring algorithm sends per device "
        "(AR 2(N-1)/N, AG (N-1)/N,",
        "RS N-1 times the output, N = data size). x dp: against the `dp` row on the same "
        "mesh. init s / compile s:",
        "wall seconds of init_state (plain: device_put + optimizer.init) and of lower + compile.",
        "",
        format_table(
            (
                "mesh: variant",
                *(f"{SHORT[k]} data" for k in KINDS),
                "counted MB",
                "counted x dp",
                "ring MB",
                "ring x dp",
                "init s",
                "compile s",
            ),
            comms,
        ),  # fmt: skip
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints its tables; exits non-zero if the FSDP check fails."""
    args = build_parser().parse_args(argv)
    check_args(args)
    devices = start_devices(args.devices)
    config = TransformerConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        max_seq_len=args.seq,
    )
    rows, checks = [], []
    for sizes in args.mesh:
        mesh_rows, total = measure_mesh(args, sizes, config)
        rows += mesh_rows
        fsdp = next(r for r in mesh_rows if r.name == "fsdp")
        devices_used = sizes["data"] * sizes["tensor"]
        got, want = fsdp.params + fsdp.opt_state, total / devices_used
        checks.append((
            f"fsdp on {fsdp.mesh}: params + opt state {mib(got)} MiB per device, total / "
            f"{devices_used} = {mib(want)} MiB: x{got / want:.3f} (within "
            f"{100 * args.tolerance:g}% wanted)",
            abs(got / want - 1) <= args.tolerance,
        ))  # fmt: skip
    print(report(args, devices, rows, checks), flush=True)
    failed = [text for text, ok in checks if not ok]
    if failed:
        raise SystemExit(f"memory: FAIL: {'; '.join(failed)}.")


if __name__ == "__main__":
    main()
