"""The dots of a compiled XLA program, one by one: shapes, dimension numbers, the kernel
XLA gave each, and each one's time when compiled alone.

Used by `tp_mlp.py --hlo-diff` to put GSPMD's and eqxpar's compiled steps side by side.
The parsing reads `Compiled.as_text()` (post-optimisation HLO), which names each
operand but not its shape, so shapes are looked up by instruction name (unique in a
module). A dot inside a fusion whose backend config says `__ynn_fusion` runs in
YNNPACK on XLA:CPU; one outside any fusion runs in XLA's own dot emitter.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

Dims = tuple[int, ...]

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\](?:\{[^}]*\})? ([\w\-]+)\((.*)$")
_CALLS = re.compile(r"\bfusion\(.*calls=%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class HloDot:
    """One `dot` of a compiled module.

    - `lhs`, `rhs`, `out`: shapes.
    - `lhs_contracting`, `rhs_contracting`, `lhs_batch`, `rhs_batch`: its dimension
      numbers.
    - `kernel`: `"YNNPACK"` (inside a `__ynn_fusion`), `"fusion"` (inside another
      fusion) or `"XLA dot"` (a dot of its own, XLA's dot emitter).
    - `backward`: whether JAX's transpose (autodiff's backward pass) produced it.
    """

    lhs: Dims
    rhs: Dims
    out: Dims
    lhs_contracting: Dims
    rhs_contracting: Dims
    lhs_batch: Dims
    rhs_batch: Dims
    kernel: str
    backward: bool

    @property
    def contracted(self) -> int:
        """The size of the contraction (K)."""
        return int(np.prod([self.lhs[d] for d in self.lhs_contracting]))

    @property
    def canonical(self) -> bool:
        """The left operand contracts its last dim (row-major `M x K`), as YNNPACK needs."""
        return self.lhs_contracting == (len(self.lhs) - 1,)

    def dimension_numbers(self) -> tuple[tuple[Dims, Dims], tuple[Dims, Dims]]:
        """`lax.dot_general`'s `dimension_numbers` for this dot."""
        return (self.lhs_contracting, self.rhs_contracting), (self.lhs_batch, self.rhs_batch)

    def text(self) -> str:
        """`[1024,512] x [512,1024] -> [512,512]`."""
        return " x ".join(_shape(s) for s in (self.lhs, self.rhs)) + f" -> {_shape(self.out)}"

    def dims_text(self) -> str:
        """`lhs {0} ; rhs {1}`: the contracting dims."""
        return f"lhs {_set(self.lhs_contracting)} ; rhs {_set(self.rhs_contracting)}"


def _shape(dims: Dims) -> str:
    return "[" + ",".join(map(str, dims)) + "]"


def _set(dims: Dims) -> str:
    return "{" + ",".join(map(str, dims)) + "}"


def _ints(text: str) -> Dims:
    return tuple(int(d) for d in text.split(",") if d)


def _field(attrs: str, key: str) -> Dims:
    found = re.search(rf"\b{key}=\{{([\d,]*)\}}", attrs)
    return _ints(found.group(1)) if found else ()


def computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines, for a module's HLO text."""
    comps: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = comps.setdefault(header.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return comps


def _fusion_kinds(comps: dict[str, list[str]]) -> dict[str, str]:
    """Fused computation name -> `"YNNPACK"` or `"fusion"`, from the fusions calling it."""
    kinds = {}
    for lines in comps.values():
        for line in lines:
            called = _CALLS.search(line)
            if called:
                kinds[called.group(1)] = "YNNPACK" if "__ynn_fusion" in line else "fusion"
    return kinds


def parse_dots(text: str) -> list[HloDot]:
    """Every `dot` instruction of a compiled module's HLO text, in text order."""
    comps = computations(text)
    kinds = _fusion_kinds(comps)
    shapes = {}
    for lines in comps.values():
        for line in lines:
            instr = _INSTR.match(line)
            if instr:
                shapes[instr.group(1)] = _ints(instr.group(2))
    dots = []
    for comp, lines in comps.items():
        for line in lines:
            instr = _INSTR.match(line)
            if not instr or instr.group(3) != "dot":
                continue
            lhs, rhs = re.findall(r"%([\w.\-]+)", instr.group(4).split(")")[0])
            attrs = instr.group(4)
            dots.append(
                HloDot(
                    shapes[lhs], shapes[rhs], _ints(instr.group(2)),
                    _field(attrs, "lhs_contracting_dims"), _field(attrs, "rhs_contracting_dims"),
                    _field(attrs, "lhs_batch_dims"), _field(attrs, "rhs_batch_dims"),
                    kinds.get(comp, "XLA dot"), "transpose(jvp" in attrs,
                )
            )  # fmt: skip
    return dots


def layout_copies(text: str) -> list[str]:
    """The rank >= 2 copies and transposes outside fusions' bodies (each a pass over
    memory that only moves data): plain `copy`/`transpose` instructions and fusions
    named after them. Names, in text order."""
    comps = computations(text)
    fused = _fusion_kinds(comps)
    found = []
    for comp, lines in comps.items():
        if comp in fused:
            continue
        for line in lines:
            instr = _INSTR.match(line)
            if not instr or len(_ints(instr.group(2))) < 2:
                continue
            name, op = instr.group(1), instr.group(3)
            moves = op in ("copy", "transpose")
            if moves or (op == "fusion" and ("copy" in name or "transpose" in name)):
                found.append(name)
    return found


def compiled_text(compiled: Any) -> str:
    """The post-optimisation HLO of a `jax.stages.Compiled` or Equinox's wrapper of one."""
    inner = getattr(compiled, "compiled", compiled)
    return inner.as_text()


def isolated(dot: HloDot, device: jax.Device) -> tuple[Callable, tuple[jax.Array, ...], str]:
    """This dot alone: `lax.dot_general` with its shapes and dimension numbers, compiled
    for `device` (operands in the default row-major layout).

    **Returns:**

    `(compiled, operands, kernel)`, `kernel` being what XLA gave the dot compiled alone
    (`HloDot.kernel`'s words).
    """
    klhs, krhs = jax.random.split(jax.random.key(0))
    operands = jax.device_put(
        (jax.random.normal(klhs, dot.lhs), jax.random.normal(krhs, dot.rhs)), device
    )
    numbers = dot.dimension_numbers()
    compiled = jax.jit(lambda a, b: jax.lax.dot_general(a, b, numbers)).lower(*operands).compile()
    (alone,) = parse_dots(compiled_text(compiled))
    return compiled, operands, alone.kernel
