"""Train a classifier on scikit-learn's bundled digits (real data, no download).

    python examples/train_classifier.py --model tp --mesh data=2,tensor=4 --strategy zero1

`--model` chooses the network: `simple` is `SimpleClassifier` (no tensor parallelism),
`tp` is `TPClassifier` (Megatron Column -> Row blocks over `tensor`, the default) and
`pp` is `PPClassifier`, split into stages over `pipeline` (`--schedule`,
`--microbatches`). `--strategy` is how the data axis shares the model states, as in
`train_transformer.py`: `dp` (replicated, the default), `zero1`, `zero2` or `fsdp`.
Prints a progress bar, writes metrics as JSONL and a loss plot as PNG under `--out`,
and ends with the test accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import (
    base_parser,
    batch_layout,
    build_mesh,
    checkpointing,
    load_batch,
    pipeline_schedule,
    start_jax,
)

MODELS = ("simple", "tp", "pp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # `--strategy tp` / `pp` chose the model before `--model` existed.
    p = base_parser(
        __doc__.splitlines()[0], moved_strategies={m: f"--model {m}" for m in ("tp", "pp")}
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        default="tp",
        help="simple: SimpleClassifier; tp: TPClassifier over tensor (default); "
        "pp: PPClassifier on a pipeline mesh (--schedule, --microbatches)",
    )
    p.add_argument("--width", type=int, default=64, help="residual width")
    p.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    main_process = start_jax(args)  # JAX (and its distributed runtime) once the flags are good
    say = print if main_process else (lambda *a, **k: None)

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import eqxpar as ep
    from models import PPClassifier, SimpleClassifier, TPClassifier

    n = len(jax.devices())
    defaults = {
        "simple": {"data": n},
        "tp": {"data": max(1, n // 4), "tensor": min(4, n)},
        "pp": {"data": max(1, n // 4), "tensor": 2 if n >= 4 else 1, "pipeline": 2}
        if n >= 2
        else {"data": 1},
    }
    mesh, mesh_text = build_mesh(args.mesh or defaults[args.model])
    data_size, stages = mesh.shape["data"], mesh.shape["pipeline"]
    if stages > 1 and args.model != "pp":
        sys.exit(f"--mesh: pipeline={stages} needs --model pp")
    virtual, micro = batch_layout(args, data_size, stages)

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x,
        digits.target.astype(np.int32),
        test_size=0.25,
        random_state=args.seed,
        stratify=digits.target,
    )
    if args.model == "simple":
        make = lambda k: SimpleClassifier(64, 10, width=args.width, key=k)  # noqa: E731
    elif args.model == "tp":
        make = lambda k: TPClassifier(64, 10, width=args.width, key=k)  # noqa: E731
    else:
        depth = 2 * stages * virtual
        make = lambda k: PPClassifier(  # noqa: E731
            64, 10, width=args.width, depth=depth, stages=stages, virtual=virtual, key=k
        )
    optim = optax.adam(args.lr)
    state = ep.train.init_state(
        make, jax.random.key(args.seed), optimizer=optim, mesh=mesh, strategy=args.strategy
    )
    schedule = pipeline_schedule(args.schedule, virtual) if stages > 1 else None

    def loss_fn(model, x, y, key):
        if schedule is not None:
            return model.loss(x, y, schedule=schedule, microbatches=micro)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(x), y))

    train_step = ep.train.make_train_step(loss_fn, optim, mesh=mesh, strategy=args.strategy)
    batch = args.batch_size

    @eqx.filter_jit
    def evaluate(model, x, y):
        if stages > 1:  # every layer in order: XLA gathers the pipeline stages
            logits = model(x)
        else:
            logits = ep.filter_shard_map(
                lambda m, x: m(x), mesh=mesh, in_specs=(None, P("data")), out_specs=P("data")
            )(model, x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.mean(losses), jnp.mean(jnp.argmax(logits, -1) == y)

    pad = (-len(x_test)) % data_size  # the test set must split over "data" too
    x_all = np.concatenate([x_test, x_test[:pad]])
    y_all = np.concatenate([y_test, y_test[:pad]])

    def rows_of(xs, ys, idx):
        """Global arrays of the examples `idx`, split over data: each process reads
        only its own rows."""
        (x_eval,) = load_batch(mesh, P("data"), (len(idx), xs.shape[1]), lambda b: [xs[idx[b[0]]]])
        (y_eval,) = load_batch(mesh, P("data"), (len(idx),), lambda b: [ys[idx[b[0]]]])
        return x_eval, y_eval

    x_eval, y_eval = rows_of(x_all, y_all, np.arange(len(x_all)))

    def batch_fn(i):
        idx = np.random.default_rng([args.seed, i]).choice(len(x_train), batch, replace=False)
        return rows_of(x_train, y_train, idx)

    def eval_fn(state):
        loss, acc = evaluate(state.model, x_eval, y_eval)
        return {"loss": loss, "accuracy": acc}

    say(
        f"{args.model}: {type(state.model).__name__} on {mesh_text} ({args.strategy}), "
        f"{len(x_train)} train / {len(x_test)} test digits"
    )
    out = args.out / f"classifier-{args.model}"
    checkpointer, state, first = checkpointing(args, state, mesh, args.strategy)
    if main_process and first == 0 and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    start = time.perf_counter()
    state, rows = ep.train.fit(
        train_step,
        state,
        batch_fn,
        steps=args.steps,
        start=first,
        checkpointer=checkpointer,
        checkpoint_every=args.checkpoint_every,
        eval_fn=eval_fn,
        eval_every=args.eval_every,
        metrics_path=out / "metrics.jsonl",
        items_per_step=batch,
    )
    elapsed = time.perf_counter() - start
    if main_process:
        ep.train.plot_losses(
            out / "loss.png", rows, f"digits, {args.model} on {mesh_text} ({args.strategy})"
        )
    accuracy = rows[-1]["eval_accuracy"]
    say(
        f"done in {elapsed:.1f}s: test accuracy {accuracy:.2%}; "
        f"metrics in {out / 'metrics.jsonl'}, plot in {out / 'loss.png'}"
    )
    return accuracy


if __name__ == "__main__":
    main()
