"""Train a classifier on scikit-learn's bundled digits (real data, no download).

    python examples/train_classifier.py --strategy tp --mesh data=2,tensor=4

`--strategy dp` trains `SimpleClassifier` replicated on a data-parallel mesh;
`--strategy tp` trains `TPClassifier` (Megatron Column -> Row blocks) on data x tensor.
Prints a progress bar, writes metrics as JSONL and a loss plot as PNG under `--out`,
and ends with the test accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import base_parser, plot_losses, start_devices, write_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument(
        "--strategy",
        choices=("dp", "tp"),
        default="tp",
        help="dp: replicated model; tp: tensor-parallel blocks (default)",
    )
    p.add_argument("--width", type=int, default=64, help="residual width")
    p.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    start_devices(args.devices)

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from tqdm import tqdm

    import eqxpar as ep
    from models import SimpleClassifier, TPClassifier

    n = len(jax.devices())
    sizes = args.mesh or (
        {"data": n} if args.strategy == "dp" else {"data": max(1, n // 4), "tensor": min(4, n)}
    )
    try:
        mesh = ep.make_mesh(**sizes)
    except ValueError as e:
        sys.exit(f"--mesh: {e}")
    data_size = mesh.shape["data"]
    if args.batch_size % data_size:
        sys.exit(
            f"--batch-size: {args.batch_size} does not split over data={data_size}; "
            f"use a multiple of {data_size}"
        )

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x,
        digits.target.astype(np.int32),
        test_size=0.25,
        random_state=args.seed,
        stratify=digits.target,
    )
    if args.strategy == "dp":
        make = lambda k: SimpleClassifier(64, 10, width=args.width, key=k)  # noqa: E731
    else:
        make = lambda k: TPClassifier(64, 10, width=args.width, key=k)  # noqa: E731
    optim = optax.adam(args.lr)
    state = ep.train.init_state(make, jax.random.key(args.seed), optimizer=optim, mesh=mesh)

    def loss_fn(model, x, y, key):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(x), y))

    train_step = ep.train.make_train_step(loss_fn, optim, mesh=mesh)
    batch = args.batch_size

    @eqx.filter_jit
    def evaluate(model, x, y):
        logits = ep.filter_shard_map(
            lambda m, x: m(x), mesh=mesh, in_specs=(None, P("data")), out_specs=P("data")
        )(model, x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.mean(losses), jnp.mean(jnp.argmax(logits, -1) == y)

    pad = (-len(x_test)) % data_size  # the test set must split over "data" too
    x_eval = np.concatenate([x_test, x_test[:pad]])
    y_eval = np.concatenate([y_test, y_test[:pad]])
    rng = np.random.default_rng(args.seed)
    rows: list[dict] = []
    mesh_text = ",".join(f"{k}={v}" for k, v in sizes.items())
    print(
        f"{args.strategy}: {type(state.model).__name__} on {mesh_text}, "
        f"{len(x_train)} train / {len(x_test)} test digits"
    )
    bar = tqdm(range(1, args.steps + 1), desc="train", unit="step", mininterval=1.0)
    start = time.perf_counter()
    for step in bar:
        idx = rng.choice(len(x_train), size=batch, replace=False)
        t0 = time.perf_counter()
        state, metrics = train_step(state, x_train[idx], y_train[idx])
        loss = float(metrics["loss"])
        dt = time.perf_counter() - t0
        rows.append({"step": step, "loss": loss, "step_time_s": dt, "examples_per_s": batch / dt})
        bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{batch / dt:,.0f}", ms=f"{1e3 * dt:.1f}")
        if step % args.eval_every == 0 or step == args.steps:
            eval_loss, acc = evaluate(state.model, x_eval, y_eval)
            rows.append({"step": step, "eval_loss": float(eval_loss), "accuracy": float(acc)})
            bar.write(f"step {step}: test loss {float(eval_loss):.4f}, accuracy {float(acc):.2%}")
    elapsed = time.perf_counter() - start
    out = args.out / f"classifier-{args.strategy}"
    write_metrics(out / "metrics.jsonl", rows)
    plot_losses(out / "loss.png", rows, f"digits, {args.strategy} on {mesh_text}")
    accuracy = rows[-1]["accuracy"]
    print(
        f"done in {elapsed:.1f}s: test accuracy {accuracy:.2%}; "
        f"metrics in {out / 'metrics.jsonl'}, plot in {out / 'loss.png'}"
    )
    return accuracy


if __name__ == "__main__":
    main()
