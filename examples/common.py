"""Command-line pieces shared by the example scripts (flags, mesh, checkpoints).

`--mesh` and `--devices` mean what they mean in the benchmarks: `eqxpar.cli.parse_mesh`
parses the one, `eqxpar.cli.start_devices` starts the other. eqxpar (and so JAX) is
imported on first use, so `--help` and flag errors come back at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "SCHEDULES",
    "STRATEGIES",
    "base_parser",
    "batch_layout",
    "build_mesh",
    "checkpointing",
    "load_batch",
    "pipeline_schedule",
    "start_jax",
]

SCHEDULES = ("gpipe", "1f1b", "interleaved")
# The data-parallel strategies of `eqxpar.train`: what `--strategy` chooses among.
STRATEGIES = ("dp", "zero1", "zero2", "fsdp")


def start_jax(args) -> bool:
    """Starts JAX: the distributed runtime when this is one of several processes
    (`eqxpar.distributed.initialize`, a no-op otherwise), then the devices of `--devices`.

    Under `python -m eqxpar.launch` each process has the launcher's
    `--devices-per-process` CPU devices; a `--devices` that says otherwise is an error.
    Returns whether this process prints (process 0).
    """
    from eqxpar.launch import DEVICES_ENV

    launched = os.environ.get(DEVICES_ENV)
    devices = 8 if args.devices is None else args.devices
    if launched is not None:
        if args.devices is not None and args.devices != int(launched):
            sys.exit(
                f"--devices: {args.devices}, but eqxpar.launch gives each process "
                f"--devices-per-process={launched}; drop --devices (or launch with "
                f"--devices-per-process {args.devices})"
            )
        devices = int(launched)

    import eqxpar as ep
    from eqxpar.cli import start_devices

    ep.distributed.initialize()
    start_devices(devices)
    return ep.distributed.is_main_process()


def load_batch(mesh, spec, global_shape, load) -> tuple:
    """A batch of global arrays of `global_shape`, each split as `spec` over `mesh`, with
    every process loading only its own block: `load(block)` returns this process's part
    of each array, `block` being one slice per dim (`eqxpar.distributed.local_slices`)."""
    import eqxpar as ep

    block = ep.distributed.local_slices(mesh, spec, global_shape)
    return tuple(
        ep.distributed.global_array(local, mesh, spec, global_shape) for local in load(block)
    )


def build_mesh(sizes: dict[str, int]):
    """`(eqxpar.make_mesh(**sizes), "data=2,tensor=4")`: the mesh (axes not named are 1)
    and its text; a one-line `--mesh:` error when the sizes do not fit the devices."""
    import eqxpar as ep

    try:
        mesh = ep.make_mesh(**sizes)
    except ValueError as e:
        sys.exit(f"--mesh: {e}")
    return mesh, ",".join(f"{k}={v}" for k, v in sizes.items())


def pipeline_schedule(name: str, virtual: int):
    """The `eqxpar.pipeline` schedule named by `--schedule`."""
    from eqxpar.pipeline import GPipe, Interleaved1F1B, OneFOneB

    if name == "interleaved":
        return Interleaved1F1B(virtual)
    return GPipe() if name == "gpipe" else OneFOneB()


def batch_layout(args, data_size: int, stages: int) -> tuple[int, int]:
    """`(virtual stages, microbatches)` from the flags; one-line errors for a batch that
    does not split over the data axis or into the microbatches."""
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
    import eqxpar as ep

    checkpointer = None
    if args.checkpoint_dir is not None:
        checkpointer = ep.train.Checkpointer(args.checkpoint_dir, keep=args.keep_checkpoints)
    if not args.resume:
        return checkpointer, state, 0
    if checkpointer is None or checkpointer.latest_step() is None:
        sys.exit(f"--resume: no checkpoint in --checkpoint-dir={args.checkpoint_dir}")
    state, first = ep.train.resume(checkpointer, state, mesh=mesh, strategy=strategy)
    if ep.distributed.is_main_process():
        print(f"resumed from step {int(state.step)} (batch {first})")
    return checkpointer, state, first


def _mesh(text: str) -> dict[str, int]:
    """`--mesh`: `eqxpar.cli.parse_mesh(text)`, the named axes only."""
    from eqxpar.cli import parse_mesh

    return parse_mesh(text)


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return int(text)

    return parse


def _strategy(moved: dict[str, str]) -> Callable[[str], str]:
    """An argparse type for `--strategy`: a value in `moved` (one that used to mean
    something else) fails with a one-line pointer to the flag it moved to."""

    def parse(text: str) -> str:
        if text in moved:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a data-parallel strategy; use {moved[text]} to choose the "
                f"model, and --strategy {{{','.join(STRATEGIES)}}} for how data shares it"
            )
        return text

    return parse


def base_parser(
    description: str, *, moved_strategies: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    """The flags every example takes.

    **Arguments:**

    - `description`: the script's one-line summary, for `--help`.
    - `moved_strategies`: old `--strategy` values and the flag that replaced each, e.g.
      `{"tp": "--model tp"}`; they fail with a one-line error naming that flag.

    **Returns:**

    The parser; each script adds its own flags to it.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--mesh",
        type=_mesh,
        default=None,
        help="mesh axis sizes, e.g. data=2,tensor=4; axes not named are 1 (default fits --devices)",
    )
    p.add_argument(
        "--devices",
        type=_at_least(0),
        default=None,
        help="simulate this many CPU devices (default 8; under eqxpar.launch, its "
        "--devices-per-process); 0 keeps JAX's own platform, e.g. on a GPU machine (so "
        "does JAX_PLATFORMS=cuda or tpu)",
    )
    p.add_argument(
        "--strategy",
        type=_strategy(moved_strategies or {}),
        choices=STRATEGIES,
        default="dp",
        help="how the data axis shares model states: dp (replicated), zero1, zero2, fsdp "
        "(default dp)",
    )
    p.add_argument("--steps", type=_at_least(1), default=300, help="training steps")
    p.add_argument("--batch-size", type=_at_least(1), default=128, help="global batch size")
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
        type=_at_least(1),
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
