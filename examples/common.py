"""Command-line pieces shared by the example scripts (flags, mesh parsing, plots)."""

from __future__ import annotations

import argparse
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


SCHEDULES = ("gpipe", "1f1b", "interleaved")


def pipeline_schedule(name: str, virtual: int):
    """The `eqxpar.pipeline` schedule named by `--schedule`."""
    from eqxpar.pipeline import GPipe, Interleaved1F1B, OneFOneB

    if name == "interleaved":
        return Interleaved1F1B(virtual)
    return GPipe() if name == "gpipe" else OneFOneB()


def batch_layout(args, data_size: int, stages: int) -> tuple[int, int]:
    """`(virtual stages, microbatches)` from the flags; one-line errors for a batch that
    does not split over the data axis or into the microbatches."""
    import sys

    if args.batch_size % data_size:
        sys.exit(
            f"--batch-size: {args.batch_size} does not split over data={data_size}; "
            f"use a multiple of {data_size}"
        )
    virtual = 2 if args.schedule == "interleaved" and stages > 1 else 1
    micro = args.microbatches or 2 * stages
    if stages > 1 and (args.batch_size // data_size) % micro:
        sys.exit(
            f"--microbatches: {micro} does not divide the per-data-shard batch of "
            f"{args.batch_size // data_size}; choose a divisor or change --batch-size"
        )
    return virtual, micro


def checkpointing(args, state, mesh, strategy):
    """`(checkpointer or None, state, first batch index)` from the checkpoint flags."""
    import sys

    import eqxpar as ep

    checkpointer = None
    if args.checkpoint_dir is not None:
        checkpointer = ep.train.Checkpointer(args.checkpoint_dir, keep=args.keep_checkpoints)
    if not args.resume:
        return checkpointer, state, 0
    if checkpointer is None or checkpointer.latest_step() is None:
        sys.exit(f"--resume: no checkpoint in --checkpoint-dir={args.checkpoint_dir}")
    state, start = ep.train.resume(checkpointer, state, mesh=mesh, strategy=strategy)
    print(f"resumed from step {int(state.step)} (batch {start})")
    return checkpointer, state, start


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
        help="simulate this many CPU devices (default 8; with JAX_PLATFORMS=cuda or tpu "
        "the accelerators are used instead)",
    )
    p.add_argument("--steps", type=_positive, default=300, help="training steps")
    p.add_argument("--batch-size", type=_positive, default=128, help="global batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (Adam or AdamW)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and data order")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="1f1b",
        help="pipeline schedule when the mesh has pipeline > 1 (default 1f1b)",
    )
    p.add_argument(
        "--microbatches",
        type=_positive,
        default=None,
        help="pipeline microbatches per data shard (default: 2 x pipeline size)",
    )
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="save Orbax checkpoints here")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --checkpoint-dir (any mesh)",
    )
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
