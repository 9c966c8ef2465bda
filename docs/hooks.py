"""MkDocs hook: draws the pipeline schedules' Gantt charts and the partition maps of
`docs/seeing.md` into the docs build.

`docs/pipeline.md` shows the tick tables of `GPipe()`, `OneFOneB()` and
`Interleaved1F1B(2)` at `p = 4` stages and `m = 8` microbatches. The PNGs are not
committed (no binaries under `docs/`): `on_files` draws them with
`eqxpar.pipeline.plot_schedule` at every build and adds them to the site as generated
files, so `![...](images/pipeline-gpipe.png)` in the page resolves like any other file
(and `mkdocs build --strict` checks the link). Needs matplotlib (`eqxpar[examples]`).
"""

from __future__ import annotations

import functools
import pathlib
import tempfile

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

STAGES, MICROBATCHES = 4, 8
IMAGES = "images"  # the charts' folder in the site; the page links images/pipeline-*.png


@functools.cache
def _render() -> dict[str, bytes]:
    """The PNGs' bytes by `src_uri`; drawn once per process (`mkdocs serve` rebuilds)."""
    from eqxpar.pipeline import GPipe, Interleaved1F1B, OneFOneB, ZeroBubbleH1, plot_schedule

    charts = {
        "pipeline-gpipe.png": (GPipe(), "GPipe"),
        "pipeline-1f1b.png": (OneFOneB(), "1F1B"),
        "pipeline-interleaved.png": (Interleaved1F1B(2), "Interleaved 1F1B, v=2"),
        "pipeline-1f1b-split.png": (OneFOneB(), "1F1B as the executor runs it (split)"),
        "pipeline-zb-h1.png": (ZeroBubbleH1(), "ZB-H1"),
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (schedule, title) in charts.items():
            path = pathlib.Path(tmp) / name
            table = schedule.table(STAGES, MICROBATCHES)
            plot_schedule(table.split() if "split" in name else table, path, title=title)
            out[f"{IMAGES}/{name}"] = path.read_bytes()
        out.update(_maps(pathlib.Path(tmp)))
    return out


def _maps(tmp: pathlib.Path) -> dict[str, bytes]:
    """`docs/seeing.md`'s pictures: the `data=2, tensor=4` mesh and the blocks of four
    weights of its small Transformer on it (8 simulated CPU devices)."""
    import equinox as eqx
    import jax

    import eqxpar as ep
    from eqxpar.profile import plot_mesh, plot_partition
    from models import Transformer, TransformerConfig

    ep.simulate_cpu_devices(8)
    mesh = ep.make_mesh(data=2, tensor=4)
    config = TransformerConfig(
        vocab_size=56, dim=40, num_layers=4, num_heads=4, mlp_dim=72, max_seq_len=16
    )
    model = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
    names = ["embed.weight", "layers.attn.qkv.weight", "layers.attn.out.weight"]
    names.append("layers.mlp.up.weight")
    plot_mesh(mesh, tmp / "seeing-mesh.png")
    plot_partition(model, mesh, tmp / "seeing-partition.png", names=names)
    return {
        f"{IMAGES}/{n}": (tmp / n).read_bytes() for n in ("seeing-mesh.png", "seeing-partition.png")
    }


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Adds the Gantt charts to the site's files, and keeps this hook out of the site."""
    hook = files.get_file_from_path("hooks.py")
    if hook is not None:
        files.remove(hook)
    for src_uri, content in _render().items():
        if files.get_file_from_path(src_uri) is not None:
            raise RuntimeError(
                f"docs/{src_uri} exists, but docs/hooks.py generates it; delete the file "
                f"(binaries are not committed under docs/)."
            )
        files.append(File.generated(config, src_uri, content=content))
    return files
