"""Counting collectives in compiled, SPMD-partitioned HLO text."""

import dataclasses
import math
import operator
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_LOOP = object()  # Stands for the tuple parameter of a while body or condition.
_EVALUATED = frozenset(
    "get-tuple-element copy convert bitcast reshape fusion compare add subtract".split()
)
_COMPARE = {"LT": operator.lt, "LE": operator.le, "GT": operator.gt, "GE": operator.ge}
_NAME = r"%?([\w.\-]+)"
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*(?:\(.*\)\s*->.*)?\{\s*$")
_INSTR_RE = re.compile(r"^\s+(ROOT\s+)?" + _NAME + r"\s*=\s*(.*)$")
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_ATTR_RE = re.compile(r"(\w+)=(\{[^{}]*\}|%?[\w.\-]+)")
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
_EXPLICIT_RE = re.compile(r"replica_groups=\{((?:\s*\{[\d,\s]*\},?)*)\s*\}")
_IOTA_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_RE = re.compile(
    r"replica_groups=@?mesh[\[<]([^\]>]*)[\]>]"
    r"(?:,\s*device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?|[\d,\s]+)\))?\s*\{([^}]*)\}"
)
_PAIRS_RE = re.compile(r"source_target_pairs=\{((?:\s*\{\d+,\s*\d+\},?)*)\s*\}")


@dataclasses.dataclass(frozen=True)
class CollectiveRecord:
    """One collective instruction: `count` executions per program call (loop trip counts
    applied), `nbytes` per-device output bytes per execution, `axes` as in
    `count_collectives`, where it lives (`computation`, `name`, `shape`), and for a
    `collective-permute` its `(source, target)` partition-id `pairs` (else empty), and
    the JAX `op_name` of its metadata (the name stack: transformations and
    `jax.named_scope`s; empty when the HLO has none)."""

    kind: str
    axes: tuple[str, ...]
    count: int
    nbytes: int
    computation: str
    name: str
    shape: str
    pairs: tuple[tuple[int, int], ...] = ()
    op_name: str = ""


@dataclasses.dataclass(frozen=True)
class CollectiveReport:
    """The collectives of one compiled program, as built by `count_collectives`.

    `unknown_trip_counts` is the number of `while` loops containing collectives whose trip
    count could not be determined; their collectives are recorded with multiplicity 1.
    """

    records: tuple[CollectiveRecord, ...]
    unknown_trip_counts: int

    def _select(self, kind: str | None, axis: str | tuple[str, ...] | None):
        if kind is not None and kind not in _KINDS:
            raise ValueError(f"Unknown collective kind {kind!r}; expected one of {_KINDS}.")
        axes = (axis,) if isinstance(axis, str) else axis
        return [
            r
            for r in self.records
            if kind in (None, r.kind) and (axes is None or r.axes == tuple(axes))
        ]

    def count(self, kind: str | None = None, axis: str | tuple[str, ...] | None = None) -> int:
        """Total executions of the matching collectives, loop multiplicities applied.

        **Arguments:**

        - `kind`: `"all-reduce"`, `"all-gather"`, `"reduce-scatter"`,
            `"collective-permute"`, `"all-to-all"`, or `None` for all of them.
        - `axis`: a mesh axis name (matching ops whose axes are exactly `(axis,)`), an exact
            tuple of axis names, or `None` for any.

        **Returns:**

        The number of executions.
        """
        return sum(r.count for r in self._select(kind, axis))

    def bytes(self, kind: str | None = None, axis: str | tuple[str, ...] | None = None) -> int:
        """Total per-device output bytes of the matching collectives over all executions.

        **Arguments:** as for `count`.

        **Returns:** the sum of `nbytes * count` over the matching records.
        """
        return sum(r.count * r.nbytes for r in self._select(kind, axis))

    def table(self) -> str:
        """A readable table, one row per (kind, axes) with execution count and bytes.

        **Returns:** a multi-line string.
        """
        rows: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for r in self.records:
            row = rows.setdefault((r.kind, r.axes), [0, 0])
            row[0] += r.count
            row[1] += r.count * r.nbytes
        lines = [f"{'kind':<20}{'axes':<24}{'count':>8}{'bytes':>14}"]
        for (kind, axes), (count, nbytes) in sorted(rows.items()):
            lines.append(f"{kind:<20}{','.join(axes) or '-':<24}{count:>8}{nbytes:>14}")
        if self.unknown_trip_counts:
            lines.append(f"({self.unknown_trip_counts} loop(s) with unknown trip count)")
        return "\n".join(lines)

    def by_kind(self) -> str:
        """Same as `table`: rows sorted by kind, one per (kind, axes)."""
        return self.table()

    def __str__(self) -> str:
        return self.table()


@dataclasses.dataclass(frozen=True)
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str


def _close(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `text[start]`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"Unbalanced parentheses in HLO: {text!r}")


def _parse_instr(name: str, rhs: str) -> _Instr | None:
    """Splits `shape opcode(operands), attributes`."""
    if rhs.startswith("("):
        end = _close(rhs, 0) + 1
        shape, rest = rhs[:end], rhs[end:].lstrip()
    else:
        shape, _, rest = rhs.partition(" ")
    if (match := re.match(r"([\w\-]+)\(", rest)) is None:
        return None
    end = _close(rest, match.end() - 1)
    raw = rest[match.end() : end]
    operands = re.findall(r"%([\w.\-]+)", raw) or [s.split()[-1] for s in raw.split(",") if s]
    return _Instr(name, shape, match.group(1), operands, rest[end + 1 :])


def _attr(instr: _Instr, key: str) -> str:
    """The value of attribute `key` of `instr`, without a leading `%`."""
    attrs = _STRING_RE.sub('""', instr.attrs)
    if (match := re.search(rf"\b{key}=%?([\w.\-]+)", attrs)) is None:
        raise ValueError(f"HLO instruction {instr.name} has no `{key}` attribute.")
    return match.group(1)


class _Module:
    """Computations of an HLO module: `comps[comp][name]`, `roots[comp]`, `entry`."""

    def __init__(self, text: str):
        self.comps: dict[str, dict[str, _Instr]] = {}
        self.roots: dict[str, str] = {}
        entry, current = None, None
        for line in text.splitlines():
            if (match := _COMP_RE.match(line)) is not None:
                current = match.group(2)
                self.comps[current] = {}
                entry = current if match.group(1) else entry
            elif current is not None and (match := _INSTR_RE.match(line)) is not None:
                if (instr := _parse_instr(match.group(2), match.group(3).strip())) is not None:
                    self.comps[current][instr.name] = instr
                    if match.group(1):
                        self.roots[current] = instr.name
        if entry is None:
            raise ValueError("No ENTRY computation found in the HLO text.")
        self.entry: str = entry

    def value(self, comp: str, name: str, params: list) -> Any:
        """Evaluates a scalar integer instruction symbolically: an int, `("iv", k, offset)`
        for element `k` of the loop tuple plus `offset`, `("cmp", direction, lhs, rhs)`, or
        None when unknown."""
        instr = self.comps[comp].get(name)
        if instr is None:
            return None
        op, args = instr.opcode, instr.operands
        if op == "parameter":
            return params[int(args[0])] if int(args[0]) < len(params) else None
        if op == "constant":
            return int(args[0]) if args and re.fullmatch(r"-?\d+", args[0]) else None
        if op not in _EVALUATED:
            return None
        values = [self.value(comp, a, params) for a in args]
        if op == "get-tuple-element" and values[0] is _LOOP:
            return ("iv", int(_attr(instr, "index")), 0)
        if op in ("copy", "convert", "bitcast", "reshape") and values:
            return values[0]
        if op == "fusion":
            callee = _attr(instr, "calls")
            return self.value(callee, self.roots[callee], values)
        if op == "compare" and len(values) == 2:
            return ("cmp", _attr(instr, "direction"), *values)
        if op in ("add", "subtract") and len(values) == 2:
            lhs, rhs = values
            if op == "add" and isinstance(lhs, int):
                lhs, rhs = rhs, lhs
            elif op == "subtract" and isinstance(rhs, int):
                rhs = -rhs
            if isinstance(rhs, int) and isinstance(lhs, int):
                return lhs + rhs
            if isinstance(rhs, int) and isinstance(lhs, tuple) and lhs[0] == "iv":
                return ("iv", lhs[1], lhs[2] + rhs)
        return None

    def trip_count(self, caller: str, loop: _Instr) -> int | None:
        """Reads `known_trip_count` from the backend config, or else infers the count from a
        `compare(induction variable, constant)` condition, the initial tuple and the body's
        increment of the induction variable."""
        if known := re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs):
            return int(known.group(1))
        cond, body = _attr(loop, "condition"), _attr(loop, "body")
        test = self.value(cond, self.roots[cond], [_LOOP])
        if not (isinstance(test, tuple) and test[0] == "cmp"):
            return None
        direction: str = test[1]
        lhs, rhs = test[2], test[3]
        if isinstance(lhs, int):
            flip = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}
            direction, lhs, rhs = flip.get(direction) or direction, rhs, lhs
        init_tuple = self.comps[caller].get(loop.operands[0])
        if not (isinstance(lhs, tuple) and lhs[0] == "iv" and isinstance(rhs, int)):
            return None
        if init_tuple is None or init_tuple.opcode != "tuple":
            return None
        init = self.value(caller, init_tuple.operands[lhs[1]], [])
        body_root = self.comps[body][self.roots[body]]
        update = self.value(body, body_root.operands[lhs[1]], [_LOOP])
        if not isinstance(init, int) or not (isinstance(update, tuple) and update[1] == lhs[1]):
            return None
        return _iterations(init + lhs[2], update[2], direction, rhs)

    def edges(self, comp: str, instr: _Instr) -> tuple[list[tuple[str, int]], bool]:
        """The computations `instr` calls with their multiplicity per execution of `instr`,
        and whether `instr` is a `while` of unknown trip count."""
        if instr.opcode.endswith(("-done", "-update")):  # Their `calls=` repeats the start's.
            return [], False
        trips = self.trip_count(comp, instr) if instr.opcode == "while" else 1
        factors = {"body": 1 if trips is None else trips, "condition": (trips or 0) + 1}
        calls = [
            (callee, factors.get(key, 1))
            for key, value in _ATTR_RE.findall(_STRING_RE.sub('""', instr.attrs))
            for callee in re.findall(_NAME, value)
            if callee in self.comps
        ]
        return calls, trips is None


def _iterations(init: int, step: int, direction: str, bound: int) -> int | None:
    """Trip count of `for (i = init; i <direction> bound; i += step)`, if finite."""
    if direction in _COMPARE and not _COMPARE[direction](init, bound):
        return 0
    if direction in ("LT", "LE") and step > 0:
        return -((init - bound - (direction == "LE")) // step)
    if direction in ("GT", "GE") and step < 0:
        return -((bound - init - (direction == "GE")) // -step)
    if direction == "NE" and step != 0 and (bound - init) % step == 0:
        return max(0, (bound - init) // step)
    return None


def _hlo_text(hlo: Any) -> str:
    compiled = getattr(hlo, "compiled", hlo)  # Unwraps `eqx.filter_jit(f).lower().compile()`.
    text = compiled if isinstance(compiled, str) else getattr(compiled, "as_text", None)
    text = text() if callable(text) else text
    if not isinstance(text, str) or "HloModule" not in text:
        raise TypeError(f"Expected compiled HLO (text or `.compile()` result), got {type(hlo)}.")
    return text


def _kind(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in _KINDS else None


def _top_level(shape: str) -> list[str]:
    """Splits a tuple shape `(a, (b, c))` into `["a", "(b, c)"]`; an array shape is itself."""
    if not shape.startswith("("):
        return [shape]
    parts, depth, start = [], 0, 1
    for i, char in enumerate(shape[:-1]):
        depth += 1 if char in "([{" else -1 if char in ")]}" else 0
        if char == "," and depth == 1:
            parts.append(shape[start:i].strip())
            start = i + 1
    return parts + [shape[start:-1].strip()]


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (dtype, tuple(int(d.lstrip("<=")) for d in dims.split(",") if d))
        for dtype, dims in _ARRAY_RE.findall(shape)
        if dtype != "token"
    ]


def _nbytes(shape: str) -> int:
    total = 0
    for dtype, dims in _arrays(shape):
        width = re.match(r"[a-z]+(\d+)", dtype)  # f32 -> 32, bf16 -> 16, f8e4m3fn -> 8.
        bits = 8 if dtype == "pred" else int(width.group(1)) if width else 0
        total += -(-bits * math.prod(dims) // 8)
    return total


def _output_bytes(opcode: str, shape: str) -> int:
    elements = _top_level(shape)
    if opcode.endswith("-start") and opcode != "all-reduce-start" and len(elements) >= 2:
        elements = elements[1:2]  # (operands, outputs, context...)
    return sum(_nbytes(e) for e in elements)


def _iota(dims: str, perm: str | None) -> np.ndarray:
    shape = [int(d) for d in dims.split(",")]
    array = np.arange(math.prod(shape)).reshape(shape)
    return array.transpose([int(p) for p in perm.split(",")]) if perm else array


def _mesh_groups(axes_spec: str, device_ids: str | None, selected: str) -> list[list[int]]:
    """Materialises `mesh[a=2,b=4], device_ids=(...) {a,b:(1)2}` replica groups; the
    sub-axis `(pre)size` is the factor of size `size` after `pre` more-major elements."""
    axes = re.findall(r"'?([\w.\-]+)'?=(\d+)", axes_spec)
    names, sizes = [n for n, _ in axes], [int(s) for _, s in axes]
    ids = np.arange(math.prod(sizes))
    if device_ids and (iota := re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", device_ids)):
        ids = _iota(iota.group(1), iota.group(2)).ravel()
    elif device_ids:
        ids = np.array([int(i) for i in device_ids.split(",")])
    refs = [
        (names.index(n), int(pre or 1), int(size or sizes[names.index(n)]))
        for n, pre, size in re.findall(r"'?([\w.\-]+)'?(?::\((\d+)\)(\d+))?", selected)
    ]
    cuts = [{1, size} for size in sizes]
    for axis, pre, size in refs:
        cuts[axis] |= {pre, pre * size}
    factors, where = [], {}
    for axis, axis_cuts in enumerate(cuts):
        bounds = sorted(axis_cuts)
        for low, high in zip(bounds[:-1], bounds[1:]):
            where[(axis, low)] = len(factors)
            factors.append(high // low)
    chosen = [where[(axis, pre)] for axis, pre, _ in refs]
    rest = [f for f in range(len(factors)) if f not in chosen]
    size = math.prod(factors[f] for f in chosen)
    return ids.reshape(factors).transpose(rest + chosen).reshape(-1, size).tolist()


def _components(pairs: tuple[tuple[int, int], ...]) -> list[list[int]]:
    """Connected components of the devices linked by `collective-permute` pairs."""
    groups: list[set[int]] = []
    for pair in ({source, target} for source, target in pairs):
        linked = [g for g in groups if g & pair]
        groups = [g for g in groups if not g & pair] + [pair.union(*linked)]
    return sorted(sorted(g) for g in groups)


def _op_name(attrs: str) -> str:
    match = re.search(r'\bop_name="((?:[^"\\]|\\.)*)"', attrs)
    return match.group(1) if match else ""


def _pairs(attrs: str) -> tuple[tuple[int, int], ...]:
    """A `collective-permute`'s `(source, target)` pairs (empty for other ops)."""
    if (match := _PAIRS_RE.search(attrs)) is None:
        return ()
    found = re.findall(r"\{(\d+),\s*(\d+)\}", match.group(1))
    return tuple((int(source), int(target)) for source, target in found)


def _groups(attrs: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective; for a `collective-permute`, the connected
    components of its source-target pairs."""
    if _PAIRS_RE.search(attrs) is not None:
        return _components(_pairs(attrs))
    if (match := _IOTA_RE.search(attrs)) is not None:
        count, size = int(match.group(1)), int(match.group(2))
        return _iota(match.group(3), match.group(4)).reshape(count, size).tolist()
    if (match := _MESH_RE.search(attrs)) is not None:
        return _mesh_groups(*match.groups())
    if (match := _EXPLICIT_RE.search(attrs)) is not None:
        groups = re.findall(r"\{([\d,\s]*)\}", match.group(1))
        groups = [[int(i) for i in g.split(",") if i.strip()] for g in groups]
        if groups := [g for g in groups if g]:
            return groups
    return [list(range(num_devices))]  # `replica_groups={}`: everyone.


def _mesh_layout(mesh: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
    names = tuple(mesh.axis_names)
    shape = getattr(getattr(mesh, "devices", None), "shape", None)
    shape = mesh.shape if shape is None else shape
    return names, tuple(shape[n] for n in names) if isinstance(shape, Mapping) else tuple(shape)


def _axes(groups: list[list[int]], mesh: Any) -> tuple[str, ...]:
    """Mesh axes along which the devices of a group differ."""
    if mesh is None:
        return (f"groups of {max(len(g) for g in groups)}",)
    names, shape = _mesh_layout(mesh)
    differ = np.zeros(len(shape), dtype=bool)
    for group in groups:
        if max(group) >= math.prod(shape):
            raise ValueError(f"Device id {max(group)} does not fit a mesh of shape {shape}.")
        coords = np.stack(np.unravel_index(np.asarray(group), shape))
        differ |= (coords != coords[:, :1]).any(axis=1)
    return tuple(name for name, d in zip(names, differ) if d)


def _communicates(instr: _Instr, num_devices: int) -> bool:
    """False for a degenerate collective whose every group is one device (a no-op that
    XLA sometimes leaves in, e.g. a gradient all-reduce over a mesh axis of size 1)."""
    return any(len(g) > 1 for g in _groups(instr.attrs, num_devices))


def count_collectives(hlo: Any, mesh: Any = None) -> CollectiveReport:
    """Counts the collectives of a compiled SPMD program, with loop trip counts applied.

    Multiplicities are propagated over the call graph from ENTRY (which runs once): a
    `while` body runs `trip_count` times (nested loops multiply); computations of `call`,
    `fusion`, async wrappers, reducers and *each* branch of a `conditional` run once per
    execution of their caller (so conditionals give an upper bound); a computation called
    from several places sums its multiplicities. An asynchronous collective is counted once,
    at its `*-start`. Degenerate collectives whose groups are single devices move nothing
    and are left out. Bytes are the per-device bytes of the op's output buffer: the whole
    result of a synchronous op or of `all-reduce-start` (summed over tuple elements, as for
    combined all-reduces or all-to-all), and element 1 of the `(operands, outputs,
    context...)` result of the other `*-start` ops.

    **Arguments:**

    - `hlo`: compiled HLO text, a `jax.stages.Compiled`, or the result of
        `eqx.filter_jit(f).lower(...).compile()`.
    - `mesh`: optional `jax.sharding.Mesh`, or anything with `axis_names` and
        `devices.shape` (or `shape`). Partition id `p` is taken to be the device at
        `np.unravel_index(p, mesh.devices.shape)`, and each op is attributed to the mesh
        axes, in mesh order, along which the devices of its groups differ (for permutes,
        the groups are the connected components of the source-target pairs). Without a
        mesh, axes are `("groups of N",)` with `N` the (largest) group size.

    **Returns:**

    A `CollectiveReport`.
    """
    text = _hlo_text(hlo)
    module = _Module(text)
    partitions = re.search(r"num_partitions=(\d+)", text)
    num_devices = int(partitions.group(1)) if partitions else 1
    if mesh is not None:
        num_devices = math.prod(_mesh_layout(mesh)[1])
    edges, unknown_loops = {}, []
    for comp, instrs in module.comps.items():
        edges[comp] = []
        for instr in instrs.values():
            calls, unknown = module.edges(comp, instr)
            edges[comp].extend(calls)
            unknown_loops += [(comp, [c for c, _ in calls])] if unknown else []
    order: list[str] = []  # Post-order: callees before callers.
    seen: set[str] = set()

    def visit(comp: str) -> None:
        seen.add(comp)
        for callee, _ in edges[comp]:
            if callee not in seen:
                visit(callee)
        order.append(comp)

    visit(module.entry)
    has_collective: dict[str, bool] = {}
    for comp in order:
        has_collective[comp] = any(_kind(i.opcode) for i in module.comps[comp].values()) or any(
            has_collective[c] for c, _ in edges[comp]
        )
    multiplicity = dict.fromkeys(order, 0) | {module.entry: 1}
    for comp in reversed(order):
        for callee, factor in edges[comp]:
            multiplicity[callee] += multiplicity[comp] * factor
    records = tuple(
        CollectiveRecord(
            kind,
            _axes(_groups(instr.attrs, num_devices), mesh),
            multiplicity[comp],
            _output_bytes(instr.opcode, instr.shape),
            comp,
            instr.name,
            instr.shape,
            _pairs(instr.attrs),
            _op_name(instr.attrs),
        )
        for comp in reversed(order)
        for instr in module.comps[comp].values()
        if (kind := _kind(instr.opcode)) is not None and _communicates(instr, num_devices)
    )
    unknown = sum(
        comp in multiplicity and any(has_collective[c] for c in callees)
        for comp, callees in unknown_loops
    )
    return CollectiveReport(records, unknown)


def array_shapes(hlo: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Every per-device array result shape of every instruction, tuples flattened.

    **Arguments:**

    - `hlo`: as for `count_collectives`.

    **Returns:**

    A list of `(dtype, dims)` pairs such as `("f32", (3, 7))`.
    """
    module = _Module(_hlo_text(hlo))
    return [
        a for instrs in module.comps.values() for i in instrs.values() for a in _arrays(i.shape)
    ]
