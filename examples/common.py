"""Command-line pieces shared by the example scripts (flags, mesh parsing, plots)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

AXES = ("data", "tensor", "pipeline", "context", "expert")


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,tensor=4"` -> `{"data": 2, "tensor": 4}`; one-line errors name the flag."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name not in AXES or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(
                f"--mesh: bad entry {part!r}; write AXIS=SIZE pairs joined by commas, AXIS one "
                f"of {', '.join(AXES)}, SIZE >= 1 (e.g. data=2,tensor=4)"
            )
        sizes[name] = int(value)
    return sizes


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every example takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--mesh",
        type=parse_mesh,
        default=None,
        help="mesh axis sizes, e.g. data=2,tensor=4 (default fits --devices)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=8,
        help="simulate this many CPU devices (default 8; ignored on GPU/TPU)",
    )
    p.add_argument("--steps", type=_positive, default=300, help="training steps")
    p.add_argument("--batch-size", type=_positive, default=128, help="global batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for init and data order")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs"),
        help="where metrics (JSONL) and the loss plot (PNG) go",
    )
    return p


def start_devices(n: int) -> None:
    """Simulate `n` CPU devices unless an accelerator platform was asked for."""
    import eqxpar as ep

    if os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        ep.simulate_cpu_devices(n)


def write_metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def plot_losses(path: Path, rows: list[dict], title: str) -> None:
    """Loss curve (train, and eval where present) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [r for r in rows if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="test loss"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
