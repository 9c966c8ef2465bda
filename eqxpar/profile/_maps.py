"""Partition maps: which device holds which block of each weight, and the mesh's
device grid, as text tables and PNGs."""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .._sharding import partition_specs


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, P)


def _leaves(module: Any) -> list[tuple[str, tuple[int, ...], P]]:
    """`(key path, global shape, spec)` of each array of `module` (arrays or
    `jax.ShapeDtypeStruct`s, e.g. from `eqx.filter_eval_shape`): a placed array's own
    `NamedSharding` spec (e.g. FSDP's), else the declared one."""
    out = []

    def visit(path: Any, spec: Any, leaf: Any) -> None:
        if spec is not None and hasattr(leaf, "shape"):
            placed = getattr(leaf, "sharding", None)
            spec = placed.spec if isinstance(placed, NamedSharding) else spec
            out.append((jax.tree_util.keystr(path).lstrip("."), tuple(leaf.shape), spec))

    jax.tree_util.tree_map_with_path(visit, partition_specs(module), module, is_leaf=_is_spec)
    return out


def _slice_text(index: tuple, shape: tuple[int, ...]) -> str:
    parts = []
    for s, n in zip(index, shape):
        start, stop = s.indices(n)[:2]
        parts.append(":" if (start, stop) == (0, n) else f"{start}:{stop}")
    return "[" + ", ".join(parts) + "]"


def blocks(shape: tuple[int, ...], spec: P, mesh: Any) -> list[tuple[str, list[int]]]:
    """The distinct blocks of an array of global `shape` placed with `spec` on `mesh`:
    `(slice text, device ids holding it)`, in order of first device."""
    indices = NamedSharding(mesh, spec).devices_indices_map(shape)
    held: dict[str, list[int]] = {}
    for device in mesh.devices.flat:
        held.setdefault(_slice_text(indices[device], shape), []).append(device.id)
    return list(held.items())


def partition_table(module: Any, mesh: Any) -> str:
    """A text table: for each array of `module`, its global shape, its spec, the shape
    of one block and which devices hold each block.

    **Arguments:**

    - `module`: an eqxpar module (arrays or `jax.ShapeDtypeStruct`s), global shapes.
    - `mesh`: the mesh it is (or would be) placed on.

    **Returns:** a multi-line string, one weight per line, blocks as
    `[slices] on device ids`.
    """
    lines = []
    for path, shape, spec in _leaves(module):
        held = blocks(shape, spec, mesh)
        block = tuple(n // _splits(spec, mesh, d) for d, n in enumerate(shape))
        lines.append(f"{path}  {shape}  {_spec_text(spec)}  block {block}")
        if len(held) > 1:
            lines += [f"    {s} on {' '.join(map(str, ids))}" for s, ids in held]
        else:
            lines.append("    whole on every device")
    return "\n".join(lines)


def _spec_text(spec: P) -> str:
    return "P(" + ", ".join("None" if e is None else repr(e) for e in spec) + ")"


def _splits(spec: P, mesh: Any, dim: int) -> int:
    entry = tuple(spec)[dim] if dim < len(spec) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[n] for n in names)


def _grid(mesh: Any) -> tuple[list[str], list[str], np.ndarray]:
    """Row labels, column labels and the 2-D array of devices: the innermost axis of
    size > 1 across, every other axis of size > 1 down (outermost first)."""
    used = [(n, s) for n, s in mesh.shape.items() if s > 1] or [(mesh.axis_names[-1], 1)]
    inner, outer = used[-1], used[:-1]
    devices = np.asarray(mesh.devices).reshape(-1, inner[1])
    rows = []
    for index in np.ndindex(*[s for _, s in outer]):
        rows.append(" ".join(f"{n}={i}" for (n, _), i in zip(outer, index)) or "")
    cols = [f"{inner[0]}={i}" for i in range(inner[1])]
    return rows, cols, devices


def mesh_table(mesh: Any) -> str:
    """The mesh's device grid as text: axis sizes, then one row per index of the outer
    axes and one column per index of the innermost axis, each cell `device id (host
    process index)`.

    **Arguments:** `mesh`: a `jax.sharding.Mesh`.

    **Returns:** a multi-line string.
    """
    rows, cols, devices = _grid(mesh)
    width = max([len(r) for r in rows] + [4])
    lines = [" x ".join(f"{n}={s}" for n, s in mesh.shape.items())]
    lines.append(" " * width + "".join(f"{c:>12}" for c in cols))
    for label, row in zip(rows, devices):
        cells = "".join(f"{f'{d.id} (h{d.process_index})':>12}" for d in row)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The partition-map pictures need matplotlib: `pip install matplotlib` "
            "(or eqxpar[examples])."
        ) from e
    return Figure(figsize=(width, height), layout="constrained")


def plot_mesh(mesh: Any, path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """Draws the mesh's device grid (as `mesh_table`) as a PNG, each device coloured by
    its host.

    **Arguments:** `mesh`; `path`: where to write the PNG.

    **Returns:** `path`.
    """
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    rows, cols, devices = _grid(mesh)
    fig = _figure(1.6 + 1.1 * len(cols), 1.2 + 0.7 * len(rows))
    ax = fig.add_subplot()
    hosts = colormaps["Pastel1"]
    for r, row in enumerate(devices):
        for c, d in enumerate(row):
            ax.add_patch(Rectangle((c, r), 0.94, 0.9, color=hosts(d.process_index % 9)))
            ax.text(
                c + 0.47,
                r + 0.45,
                f"{d.id}\nhost {d.process_index}",
                ha="center",
                va="center",
                fontsize=8,
            )
    ax.set_xlim(0, len(cols))
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([c + 0.47 for c in range(len(cols))], cols, fontsize=8)
    ax.set_yticks([r + 0.45 for r in range(len(rows))], rows, fontsize=8)
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    ax.set_title(" x ".join(f"{n}={s}" for n, s in mesh.shape.items()), fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def plot_partition(
    module: Any, mesh: Any, path: str | os.PathLike[str], *, names: list[str] | None = None
) -> str | os.PathLike[str]:
    """Draws, for each named weight, its last two dims as a rectangle cut into the
    blocks its spec gives, each block labelled with the devices that hold it.

    **Arguments:**

    - `module`, `mesh`: as for `partition_table`.
    - `path`: where to write the PNG.
    - `names`: key paths as `partition_table` prints them (default: every array with
      two or more dims).

    **Returns:** `path`.
    """
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    leaves = [x for x in _leaves(module) if len(x[1]) >= 2]
    if names is not None:
        known = {x[0]: x for x in leaves}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"plot_partition: no weight {missing[0]!r}; weights: {sorted(known)}.")
        leaves = [known[n] for n in names]
    fig = _figure(3.0 * len(leaves), 3.2)
    colors = colormaps["tab10"]
    for k, (name, shape, spec) in enumerate(leaves):
        ax = fig.add_subplot(1, len(leaves), k + 1)
        rows, cols = shape[-2:]
        index = {d.id: i for d, i in NamedSharding(mesh, spec).devices_indices_map(shape).items()}
        for i, (_, ids) in enumerate(blocks(shape, spec, mesh)):
            s = index[ids[0]]
            (r0, r1), (c0, c1) = (s[-2].indices(rows)[:2]), (s[-1].indices(cols)[:2])
            ax.add_patch(
                Rectangle((c0, r0), c1 - c0, r1 - r0, color=colors(i % 10), alpha=0.55, ec="white")
            )
            label = "dev " + ",".join(map(str, ids))
            ax.text(
                (c0 + c1) / 2,
                (r0 + r1) / 2,
                label,
                ha="center",
                va="center",
                fontsize=7,
                rotation=90 if c1 - c0 < (r1 - r0) / 2 else 0,
            )
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
        ax.set_title(f"{name}\n{shape} {_spec_text(spec)}", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.savefig(path, dpi=110)
    return path
