"""MkDocs hook: draws the pipeline schedules' Gantt charts into the docs build.

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
    return out


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
