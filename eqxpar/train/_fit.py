"""The fit loop: steps, progress bar, metrics, evaluation, checkpoints, NaN guard."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax

from ._checkpoint import Checkpointer, CheckpointError
from ._state import TrainState


def fit(
    step_fn: Callable[..., tuple[TrainState, dict]],
    state: TrainState,
    batch_fn: Callable[[int], tuple],
    *,
    steps: int,
    start: int = 0,
    eval_fn: Callable[[TrainState], dict] | None = None,
    eval_every: int | None = None,
    checkpointer: Checkpointer | None = None,
    checkpoint_every: int | None = None,
    metrics_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    on_nonfinite: Literal["stop", "skip"] = "stop",
    items_per_step: int | None = None,
    progress: bool = True,
    progress_every: int | None = None,
) -> tuple[TrainState, list[dict]]:
    """Trains until `steps` batches have been used, and returns the state and metrics.

    Batches come from `batch_fn(i)`, a function of the batch index alone, so the data
    position is just `i`: checkpoints record it, and resuming from one replays exactly
    the batches an uninterrupted run would have used.

    **Arguments:**

    - `step_fn`: `step_fn(state, *batch) -> (state, metrics)`, as `make_train_step`
      returns; `metrics["loss"]` is required. Other scalar metrics (beyond
      `grad_norm` and `finite`, e.g. an MoE's `moe_dropped_fraction`) are written
      to each row and shown in the progress line.
    - `state`: the `TrainState` to start from.
    - `batch_fn`: `batch_fn(i) -> batch tuple` for batch index `i`.
    - `steps`: stop after batch `steps - 1`.
    - `start`: the first batch index (e.g. from `Checkpointer.restore`'s extra
      `"data_step"`; `resume` below does it for you).
    - `eval_fn`, `eval_every`: `eval_fn(state) -> dict of floats`, run every
      `eval_every` batches and at the end.
    - `checkpointer`, `checkpoint_every`: save every `checkpoint_every` batches, at the
      end, and on Ctrl-C (then stop cleanly and return).
    - `metrics_path`: append one JSON line per step and per evaluation.
    - `plot_path`: a loss-curve PNG written at the end.
    - `on_nonfinite`: a non-finite loss `"stop"`s with a `FloatingPointError` naming the
      step (the state before it is returned in the error's `.state` and, with a
      checkpointer, saved), or `"skip"`s the update and goes on with the next batch.
    - `items_per_step`: tokens (or examples) per step, for the throughput column.
    - `progress`: show progress. On a terminal (when `sys.stderr` is one) a tqdm bar;
      elsewhere (CI logs, `| tee`, a file), where a bar's carriage returns would pile
      up on one line, a plain line every `progress_every` steps and after the last:
      `step 30/300  loss 2.4242  5,412 items/s  378 ms/step`, with that step's loss and
      the mean step time since the previous line.
    - `progress_every`: steps between plain progress lines; by default a tenth of the
      steps this call runs, and at most 100.

    In a run of several processes (`eqxpar.distributed`), every process trains and
    returns the same rows, but only process 0 shows progress, writes `metrics_path` and
    draws `plot_path`.

    **Returns:**

    `(state, rows)`: the final state and the metric rows.
    """
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite={on_nonfinite!r}; use 'stop' or 'skip'.")
    rows: list[dict] = []
    main = jax.process_index() == 0  # the process that prints and writes files
    out = None if metrics_path is None or not main else Path(metrics_path)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    bar = _progress(start, steps, progress, progress_every, items_per_step, main)

    def record(row: dict) -> None:
        rows.append(row)
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def save(i: int) -> None:
        if checkpointer is not None:
            checkpointer.save(state, {"data_step": i})

    i = start
    try:
        for i in range(start, steps):
            batch = batch_fn(i)
            t0 = time.perf_counter()
            new_state, metrics = step_fn(state, *batch)
            loss = float(metrics["loss"])
            dt = time.perf_counter() - t0
            if not math.isfinite(loss):
                if on_nonfinite == "stop":
                    save(i)
                    error = FloatingPointError(
                        f"step {i}: the loss is {loss}; stopping before applying the update "
                        f"(the state of step {int(state.step)} is kept"
                        f"{' and checkpointed' if checkpointer is not None else ''}). Lower "
                        f"the learning rate, or pass on_nonfinite='skip' to skip such updates."
                    )
                    error.state = state  # type: ignore[attr-defined]
                    raise error
                record({"step": i, "skipped": True, "loss": loss})
                bar.update(i + 1, loss, dt)
                continue
            state = new_state
            row = {"step": i, "loss": loss, "step_time_s": dt}
            if "grad_norm" in metrics:
                row["grad_norm"] = float(metrics["grad_norm"])
            extra = {k: float(v) for k, v in metrics.items() if k not in _STEP_METRICS}
            row.update(extra)
            if items_per_step:
                row["items_per_s"] = items_per_step / dt
            record(row)
            done = i + 1
            bar.update(done, loss, dt, extra)
            if eval_fn is not None and eval_every and (done % eval_every == 0 or done == steps):
                evaluated = {k: float(v) for k, v in eval_fn(state).items()}
                record({"step": i, **{f"eval_{k}": v for k, v in evaluated.items()}})
                bar.write(
                    f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluated.items())
                )
            if checkpoint_every and done % checkpoint_every == 0 and done < steps:
                save(done)
        save(steps)
    except KeyboardInterrupt:
        bar.write(f"interrupted at batch {i}: saving and stopping")
        save(i)
    finally:
        if checkpointer is not None:
            checkpointer.wait()
        bar.close()
        if plot_path is not None and rows and main:
            plot_losses(Path(plot_path), rows)
    return state, rows


def resume(
    checkpointer: Checkpointer,
    like: TrainState,
    *,
    mesh: Any,
    strategy: Any = "dp",
    fallback: bool = False,
) -> tuple[TrainState, int]:
    """The state and data position to continue from: the newest checkpoint, restored.

    **Arguments:**

    - `checkpointer`: where the checkpoints are.
    - `like`, `mesh`, `strategy`: the target run's state, mesh and strategy, as for
      `Checkpointer.restore`.
    - `fallback`: if the newest checkpoint is damaged, try the older ones, newest
      first, and restore the first readable one, printing which steps were skipped
      and why, and which was restored. Without it, the `CheckpointError` propagates.

    **Returns:**

    `(state, start)`: the restored state and the batch index to continue from, or
    `(like, 0)` if there is no checkpoint.

    **Raises:**

    `CheckpointError` if the newest checkpoint is damaged (with `fallback`: if every
    checkpoint is).
    """
    steps = checkpointer.all_steps()
    if not steps:
        return like, 0
    if not fallback:
        steps = steps[-1:]
    errors: list[CheckpointError] = []
    for step in reversed(steps):
        try:
            state, extra = checkpointer.restore(like, mesh=mesh, strategy=strategy, step=step)
        except CheckpointError as e:
            if not fallback:
                raise
            if jax.process_index() == 0:
                print(
                    f"skipping damaged checkpoint step {step}: its {e.part} cannot be read "
                    f"({e.reason})"
                )
            errors.append(e)
            continue
        if errors:
            skipped = ", ".join(f"step {e.step}" for e in errors)
            if jax.process_index() == 0:
                print(f"restored checkpoint step {step} (skipped damaged {skipped})")
        return state, int(extra.get("data_step", int(state.step)))
    listed = "; ".join(f"step {e.step}: {e.part} ({e.reason})" for e in errors)
    raise CheckpointError(
        f"no readable checkpoint in {checkpointer.directory}: all {len(errors)} are damaged "
        f"({listed}). Restore a backup copy of the directory, or start from scratch.",
        path=checkpointer.directory,
    ) from errors[0]


def plot_losses(path: Path, rows: list[dict], title: str | None = None) -> Path:
    """The training loss (and evaluation losses, if any) against the step, as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    train = [r for r in rows if "loss" in r and not r.get("skipped")]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    for key in sorted({k for r in rows for k in r if k.startswith("eval_") and "loss" in k}):
        points = [r for r in rows if key in r]
        ax.plot([r["step"] for r in points], [r[key] for r in points], "o-", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _progress(
    start: int,
    steps: int,
    progress: bool,
    every: int | None,
    items_per_step: int | None,
    main: bool = True,
) -> _Lines | _Bar:
    """A tqdm bar on a terminal; plain lines (or none, without `progress`) elsewhere;
    nothing at all on a process other than the `main` one."""
    if every is None:
        every = max(1, min(100, math.ceil((steps - start) / 10)))
    elif every < 1:
        raise ValueError(f"progress_every={every}; it must be at least 1.")
    lines = _Lines(steps, every if progress and main else None, items_per_step, main)
    if progress and main and sys.stderr.isatty():  # where tqdm draws
        try:
            return _Bar(start, steps, items_per_step)
        except ImportError:  # pragma: no cover - tqdm is in the `examples` extra
            return lines
    return lines


_STEP_METRICS = ("loss", "grad_norm", "finite")
"""The train step's own metrics; any other (a loss function's, e.g. an MoE's dropped
fraction) is recorded in each row and shown in the progress line."""


class _Lines:
    """Progress as a plain line every `every` steps and after the last (none if `every`
    is None); messages as printed lines (none if not `echo`)."""

    def __init__(
        self, steps: int, every: int | None, items_per_step: int | None, echo: bool = True
    ):
        self.steps, self.every, self.items_per_step = steps, every, items_per_step
        self.echo = echo
        self.time, self.count = 0.0, 0

    def update(self, done: int, loss: float, dt: float, extra: dict | None = None) -> None:
        self.time, self.count = self.time + dt, self.count + 1
        if self.every is None or (done % self.every and done != self.steps):
            return
        mean = self.time / self.count
        rate = f"  {self.items_per_step / mean:,.0f} items/s" if self.items_per_step else ""
        more = "".join(f"  {k} {v:.4g}" for k, v in (extra or {}).items())
        print(
            f"step {done}/{self.steps}  loss {loss:.4f}{more}{rate}  {1e3 * mean:.0f} ms/step",
            flush=True,
        )
        self.time, self.count = 0.0, 0

    def write(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def close(self) -> None:
        """Nothing to close: every line is already flushed."""


class _Bar:
    """Progress as a tqdm bar with the loss, throughput and step time."""

    def __init__(self, start: int, steps: int, items_per_step: int | None):
        from tqdm import tqdm

        self.items_per_step = items_per_step
        self.bar = tqdm(total=steps, initial=start, desc="train", unit="step", mininterval=1.0)

    def update(self, done: int, loss: float, dt: float, extra: dict | None = None) -> None:
        rate = f"{self.items_per_step / dt:,.0f}" if self.items_per_step else "-"
        more = {k: f"{v:.4g}" for k, v in (extra or {}).items()}
        shown = {"loss": f"{loss:.4f}", **more, "per_s": rate, "ms": f"{1e3 * dt:.0f}"}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
