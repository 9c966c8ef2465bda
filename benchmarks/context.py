"""Per-device memory of context parallelism: one attention layer, and a Transformer step.

The sequence is split over the mesh axis `"context"` (`c` devices); each device keeps
`s / c` queries. Everything here is compiled, never run: the numbers are the compiled
programs' buffer sizes (`compiled.memory_analysis()`), per device.

1. **One attention layer, forward and backward** (`jax.vjp` of the attention and the
   pull-back of a cotangent, as in `tests/test_context.py`), at a long global sequence
   (`--seq`, default 8192):
   - `eqxpar.nn.ring_attention` inside `jax.shard_map` on a `context=c` mesh, per-shard
     inputs `P(None, "context")`, for each `--contexts` (default 1 2 4 8), both
     strategies (`"ring"`, `"all_gather"`) and each `--block-sizes` (default 512, the
     kernel's default, and 128). At `c = 1` both strategies are `blockwise_attention`.
   - On one device, the attention that materialises the `(s, s)` scores: the einsum,
     mask, softmax, einsum a JAX user writes, and
     `jax.nn.dot_product_attention(..., implementation="xla")`.
   Per device: the inputs and outputs (q, k, v, the cotangent; out, dq, dk, dv), the
   temporaries, their sum, each against `c = 1` and `1/c`.
2. **The collectives over `"context"`** in the attention programs
   (`eqxpar.profile.count_collectives`), checked against the arithmetic: the ring sends
   K/V `c - 1` times forward and K, V, dK, dV `c - 1` times backward plus dK, dV once
   more; all-gather gathers K and V and reduce-scatters dK and dV.
3. **A Transformer training step** (`eqxpar.train.make_train_step`,
   `models.Transformer` with `context_parallel="ring"`, Adam) on a `context=c` mesh at
   `--model-seq` (default 4096): the compiled step's temporaries for each `c`, and at
   `c = 1` also at half the sequence, to see whether they grow linearly in it.
4. **Load balance**: `eqxpar.nn.attention_blocks`, the (query block, key block) pairs
   each device computes, in both layouts.

Checks (PASS/FAIL; `main` exits non-zero on a FAIL): the inputs and outputs per device
are exactly `1/c` of those at `c = 1`; the collectives move what the arithmetic says;
the load-balanced layout gives every device the same work; the Transformer step's
temporaries grow at most `--growth` (2.2) times when the sequence doubles (linear in
the sequence: 2; materialised scores: 4).

Run alone with `python benchmarks/context.py --help` for the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import (
    add_run_flags,
    collective_cells,
    compile_timed,
    format_table,
    make_mesh,
    mib,
    ratio,
    start_devices,
    temp_bytes,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from eqxpar.nn import attention_blocks, ring_attention
from eqxpar.profile import CollectiveReport, count_collectives
from eqxpar.train import init_state, make_train_step
from models import Transformer, TransformerConfig

STRATEGIES = ("ring", "all_gather")
LAYOUTS = ("contiguous", "load_balanced")
KINDS = ("collective-permute", "all-gather", "reduce-scatter")
SHORT = {"collective-permute": "CP", "all-gather": "AG", "reduce-scatter": "RS"}
SPLIT = P(None, "context")  # q, k, v (batch, seq, heads, head_dim): the sequence split


# -- the attention layer -------------------------------------------------------------------


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal attention as a JAX user writes it: the whole `(s, s)` score matrix."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bthd->bhqt", q, k) / np.sqrt(d)
    scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
    return jnp.einsum("bhqt,bthd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`jax.nn.dot_product_attention`, causal, XLA's implementation."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def forward_backward(fn: Callable) -> Callable:
    """`(q, k, v, ct) -> (out, dq, dk, dv)`: `fn`'s output and the pull-back of `ct`."""

    def step(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(ct))

    return step


@dataclasses.dataclass(frozen=True)
class Attention:
    """One compiled attention program: per-device bytes of its inputs and outputs and
    of its temporaries, its collectives over `"context"`, and its compile seconds."""

    name: str
    context: int
    io: int
    temp: int
    collectives: CollectiveReport | None
    compile_s: float

    @property
    def total(self) -> int:
        return self.io + self.temp


def compile_attention(
    name: str, fn: Callable, shapes: list[tuple[int, ...]], context: int | None
) -> Attention:
    """Compiles `forward_backward(fn)` for f32 inputs of global `shapes` (q, k, v, ct).

    `context=None`: on one device, `fn` sees the whole sequence. Otherwise inside
    `jax.shard_map` on a `context=c` mesh, every input split `P(None, "context")`.
    """
    step = forward_backward(fn)
    if context is None:
        args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
        mesh = None
    else:
        mesh = make_mesh({"context": context})
        step = jax.shard_map(step, mesh=mesh, in_specs=SPLIT, out_specs=SPLIT)
        split = NamedSharding(mesh, SPLIT)
        args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=split) for s in shapes]
    compiled, seconds = compile_timed(jax.jit(step), *args)
    memory = compiled.memory_analysis()
    io = memory.argument_size_in_bytes + memory.output_size_in_bytes
    report = None if mesh is None else count_collectives(compiled, mesh)
    return Attention(name, context or 1, io, temp_bytes(compiled), report, seconds)


def measure_attention(args: argparse.Namespace) -> tuple[list[Attention], dict]:
    """The one-device dense rows, then ring and all_gather at each block size and `c`.

    **Returns:** the dense rows, and `{(strategy, block_size): [row per context]}`.
    """
    b, s, h, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    shapes = [(b, s, h, d), (b, s, kv, d), (b, s, kv, d), (b, s, h, d)]
    dense = [
        compile_attention("dense einsum, 1 device", dense_attention, shapes, None),
        compile_attention("dot_product_attention xla, 1 device", xla_attention, shapes, None),
    ]
    rows: dict[tuple[str, int], list[Attention]] = {}
    for block in args.block_sizes:
        for c in args.contexts:
            for strategy in STRATEGIES:
                name = f"{strategy}, block {block}"
                if c == 1 and strategy != STRATEGIES[0]:  # one program: blockwise_attention
                    row = dataclasses.replace(rows[(STRATEGIES[0], block)][0], name=name)
                else:
                    fn = functools.partial(ring_attention, strategy=strategy, block_size=block)
                    row = compile_attention(name, fn, shapes, c)
                rows.setdefault((strategy, block), []).append(row)
    return dense, rows


def wire_bytes(args: argparse.Namespace, strategy: str, c: int) -> dict[str, int]:
    """What the arithmetic says crosses `"context"` per device: output bytes by kind.

    `kv` = one shard of K (or V), `b * s/c * kv_heads * head_dim * 4` bytes. Ring: K, V
    forward `c - 1` hops; backward K, V, dK, dV `c - 1` hops and dK, dV one hop home:
    `(6(c-1) + 2) kv` permuted. All-gather: the gathered K and V, `2 c kv` (the
    counter's output bytes), and the scattered dK, dV, `2 kv`.
    """
    kv = args.batch * (args.seq // c) * args.kv_heads * args.head_dim * 4
    if strategy == "ring":
        return {"collective-permute": (6 * (c - 1) + 2) * kv}
    return {"all-gather": 2 * c * kv, "reduce-scatter": 2 * kv}


def collective_checks(args: argparse.Namespace, rows: dict) -> list[tuple[str, bool]]:
    """The bytes over `"context"` against `wire_bytes`, for the first block size.

    At `c = 2` the ring's forward and backward passes each make one K/V hop, the same
    `ppermute` of the same arrays: XLA computes it once (CSE) and keeps the neighbour's
    K/V from the forward pass, so 2 `kv` fewer bytes are sent; that is accepted too.
    """
    checks = []
    for strategy in STRATEGIES:
        for row in rows[(strategy, args.block_sizes[0])]:
            c, report = row.context, row.collectives
            if c == 1 or report is None:
                continue
            want = wire_bytes(args, strategy, c)
            got = {k: report.bytes(k, "context") for k in KINDS if report.count(k, "context")}
            ok = got == want and report.count(axis="context") == sum(
                report.count(k, "context") for k in KINDS
            )
            text = ", ".join(f"{SHORT[k]} {n / 1e6:.2f} MB" for k, n in want.items())
            if strategy == "ring" and c == 2 and not ok:
                kv = want["collective-permute"] // 8
                ok = got == {"collective-permute": 6 * kv}
                text += f" (sent: {6 * kv / 1e6:.2f} MB, the first K/V hop shared by both passes)"
            checks.append((f"{strategy} at context={c}: over context {text}", ok))
    return checks


# -- the Transformer step ------------------------------------------------------------------


def loss_fn(model: Transformer, x: jax.Array, y: jax.Array, key: Any) -> jax.Array:
    """Mean next-token cross-entropy over this device's tokens."""
    return jnp.mean(model.per_token_loss(x, y))


@dataclasses.dataclass(frozen=True)
class Step:
    """A compiled Transformer training step: context size, sequence, temporaries,
    and the seconds `init_state` and lower + compile took."""

    context: int
    seq: int
    temp: int
    init_s: float
    compile_s: float


def measure_transformer(args: argparse.Namespace) -> list[Step]:
    """One compiled train step per context size; at `c = 1` also at `--model-seq / 2`."""
    config = TransformerConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.model_heads,
        mlp_dim=4 * args.dim,
        max_seq_len=args.model_seq,
        context_parallel="ring",
    )
    optimizer = optax.adam(1e-3)
    specs = (P("data", "context"),) * 2
    steps = []
    for c in args.contexts:
        mesh = make_mesh({"context": c})
        start = time.perf_counter()
        state = init_state(
            Transformer, config, key=jax.random.key(0), optimizer=optimizer, mesh=mesh
        )
        init_s = time.perf_counter() - start
        step = make_train_step(loss_fn, optimizer, mesh=mesh, batch_specs=specs)
        for seq in (args.model_seq // 2, args.model_seq) if c == 1 else (args.model_seq,):
            tokens = jnp.zeros((args.batch, seq), jnp.int32)
            tokens = jax.device_put(tokens, NamedSharding(mesh, specs[0]))
            compiled, compile_s = compile_timed(step, state, tokens, tokens)
            steps.append(Step(c, seq, temp_bytes(compiled), init_s, compile_s))
    return steps


# -- flags, report -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(
        description="Per-device memory of context parallelism (ring_attention, all_gather) "
        "against attention that materialises the scores; a Transformer step; load balance."
    )
    add_run_flags(parser)  # --repeats is accepted (run.py passes it) but nothing is timed
    add = parser.add_argument
    add(
        "--contexts",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8],
        help="context sizes, each a mesh context=c on the first c devices (default 1 2 4 8; "
        "1 is always added: the ratios are against it)",
    )
    add("--seq", type=int, default=8192, help="attention: global sequence (default 8192)")
    add("--batch", type=int, default=1, help="batch, attention and model (default 1)")
    add("--heads", type=int, default=8, help="attention: query heads (default 8)")
    add("--kv-heads", type=int, default=8, help="attention: K/V heads (default 8; 2: GQA)")
    add("--head-dim", type=int, default=64, help="attention: head dim (default 64)")
    add(
        "--block-sizes",
        type=int,
        nargs="+",
        default=[512, 128],
        help="ring_attention block_size values (default 512 128; 512 is the default)",
    )
    add("--model-seq", type=int, default=4096, help="Transformer: sequence (default 4096)")
    add("--vocab", type=int, default=256, help="Transformer: vocabulary (default 256)")
    add("--dim", type=int, default=512, help="Transformer: width, MLP 4x (default 512)")
    add("--layers", type=int, default=2, help="Transformer: layers (default 2)")
    add("--model-heads", type=int, default=8, help="Transformer: heads (default 8)")
    add(
        "--growth",
        type=float,
        default=2.2,
        help="check: the step's temporaries grow at most this much when the sequence "
        "doubles, at context=1 (default 2.2; linear: 2, quadratic: 4)",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Adds context 1; fails early, with the fix, on sizes the layouts cannot split."""
    args.contexts = sorted({1, *args.contexts})
    for c in args.contexts:
        for flag, seq in (("--seq", args.seq), ("--model-seq", args.model_seq // 2)):
            if c < 1 or seq % (2 * c):
                what = "--model-seq / 2" if flag == "--model-seq" else flag
                raise SystemExit(
                    f"context: {what} = {seq} does not split into 2 x {c} chunks "
                    f"(load-balanced layout over context={c}); use a multiple of {2 * c}."
                )
    if args.heads % args.kv_heads:
        raise SystemExit(f"context: --kv-heads {args.kv_heads} must divide --heads {args.heads}.")


def attention_table(args: argparse.Namespace, dense: list[Attention], rows: dict) -> str:
    """The memory table of the attention programs."""
    cells = []
    base = rows[(STRATEGIES[0], args.block_sizes[0])][0]
    for row in dense:
        cells.append(
            (
                row.name,
                1,
                args.seq,
                mib(row.io, 1),
                mib(row.temp, 1),
                ratio(row.temp, base.temp),
                mib(row.total, 1),
                ratio(row.total, base.total),
                "-",
                f"{row.compile_s:.1f}",
            )
        )
    for group in rows.values():
        one = group[0]
        for row in group:
            c = row.context
            cells.append(
                (
                    row.name,
                    c,
                    args.seq // c,
                    mib(row.io, 1),
                    mib(row.temp, 1),
                    ratio(row.temp, one.temp),
                    mib(row.total, 1),
                    ratio(row.total, one.total),
                    f"x{1 / c:.2f}",
                    f"{row.compile_s:.1f}",
                )
            )
    headers = (
        "variant",
        "context",
        "shard",
        "in+out MiB",
        "temp MiB",
        "temp x c=1",
        "total MiB",
        "total x c=1",
        "1/c",
        "compile s",
    )
    return format_table(headers, cells)


def collectives_table(args: argparse.Namespace, rows: dict) -> str:
    """`count / MB` over `"context"` for each attention program at the first block size."""
    cells = []
    for strategy in STRATEGIES:
        for row in rows[(strategy, args.block_sizes[0])]:
            if row.context > 1 and row.collectives is not None:
                arithmetic = sum(wire_bytes(args, strategy, row.context).values())
                cells.append(
                    (
                        row.name,
                        row.context,
                        *collective_cells(row.collectives, KINDS, "context"),
                        f"{arithmetic / 1e6:.2f}",
                    )
                )
    headers = ("variant", "context", *(f"{SHORT[k]} context" for k in KINDS), "arithmetic MB")
    return format_table(headers, cells)


def transformer_table(steps: list[Step]) -> str:
    """The Transformer steps' temporaries against `c = 1` at the same sequence."""
    seq = max(s.seq for s in steps)
    one = next(s for s in steps if s.context == 1 and s.seq == seq)
    cells = [
        (
            s.context,
            s.seq,
            s.seq // s.context,
            mib(s.temp, 1),
            ratio(s.temp, one.temp) if s.seq == seq else "-",
            f"x{1 / s.context:.2f}" if s.seq == seq else "-",
            f"{s.init_s:.1f}",
            f"{s.compile_s:.1f}",
        )
        for s in steps
    ]
    headers = ("context", "seq", "shard", "step temp MiB", "x c=1", "1/c", "init s", "compile s")
    return format_table(headers, cells)


def balance_table(args: argparse.Namespace) -> tuple[str, list[tuple[str, bool]]]:
    """`attention_blocks` per device in both layouts, and the load-balance checks."""
    block, cells, checks = args.block_sizes[0], [], []
    for c in args.contexts:
        if c == 1:
            continue
        for layout in LAYOUTS:
            blocks = attention_blocks(args.seq, c, layout=layout, block_size=block)
            cells.append(
                (
                    layout,
                    c,
                    " ".join(map(str, blocks)),
                    sum(blocks),
                    max(blocks),
                    f"{max(blocks) / np.mean(blocks):.2f}",
                )
            )
            if layout == "load_balanced":
                checks.append(
                    (
                        f"load_balanced at context={c}: every device computes "
                        f"{max(blocks)} block pairs",
                        min(blocks) == max(blocks),
                    )
                )
    headers = ("layout", "context", "block pairs per device", "total", "max", "max / mean")
    return format_table(headers, cells), checks


def main(argv: list[str] | None = None) -> None:
    """Compiles every program, prints the tables and checks; exits non-zero on a FAIL."""
    args = build_parser().parse_args(argv)
    check_args(args)
    start = time.perf_counter()
    devices = start_devices(args.devices)
    dense, rows = measure_attention(args)
    steps = measure_transformer(args)
    balance, checks = balance_table(args)

    # q, k, v, ct in; out, dq, dk, dv out: twice the inputs' bytes, split c ways. The
    # compiled program's outputs add a few bytes (the output tuple's pointers).
    arrays = 2 * 4 * args.batch * args.seq * args.head_dim * (2 * args.heads + 2 * args.kv_heads)
    io_checks = [
        (
            f"{group[0].name}: inputs + outputs {' / '.join(mib(r.io, 1) for r in group)} MiB "
            f"at context {' / '.join(str(r.context) for r in group)}: the arrays' "
            f"{mib(arrays, 1)} MiB / context (within 1 KiB)",
            all(0 <= r.io - arrays // r.context < 1024 for r in group),
        )
        for group in rows.values()
    ]
    half, full = (
        next(s for s in steps if s.context == 1 and s.seq == n)
        for n in (args.model_seq // 2, args.model_seq)
    )
    growth = full.temp / half.temp
    growth_check = (
        f"Transformer step at context=1: temporaries x{growth:.2f} from seq {half.seq} to "
        f"{full.seq} (at most x{args.growth:g} wanted; linear in seq: x2, (s, s) scores: x4)",
        growth <= args.growth,
    )
    checks = io_checks + collective_checks(args, rows) + checks + [growth_check]

    b, s, h, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    flags = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "benchmarks/context.py", *flags])
    lines = [
        "## context: per-device memory of context parallelism (compiled, not run)",
        f"command: {command}",
        f"devices: {devices}; meshes: context=c on the first c devices, c in "
        f"{' '.join(map(str, args.contexts))}",
        "",
        f"### One attention layer, forward + backward: batch {b}, seq {s}, heads {h}, "
        f"kv_heads {kv}, head_dim {d}, f32, causal",
        "ring / all_gather: eqxpar.nn.ring_attention(strategy=..., block_size=...) in "
        "jax.shard_map, q, k, v, ct split P(None, 'context')",
        "(load-balanced layout; at context=1 both are blockwise_attention, one program). "
        "dense einsum: scores, mask, softmax,",
        "einsum on one device; dot_product_attention xla: jax.nn.dot_product_attention("
        "implementation='xla'), one device.",
        "MiB per device (2^20 B), from compiled.memory_analysis(): in+out = arguments + "
        "outputs (q, k, v, ct; out, dq, dk, dv),",
        "temp = temp_size_in_bytes, total = their sum. x c=1: against the same variant at "
        "context=1 (dense rows: against",
        f"ring, block {args.block_sizes[0]}, context=1).",
        "",
        attention_table(args, dense, rows),
        "",
        f"Collectives over `context` (count_collectives), block {args.block_sizes[0]}: "
        "`count / MB`, executions and per-device output",
        "bytes (1 MB = 1e6 B); CP / AG / RS: collective-permute, all-gather, reduce-scatter.",
        "",
        collectives_table(args, rows),
        "",
        f"### Transformer training step (make_train_step, Adam): vocab {args.vocab}, dim "
        f"{args.dim}, layers {args.layers}, heads {args.model_heads}, mlp {4 * args.dim},",
        f"f32, context_parallel='ring' (load-balanced), batch {b}; tokens P('data', "
        "'context'); step temp = compiled temp_size_in_bytes per device.",
        "",
        transformer_table(steps),
        "",
        f"### Load balance: (query block, key block) pairs per device, attention_blocks(seq="
        f"{s}, c, layout, block_size={args.block_sizes[0]})",
        "",
        balance,
        "",
        *(f"{text}: {'PASS' if ok else 'FAIL'}" for text, ok in checks),
        "",
        f"({time.perf_counter() - start:.0f} s)",
    ]
    print("\n".join(lines), flush=True)
    failed = [text for text, ok in checks if not ok]
    if failed:
        raise SystemExit(f"context: FAIL: {'; '.join(failed)}.")


if __name__ == "__main__":
    main()
