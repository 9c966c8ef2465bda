"""Gantt charts of pipeline tick tables."""

from __future__ import annotations

import os

from ._schedule import TickTable

_HATCHES = ("", "///", "...", "xxx", "\\\\\\", "ooo")


def plot_schedule(
    table: TickTable, path: str | os.PathLike[str], *, title: str | None = None
) -> str | os.PathLike[str]:
    """Draws a tick table as a Gantt chart and saves it as a PNG.

    Rows are stages (stage 0 on top), columns are ticks. Forwards are blue,
    backwards (input gradients, `B`) orange and weight gradients (`W`) green, darker
    for later microbatches; each box is labelled with its
    microbatch. With interleaving, each virtual chunk has its own hatching (chunk 0
    plain). Idle slots are white. Uses matplotlib's Agg canvas directly,
    so pyplot's global state and backend are left alone.

    **Arguments:**

    - `table`: the `TickTable` to draw.
    - `path`: where to write the PNG.
    - `title`: a title line; the stages, microbatches, ticks and bubble fraction are
      appended either way.

    **Returns:**

    `path`.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_schedule needs matplotlib: `pip install matplotlib` (or eqxpar[examples])."
        ) from e

    p, m, v, n = table.stages, table.microbatches, table.virtual, table.num_ticks
    cmaps = {"F": colormaps["Blues"], "B": colormaps["Oranges"], "W": colormaps["Greens"]}

    def shade(kind: str, mb: int) -> tuple[float, float, float, float]:
        r, g, b, alpha = cmaps[kind](0.3 + 0.55 * (mb / (m - 1) if m > 1 else 0.5))
        return (r, g, b, alpha)

    cell = 0.32
    fig = Figure(figsize=(max(6.0, 1.2 + n * cell), 1.6 + p * 0.45), layout="constrained")
    ax = fig.add_subplot()
    fontsize = 7 if n <= 60 else 5
    for t, row in enumerate(table.grid):
        for s, a in enumerate(row):
            if a is None:
                continue
            color = shade(a.kind, a.microbatch)
            ax.add_patch(
                Rectangle(
                    (t, s),
                    1,
                    1,
                    facecolor=color,
                    edgecolor="black",
                    linewidth=0.5,
                    hatch=_HATCHES[a.virtual % len(_HATCHES)],
                )
            )
            luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
            ax.text(
                t + 0.5,
                s + 0.5,
                str(a.microbatch),
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if luminance < 0.5 else "black",
                bbox=dict(boxstyle="square,pad=0.05", fc=color, ec="none") if a.virtual else None,
            )
    ax.set_xlim(0, n)
    ax.set_ylim(p, 0)  # stage 0 on top
    ax.set_yticks([s + 0.5 for s in range(p)], [f"stage {s}" for s in range(p)])
    step = 1 if n <= 40 else 5 if n <= 200 else 10
    ax.set_xticks([t + 0.5 for t in range(0, n, step)], [str(t) for t in range(0, n, step)])
    ax.tick_params(axis="both", length=0, labelsize=8)
    ax.set_xlabel("tick")
    ax.set_aspect("auto")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    handles = [
        Patch(facecolor=shade("F", m - 1), edgecolor="black", label="forward"),
        Patch(
            facecolor=shade("B", m - 1),
            edgecolor="black",
            label="input gradient (B)" if table.split_backward else "backward",
        ),
    ]
    if table.split_backward:
        handles.append(
            Patch(facecolor=shade("W", m - 1), edgecolor="black", label="weight gradient (W)")
        )
    if v > 1:
        handles += [
            Patch(
                facecolor="white",
                edgecolor="black",
                hatch=_HATCHES[c % len(_HATCHES)],
                label=f"chunk {c}",
            )
            for c in range(v)
        ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        frameon=False,
    )
    summary = (
        f"p={p}, m={m}" + (f", v={v}" if v > 1 else "") + f": {n} ticks, "
        f"bubble {table.bubble_fraction():.1%}, "
        f"max in flight {table.max_in_flight()}"
    )
    ax.set_title(f"{title} ({summary})" if title else summary, fontsize=10)
    fig.savefig(path, dpi=110)
    return path
