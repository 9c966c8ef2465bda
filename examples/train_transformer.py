"""Train a byte-level Transformer language model on real text, then sample from it.

    python examples/train_transformer.py --mesh data=2,tensor=4
    python examples/train_transformer.py --mesh data=2,context=4 --seq-len 512
    python examples/train_transformer.py --mesh data=2,expert=4 --experts 8

By default the corpus is Python's own documentation (the `pydoc_data` topics that ship
with every CPython), so it runs offline; `--data FILE` trains on any text file. The
model is `models.Transformer` (vocab-parallel embedding and loss, Megatron attention
and MLP) on a data x tensor mesh, or with the sequence split over a context axis (ring
attention, load-balanced layout). Prints a progress bar with loss, tokens/s and step
time, evaluates on held-out text, writes metrics (JSONL) and a loss plot (PNG) under
`--out`, and ends with a generated sample.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import (
    base_parser,
    batch_layout,
    build_mesh,
    checkpointing,
    load_batch,
    pipeline_schedule,
    start_jax,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.set_defaults(steps=300, batch_size=16, lr=3e-3)
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a UTF-8 text file (default: Python's bundled documentation)",
    )
    p.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sequence")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=4, help="Transformer layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument(
        "--precision",
        choices=("f32", "bf16"),
        default="f32",
        help="compute dtype (parameters stay f32)",
    )
    p.add_argument(
        "--remat",
        choices=("none", "full", "selective", "offload"),
        default="none",
        help="activation checkpointing policy",
    )
    p.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Megatron sequence parallelism over the tensor axis",
    )
    p.add_argument(
        "--context-parallel",
        choices=("ring", "all_gather"),
        default="ring",
        help="how attention crosses a sequence split over the context axis (--mesh context=C)",
    )
    p.add_argument(
        "--experts",
        type=int,
        default=0,
        help="mixture of experts: experts per MoE block (0: dense MLPs), split over expert",
    )
    p.add_argument("--moe-every", type=int, default=1, help="every N-th block is an MoE block")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="MoE expert capacity factor")
    p.add_argument("--dropout", type=float, default=0.0, help="residual dropout rate")
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps")
    p.add_argument("--sample-tokens", type=int, default=200, help="bytes to generate")
    return p.parse_args(argv)


def load_corpus(path: Path | None) -> bytes:
    """The training text as bytes: a user file, or Python's bundled documentation."""
    if path is not None:
        if not path.is_file():
            sys.exit(f"--data: {path} is not a file")
        return path.read_bytes()
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics.values()).encode()


def unigram_entropy(data) -> float:
    """Cross-entropy (nats/byte) of the best context-free model: the baseline to beat."""
    import numpy as np

    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    main_process = start_jax(args)  # JAX (and its distributed runtime) once the flags are good
    say = print if main_process else (lambda *a, **k: None)

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P

    import eqxpar as ep
    from models import Transformer, TransformerConfig, count_params

    n = len(jax.devices())
    mesh, mesh_text = build_mesh(args.mesh or {"data": max(1, n // 4), "tensor": min(4, n)})
    data_size, tensor, stages = mesh.shape["data"], mesh.shape["tensor"], mesh.shape["pipeline"]
    context, experts = mesh.shape["context"], mesh.shape["expert"]
    if experts > 1 and args.experts % experts:
        sys.exit(
            f"--experts: {args.experts} experts do not split over expert={experts}; "
            f"use a multiple of {experts} (the expert axis holds the MoE experts)"
        )
    if args.batch_size % (data_size * experts):
        sys.exit(
            f"--batch-size: {args.batch_size} does not split over data={data_size} x "
            f"expert={experts}; use a multiple of {data_size * experts}"
        )
    if stages > 1 and context > 1:
        sys.exit("--mesh: pipeline and context together are not supported yet; use one of them")
    virtual, micro = batch_layout(args, data_size, stages)
    chunks = 2 * context if context > 1 else 1  # the load-balanced layout's chunks
    if args.seq_len % chunks:
        sys.exit(
            f"--seq-len: {args.seq_len} does not split into 2 * context = {chunks} chunks "
            f"(the load-balanced layout over context={context}); use a multiple of {chunks}"
        )
    if args.sequence_parallel and (args.seq_len // context) % tensor:
        over = f"context={context} x tensor={tensor}" if context > 1 else f"tensor={tensor}"
        sys.exit(
            f"--seq-len: {args.seq_len} does not split over {over} for --sequence-parallel; "
            f"use a multiple of {chunks * tensor}"
        )
    try:
        config = TransformerConfig(
            vocab_size=256,
            dim=args.dim,
            num_layers=args.layers,
            num_heads=args.heads,
            max_seq_len=max(args.seq_len, 64) + args.sample_tokens,
            dropout=args.dropout,
            sequence_parallel=args.sequence_parallel,
            remat=args.remat,
            compute_dtype="bfloat16" if args.precision == "bf16" else "float32",
            pipeline_stages=stages,
            virtual_stages=virtual,
            context_parallel=args.context_parallel if context > 1 else None,
            num_experts=args.experts,
            moe_every=args.moe_every,
            top_k=args.top_k,
            capacity_factor=args.capacity_factor,
        )
        warmup = min(50, args.steps // 10 + 1)
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, args.lr, warmup, max(args.steps, warmup + 1), args.lr / 10
        )
        optim = optax.adamw(schedule, weight_decay=0.01)
        with jax.set_mesh(mesh):  # size checks against the mesh at construction
            state = ep.train.init_state(
                Transformer,
                config,
                key=jax.random.key(args.seed),
                optimizer=optim,
                mesh=mesh,
                strategy=args.strategy,
                rng=jax.random.key(args.seed + 1),
            )
    except ValueError as e:
        sys.exit(f"model: {e}")

    corpus = np.frombuffer(load_corpus(args.data), np.uint8).astype(np.int32)
    if len(corpus) < 20 * (args.seq_len + 1):
        sys.exit(f"--data: only {len(corpus)} bytes; need at least {20 * (args.seq_len + 1)}")
    split = int(0.95 * len(corpus))
    train, held_out = corpus[:split], corpus[split:]
    baseline = unigram_entropy(train.astype(np.uint8).tobytes())

    batch, seq = args.batch_size, args.seq_len
    # With the sequence split over "context", tokens go in the load-balanced order
    # (device i holds chunks i and 2c-1-i) and the batch is split P("data", "context").
    order = ep.nn.context_order(seq, context)
    # The expert axis splits the batch too (GShard): each device routes its own tokens.
    rows = ("data", "expert") if experts > 1 else "data"
    tokens = P(rows, "context") if context > 1 else P(rows)
    batch_axes = tuple(a for a in ("data", "expert", "context") if mesh.shape[a] > 1) or "data"

    pipe_schedule = pipeline_schedule(args.schedule, virtual) if stages > 1 else None

    def loss_fn(model, x, y, key):  # this data shard's mean; key: per step and shard
        if stages > 1:
            return model.loss(x, y, schedule=pipe_schedule, microbatches=micro)
        return model.loss_and_metrics(x, y, key=key)  # (loss, MoE metrics, if any)

    step_fn = ep.train.make_train_step(
        loss_fn,
        optim,
        mesh=mesh,
        strategy=args.strategy,
        clip_norm=args.clip_norm,
        batch_specs=(tokens, tokens),
    )

    def held_out_loss(model, x, y):  # cross-entropy only (no MoE auxiliary losses)
        if stages > 1:
            return model.loss(x, y, schedule=pipe_schedule, microbatches=micro)
        return jnp.mean(model.per_token_loss(x, y))

    @eqx.filter_jit
    def evaluate(model, x, y):
        fn = ep.filter_shard_map(
            lambda m, x, y: jax.lax.pmean(held_out_loss(m, x, y), batch_axes),
            mesh=mesh,
            in_specs=(None, tokens, tokens),
            out_specs=P(),
        )
        return fn(model, x, y)

    def windows(source, count, rng):
        """`count` random windows (inputs, targets) as global arrays split as `tokens`:
        every process draws the same starts, and reads only the rows and positions
        its own devices hold."""
        starts = rng.integers(0, len(source) - seq - 1, size=count)

        def load(block):
            rows, cols = block
            chunk = np.stack([source[s : s + seq + 1] for s in starts[rows]])
            return chunk[:, :-1][:, order[cols]], chunk[:, 1:][:, order[cols]]

        return load_batch(mesh, tokens, (count, seq), load)

    def batch_fn(i):  # a function of the batch index alone: resuming replays the data
        return windows(train, batch, np.random.default_rng([args.seed, i]))

    context_text = f", context: {args.context_parallel}" if context > 1 else ""
    if args.experts:
        context_text += f", MoE: {args.experts} experts, top-{args.top_k}, every {args.moe_every}"
    eval_x, eval_y = windows(held_out, 4 * batch, np.random.default_rng([args.seed, 2**31]))
    say(
        f"Transformer: {count_params(state.model) / 1e6:.2f}M params, {config.num_layers} layers x "
        f"{config.dim} wide, on {mesh_text} ({args.strategy}, {args.precision}, "
        f"remat={args.remat}, "
        f"SP={'on' if args.sequence_parallel else 'off'}{context_text}); "
        f"corpus {len(corpus):,} bytes; "
        f"unigram baseline {baseline:.3f} nats/byte"
    )
    if jax.process_count() > 1:
        say(f"devices: {ep.distributed.layout(mesh)}")
    out = args.out / "transformer"
    checkpointer, state, start = checkpointing(args, state, mesh, args.strategy)
    if main_process and start == 0 and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    begin = time.perf_counter()
    try:
        state, rows = ep.train.fit(
            step_fn,
            state,
            batch_fn,
            steps=args.steps,
            start=start,
            eval_fn=lambda st: {"loss": evaluate(st.model, eval_x, eval_y)},
            eval_every=args.eval_every,
            checkpointer=checkpointer,
            checkpoint_every=args.checkpoint_every,
            metrics_path=out / "metrics.jsonl",
            plot_path=out / "loss.png",
            items_per_step=batch * seq,
        )
    except FloatingPointError as e:
        sys.exit(str(e))
    elapsed = time.perf_counter() - begin
    prompt_text = b"The "
    prompt = np.frombuffer(prompt_text, np.uint8).astype(np.int32)[None]
    prompt = ep.distributed.global_array(prompt, mesh, P(), prompt.shape)
    sampler = state.model.with_config(
        sequence_parallel=False,
        remat="none",
        pipeline_stages=1,
        virtual_stages=1,
        context_parallel=None,
    )
    generate = eqx.filter_jit(
        ep.filter_shard_map(
            lambda m, p: m.generate(
                p, args.sample_tokens, temperature=0.7, key=jax.random.key(args.seed)
            ),
            mesh=mesh,
            in_specs=(None, P()),
            out_specs=P(),
        )
    )
    sample = bytes(np.asarray(generate(sampler, prompt))[0].astype(np.uint8))
    if main_process:
        ep.train.plot_losses(
            out / "loss.png", rows, f"byte LM, {mesh_text}, baseline {baseline:.2f}"
        )
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    final = evals[-1] if evals else float("nan")
    say(
        f"done in {elapsed:.0f}s: held-out loss {final:.3f} nats/byte vs unigram "
        f"{baseline:.3f}; metrics in {out / 'metrics.jsonl'}, plot in {out / 'loss.png'}"
    )
    say("sample:\n" + sample.decode("utf-8", errors="replace"))
    return {"eval_loss": final, "baseline": baseline, "sample": sample, "rows": rows}


if __name__ == "__main__":
    main()
