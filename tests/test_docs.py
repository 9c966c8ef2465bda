"""Runs the documentation: every ```python block of every docs/*.md page.

The blocks of one page run in order in one shared namespace, like the cells of a
notebook, in this process (8 simulated CPU devices, strict dtype promotion, rank
promotion raising: see conftest.py). A python block followed directly by a block
opened with ```text title="Output" must print exactly that text. Tracebacks give the
page's own line numbers.
"""

import __future__

import contextlib
import dataclasses
import io
import json
import pathlib
import re
import sys
import types

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
# Tutorial pages: they must hold code, so that they are tested.
MUST_RUN = (
    "index.md",
    "concepts.md",
    "meshes.md",
    "tensor-parallel.md",
    "howto-checkpoints.md",
    "howto-mixed-precision.md",
    "howto-remat.md",
    "howto-debugging.md",
    "howto-reports.md",
)
# Pages that compile whole train steps (a minute or more between them): `make test-slow`
# (and CI) runs them, the fast suite runs the rest.
SLOW_PAGES = ("transformer.md", "data-parallel.md", "context-parallel.md", "moe.md")

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)(?P<info>.*)$")


@dataclasses.dataclass
class Block:
    lang: str
    info: str
    first: int  # 0-based index of the opening fence
    last: int  # 0-based index of the closing fence
    source: str

    @property
    def line(self) -> int:
        """1-based line number of the block's first line of code."""
        return self.first + 2

    @property
    def is_output(self) -> bool:
        return self.lang == "text" and 'title="Output"' in self.info


def _blocks(lines: list[str]) -> list[Block]:
    blocks, i = [], 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"unclosed code fence opened on line {i + 1}")
        body = [ln.removeprefix(indent) for ln in lines[i + 1 : j]]
        blocks.append(Block(match["lang"], match["info"], i, j, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def parse(text: str) -> list[tuple[Block, Block | None]]:
    """The page's python blocks in order, each with the Output block after it, or None."""
    lines = text.splitlines()
    blocks = _blocks(lines)

    def adjacent(a: Block, b: Block) -> bool:
        return not any(ln.strip() for ln in lines[a.last + 1 : b.first])

    pairs = []
    for k, block in enumerate(blocks):
        if block.is_output and not (
            k and blocks[k - 1].lang == "python" and adjacent(blocks[k - 1], block)
        ):
            raise ValueError(
                f"the Output block on line {block.first + 1} must directly follow a python "
                f"block (only blank lines between)"
            )
        if block.lang == "python":
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            output = nxt if nxt and nxt.is_output and adjacent(block, nxt) else None
            pairs.append((block, output))
    return pairs


def _pages() -> list[str]:
    pages = sorted(p.name for p in DOCS.glob("*.md") if parse(p.read_text()))
    readme = DOCS.parent / "README.md"  # its example runs too
    return pages + (["../README.md"] if parse(readme.read_text()) else [])


def test_tutorials_have_code():
    missing = [name for name in MUST_RUN if name not in _pages()]
    assert not missing, f"these pages must hold ```python blocks: {missing}"


@pytest.mark.parametrize(
    "page", [pytest.param(p, marks=[pytest.mark.slow] if p in SLOW_PAGES else []) for p in _pages()]
)
def test_page(page: str):
    path = DOCS / page
    module = types.ModuleType(f"docs_{path.stem.replace('-', '_')}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # so that classes defined on the page pickle
    try:
        for block, output in parse(path.read_text()):
            # Pad with blank lines so that tracebacks give the line number in the page.
            code = compile("\n" * (block.line - 1) + block.source, str(path), "exec")
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    exec(code, module.__dict__)
            finally:
                sys.stdout.write(printed.getvalue())  # shown by pytest if the test fails
            if output is not None:
                got = [ln.rstrip() for ln in printed.getvalue().rstrip().splitlines()]
                want = [ln.rstrip() for ln in output.source.rstrip().splitlines()]
                assert got == want, (
                    f"{page}: the block on line {block.line} printed something other than "
                    f"its Output block on line {output.line}.\n--- printed ---\n"
                    + "\n".join(got)
                    + "\n--- documented ---\n"
                    + "\n".join(want)
                )
    finally:
        del sys.modules[module.__name__]


PUBLIC = (
    "eqxpar",
    "eqxpar.cli",
    "eqxpar.collectives",
    "eqxpar.distributed",
    "eqxpar.nn",
    "eqxpar.pipeline",
    "eqxpar.profile",
    "eqxpar.train",
    "models",
)


def test_api_reference_lists_every_public_name():
    import importlib

    text = (DOCS / "api.md").read_text()
    rendered = set(re.findall(r"^::: ([\w.]+)", text, re.M))
    missing, stale = [], []
    for name in PUBLIC:
        module = importlib.import_module(name)
        for attr in sorted(getattr(module, "__all__", vars(module))):
            value = getattr(module, attr)
            if attr.startswith("_") or isinstance(value, types.ModuleType | __future__._Feature):
                continue
            full = f"{name}.{attr}"
            # Rendered from its docstring, or (constants, deprecated aliases) named in text.
            if full not in rendered and f"`{full}`" not in text:
                missing.append(full)
    for full in rendered:
        module, _, attr = full.rpartition(".")
        if not hasattr(importlib.import_module(module), attr):
            stale.append(full)
    assert not missing, f"public names missing from docs/api.md: {missing}"
    assert not stale, f"docs/api.md documents names that no longer exist: {stale}"


def _nav_pages(node) -> list[str]:
    """Every page file named in mkdocs.yml's `nav`, depth first."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return [p for item in node for p in _nav_pages(item)]


def test_navigation_lists_every_page():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((DOCS.parent / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav) == pages, (
        f"pages not in mkdocs.yml's nav: {sorted(set(pages) - set(nav))}; "
        f"nav entries with no page: {sorted(set(nav) - set(pages))}"
    )
    assert nav[:4] == ["index.md", "installation.md", "quickstart.md", "concepts.md"]


def _hooks():
    sys.path.insert(0, str(DOCS))
    try:
        import hooks
    finally:
        sys.path.remove(str(DOCS))
    return hooks


def test_benchmarks_page_includes_results(tmp_path, monkeypatch):
    pytest.importorskip("mkdocs")
    hooks = _hooks()
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(hooks, "RESULTS", results)
    page = (DOCS / "benchmarks.md").read_text()
    assert hooks.MARKER in page

    missing = hooks.on_page_markdown(page, None, None, None)
    assert hooks.MARKER not in missing and "`benchmarks/RESULTS.md` was not found" in missing

    (tmp_path / "chart.png").write_bytes(b"png")
    results.write_text(
        "# Results\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n"
        "![chart](chart.png) ![gone](gone.png) [script](run.py) [web](https://x.org)\n"
    )
    shown = hooks.on_page_markdown(page, None, None, None)
    assert "| 1 | 2 |" in shown and "# Results" not in shown  # the page keeps its own h1
    assert "![chart](benchmarks-files/chart.png)" in shown  # linked files go in the site
    assert "*(gone: not in the repository)*" in shown and "[script]" not in shown
    assert "[web](https://x.org)" in shown
    assert hooks._benchmark_files() == {"benchmarks-files/chart.png": tmp_path / "chart.png"}


def test_benchmark_chart_is_drawn_from_the_committed_results(tmp_path, monkeypatch):
    pytest.importorskip("mkdocs")
    hooks = _hooks()
    page = (DOCS / "benchmarks.md").read_text()
    assert hooks.CHART_MARKER in page
    # RESULTS.json is the run RESULTS.md's table shows: every variant's ms/step is there.
    results = json.loads(hooks.RESULTS_JSON.read_text())
    table = hooks.RESULTS.read_text()
    for case, result in results.items():
        for row in result["rows"]:
            line = next(x for x in table.splitlines() if f"| {case} / {row['variant']} " in x)
            assert f"| {row['ms']:>7.1f} |" in line, (case, row["variant"])
    png = hooks._benchmark_chart(tmp_path)[hooks.CHART]
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert f"]({hooks.CHART})" in hooks.on_page_markdown(page, None, None, None)
    monkeypatch.setattr(hooks, "RESULTS_JSON", tmp_path / "missing.json")
    assert hooks._benchmark_chart(tmp_path) == {}
    assert "`benchmarks/RESULTS.json` was not found" in hooks.on_page_markdown(
        page, None, None, None
    )


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict` succeeds: no broken link, anchor-less page or warning."""
    pytest.importorskip("mkdocs")
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=DOCS.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "js" / "mathjax-loader.js").is_file()
