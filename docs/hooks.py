"""MkDocs hook: draws the pipeline schedules' Gantt charts, the partition maps of
`docs/seeing.md` and the loss curve of `docs/quickstart.md` into the docs build,
includes `benchmarks/RESULTS.md` in the Benchmarks page with a chart of
`benchmarks/RESULTS.json` (drawn by `benchmarks/_harness.chart`), and serves MathJax from the
site itself when it is installed.

`docs/pipeline.md` shows the tick tables of `GPipe()`, `OneFOneB()` and
`Interleaved1F1B(2)` at `p = 4` stages and `m = 8` microbatches. The PNGs are not
committed (no binaries under `docs/`): `on_files` draws them with
`eqxpar.pipeline.plot_schedule` at every build and adds them to the site as generated
files, so `![...](images/pipeline-gpipe.png)` in the page resolves like any other file
(and `mkdocs build --strict` checks the link). Needs matplotlib (`eqxpar[examples]`).

`docs/benchmarks.md` holds the marker `<!-- benchmarks/RESULTS.md -->`; `on_page_markdown`
replaces it with that file's text at every build (the page is not a copy), or with a
note when the file is missing. Its relative links to files under `benchmarks/` (charts)
are added to the site; links to files that are not there become plain text.

MathJax: `js/mathjax-loader.js` (generated here) configures MathJax for
`pymdownx.arithmatex` and loads `js/mathjax/tex-mml-chtml.js` from the site, falling
back to the CDN when that fails. `on_post_build` copies MathJax 3 into `js/mathjax/`
from the first of `$EQXPAR_MATHJAX`, `.venv/mathjax/node_modules/mathjax/es5` (what
`make docs` installs with npm) and Debian's `/usr/share/nodejs/mathjax-full/es5` that
exists, so the maths renders offline; without one, pages use the CDN.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import re
import shutil
import tempfile

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

log = logging.getLogger("mkdocs.hooks.eqxpar")
ROOT = pathlib.Path(__file__).resolve().parent.parent

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
        out.update(_loss_curve(pathlib.Path(tmp)))
        out.update(_benchmark_chart(pathlib.Path(tmp)))
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


def _loss_curve(tmp: pathlib.Path) -> dict[str, bytes]:
    """`docs/quickstart.md`'s loss curve: a small byte-level `models.Transformer` (2
    layers x 64 wide) trained for 120 steps on Python's bundled documentation on
    `data=2, tensor=4`, with `eqxpar.train.fit`, drawn by `eqxpar.train.plot_losses`
    (about 10 s on two CPU cores)."""
    import pydoc_data.topics

    import jax
    import numpy as np
    import optax

    import eqxpar as ep
    from models import Transformer, TransformerConfig

    ep.simulate_cpu_devices(8)
    text = "\n\n".join(pydoc_data.topics.topics.values()).encode()
    corpus = np.frombuffer(text, np.uint8).astype(np.int32)
    config = TransformerConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, max_seq_len=64)
    mesh = ep.make_mesh(data=2, tensor=4)
    optimizer = optax.adam(3e-3)
    state = ep.train.init_state(
        Transformer, config, key=jax.random.key(0), optimizer=optimizer, mesh=mesh
    )
    step = ep.train.make_train_step(
        lambda m, x, y, key: m.loss(x, y), optimizer, mesh=mesh, clip_norm=1.0
    )

    def batch(i: int) -> tuple[np.ndarray, np.ndarray]:
        starts = np.random.default_rng([0, i]).integers(0, len(corpus) - 65, size=16)
        windows = np.stack([corpus[s : s + 65] for s in starts])
        return windows[:, :-1], windows[:, 1:]

    _, rows = ep.train.fit(step, state, batch, steps=120, progress=False)
    path = tmp / "quickstart-loss.png"
    ep.train.plot_losses(path, rows, "byte LM, 2 layers x 64, data=2,tensor=4, 120 steps")
    return {f"{IMAGES}/quickstart-loss.png": path.read_bytes()}


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
    files.append(File.generated(config, LOADER, content=_loader()))
    for src_uri, path in _benchmark_files().items():
        files.append(File.generated(config, src_uri, abs_src_path=str(path)))
    return files


# --- Benchmarks: benchmarks/RESULTS.md, included at build time -------------------------

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MARKER = "<!-- benchmarks/RESULTS.md -->"
BENCH_FILES = "benchmarks-files"  # where RESULTS.md's linked files go in the site
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)([^)]*)\)")


def _local(target: str) -> pathlib.Path | None:
    """The file under benchmarks/ that a relative link of RESULTS.md names, if any."""
    if re.match(r"^[a-z]+:|^#|^/", target):
        return None
    path = (RESULTS.parent / target.split("#")[0]).resolve()
    return path if path.is_file() and RESULTS.parent in path.parents else None


def _benchmark_files() -> dict[str, pathlib.Path]:
    """RESULTS.md's linked local files, by their `src_uri` in the site."""
    if not RESULTS.is_file():
        return {}
    out = {}
    for match in _LINK.finditer(RESULTS.read_text()):
        path = _local(match[3])
        if path is not None:
            out[f"{BENCH_FILES}/{path.relative_to(RESULTS.parent).as_posix()}"] = path
    return out


def _results_markdown() -> str:
    """RESULTS.md's text for the page: links to its local files rewritten to their
    copies in the site, links to anything else relative turned into plain text."""
    if not RESULTS.is_file():
        return (
            '!!! warning "No results yet"\n    `benchmarks/RESULTS.md` was not found when '
            "this site was built, so there is no table here. Run `make bench` (or the "
            "scripts under `benchmarks/`) to produce it, then rebuild the docs.\n"
        )

    def rewrite(match: re.Match) -> str:
        bang, text, target, rest = match.groups()
        if re.match(r"^[a-z]+:|^#", target):
            return match[0]
        path = _local(target)
        if path is None:
            return text if not bang else f"*({text or target}: not in the repository)*"
        fragment = target.partition("#")[2]
        uri = f"{BENCH_FILES}/{path.relative_to(RESULTS.parent).as_posix()}"
        return f"{bang}[{text}]({uri}{'#' + fragment if fragment else ''}{rest})"

    text = RESULTS.read_text()
    body = text.split("\n", 1)[1] if text.startswith("# ") else text  # the page has its h1
    return _LINK.sub(rewrite, body)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Puts `benchmarks/RESULTS.md` and the chart of `benchmarks/RESULTS.json` in place
    of their markers."""
    if CHART_MARKER in markdown:
        markdown = markdown.replace(CHART_MARKER, _chart_markdown())
    if MARKER in markdown:
        return markdown.replace(MARKER, _results_markdown())
    return markdown


# --- Benchmarks: the chart of benchmarks/RESULTS.json, drawn at build time -------------

RESULTS_JSON = ROOT / "benchmarks" / "RESULTS.json"
CHART_MARKER = "<!-- benchmarks/RESULTS.json chart -->"
CHART = f"{IMAGES}/benchmarks.png"


def _benchmark_chart(tmp: pathlib.Path) -> dict[str, bytes]:
    """`benchmarks/_harness.chart` of the committed results (none without the file)."""
    import json
    import sys

    if not RESULTS_JSON.is_file():
        return {}
    sys.path.insert(0, str(RESULTS_JSON.parent))  # benchmarks/ is not a package
    try:
        import _harness
    finally:
        sys.path.remove(str(RESULTS_JSON.parent))
    path = tmp / "benchmarks.png"
    _harness.chart(json.loads(RESULTS_JSON.read_text()), str(path))
    return {CHART: path.read_bytes()}


def _chart_markdown() -> str:
    """The chart's image, or a note when `benchmarks/RESULTS.json` is missing."""
    if not RESULTS_JSON.is_file():
        return (
            '!!! warning "No chart yet"\n    `benchmarks/RESULTS.json` was not found when '
            "this site was built, so there is no chart here. `make bench` writes it.\n"
        )
    return (
        "![Step time of every variant over its case's fastest baseline, one bar each; "
        f"grey bars are the baselines]({CHART})\n"
    )


# --- MathJax, served from the site when installed, the CDN otherwise -------------------

LOADER = "js/mathjax-loader.js"
CDN = "https://unpkg.com/mathjax@3/es5/tex-mml-chtml.js"
# What tex-mml-chtml.js loads at run time: its fonts, TeX extensions, the menu's parts.
_MATHJAX_PARTS = ("tex-mml-chtml.js", "output", "input", "a11y", "ui", "adaptors")


def _loader() -> str:
    """The script that configures MathJax and loads it, local copy first."""
    return f"""// Generated by docs/hooks.py.
window.MathJax = {{
  tex: {{inlineMath: [["\\\\(", "\\\\)"]], displayMath: [["\\\\[", "\\\\]"]],
        processEscapes: true, processEnvironments: true}},
  options: {{ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex"}}
}};
(function () {{
  var local = new URL("mathjax/tex-mml-chtml.js", document.currentScript.src).href;
  function load(src, fallback) {{
    var script = document.createElement("script");
    script.src = src;
    script.async = true;
    if (fallback) script.onerror = function () {{ load(fallback, null); }};
    document.head.appendChild(script);
  }}
  load(local, "{CDN}");
}})();
"""


def _mathjax_source() -> pathlib.Path | None:
    candidates = [
        os.environ.get("EQXPAR_MATHJAX"),
        ROOT / ".venv" / "mathjax" / "node_modules" / "mathjax" / "es5",
        "/usr/share/nodejs/mathjax-full/es5",
    ]
    for candidate in candidates:
        if candidate and (pathlib.Path(candidate) / "tex-mml-chtml.js").is_file():
            return pathlib.Path(candidate)
    return None


def on_post_build(config: MkDocsConfig) -> None:
    """Copies MathJax into the site, so that its maths renders without a network."""
    source = _mathjax_source()
    if source is None:
        log.info("MathJax is not installed (make docs installs it): pages load it from %s", CDN)
        return
    target = pathlib.Path(config.site_dir) / "js" / "mathjax"
    for part in _MATHJAX_PARTS:
        path = source / part
        if path.is_dir():
            shutil.copytree(path, target / part, dirs_exist_ok=True)
        elif path.is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / part)
    log.info("MathJax copied from %s into the site", source)
