"""Runs the documentation: every ```python block of every docs/*.md page.

The blocks of one page run in order in one shared namespace, like the cells of a
notebook, in this process (8 simulated CPU devices, strict dtype promotion and rank
promotion raising, see conftest.py). A block followed directly by a fence opened with
```text title="Output" must print exactly that text. Tracebacks point at the page's own
line numbers.
"""

import contextlib
import io
import pathlib
import re
import sys
import types

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
# Tutorials that must hold code (and so be tested), not just prose.
MUST_RUN = ("index.md", "meshes.md", "tensor-parallel.md")

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)(?P<info>.*)$")


class Block:
    def __init__(self, lang: str, info: str, line: int, source: str):
        self.lang, self.info, self.line, self.source = lang, info, line, source

    @property
    def is_output(self) -> bool:
        return self.lang == "text" and 'title="Output"' in self.info


def parse(text: str) -> list[tuple[Block, Block | None]]:
    """The page's python blocks, each with the Output block right after it (or None)."""
    lines = text.splitlines()
    blocks: list[tuple[Block, int]] = []  # (block, index of its closing line)
    i = 0
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
        body = [ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]]
        blocks.append((Block(match["lang"], match["info"], i + 2, "\n".join(body) + "\n"), j))
        i = j + 1
    pairs = []
    for k, (block, end) in enumerate(blocks):
        if block.is_output:
            prev = blocks[k - 1] if k else None
            gap = lines[prev[1] + 1 : block.line - 2] if prev else ["x"]
            if prev is None or prev[0].lang != "python" or any(ln.strip() for ln in gap):
                raise ValueError(
                    f'the Output block on line {block.line - 1} must follow a python block '
                    f"directly (only blank lines between)"
                )
        if block.lang != "python":
            continue
        nxt = blocks[k + 1] if k + 1 < len(blocks) else None
        gap = lines[end + 1 : nxt[0].line - 2] if nxt else ["x"]
        output = nxt[0] if nxt and nxt[0].is_output and not any(ln.strip() for ln in gap) else None
        pairs.append((block, output))
    return pairs


def _pages() -> list[str]:
    return sorted(p.name for p in DOCS.glob("*.md") if parse(p.read_text()))


def test_tutorials_have_code():
    missing = [name for name in MUST_RUN if name not in _pages()]
    assert not missing, f"these pages must hold ```python blocks: {missing}"


@pytest.mark.parametrize("page", _pages())
def test_page(page: str):
    path = DOCS / page
    module = types.ModuleType(f"docs_{path.stem.replace('-', '_')}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    try:
        for block, output in parse(path.read_text()):
            # Pad so that tracebacks give the line number in the .md file.
            code = compile("\n" * (block.line - 1) + block.source, str(path), "exec")
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    exec(code, module.__dict__)
            except BaseException:
                sys.stdout.write(printed.getvalue())
                raise
            if output is not None:
                got = [ln.rstrip() for ln in printed.getvalue().rstrip().splitlines()]
                want = [ln.rstrip() for ln in output.source.rstrip().splitlines()]
                assert got == want, (
                    f"{page}, block on line {block.line}: printed output differs from the "
                    f"Output block on line {output.line}.\n--- printed ---\n"
                    + "\n".join(got)
                    + "\n--- documented ---\n"
                    + "\n".join(want)
                )
    finally:
        del sys.modules[module.__name__]
