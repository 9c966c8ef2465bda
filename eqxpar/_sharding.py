"""Declared sharding: field metadata, `partition_specs`, placement and sharded init.

A parallel layer declares, next to each array field, which of the array's dims go on
which mesh axis. The declaration names an *attribute* of the layer that holds the mesh
axis name, so the axis is settable per instance:

```python
class ColumnParallelLinear(eqx.Module):
    weight: Array = eqx.field(metadata=ep.sharded("axis_name", None))  # dim 0 on axis_name
    axis_name: str = eqx.field(static=True)
```

`partition_specs` turns any composed module into the matching tree of `PartitionSpec`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import DictKey, GetAttrKey, SequenceKey, keystr

from ._mesh import describe_mesh

_DIMS = "eqxpar.dims"
_LEADING = "eqxpar.leading"
_GATHERS = "eqxpar.gathers_on_use"

T = TypeVar("T")
AxisName = str | tuple[str, ...] | None


def sharded(*dims: str | None, gathers_on_use: bool = False) -> dict[str, Any]:
    """Field metadata declaring how an array field is partitioned over the mesh.

    Use it as `weight: Array = eqx.field(metadata=eqxpar.sharded("axis_name", None))`.

    **Arguments:**

    - `*dims`: one entry per leading dim of the array: `None` (replicated along that
      dim) or the name of an attribute of the module whose value is the mesh axis name
      (a `str`, a tuple of `str`, or `None`). Dims past the last entry are replicated.
    - `gathers_on_use`: the module all-gathers this array over the FSDP axis wherever
      a dim arrives split (see `eqxpar.nn.local_param`), so FSDP may shard it. eqxpar's
      layers set it for their weights.

    **Returns:**

    A metadata dict for `eqx.field` (merge it with `|` if you have other metadata).
    """
    return {_DIMS: tuple(dims), _GATHERS: gathers_on_use}


class Dims(tuple):
    """Several dims' mesh axes held by one attribute, e.g. `Dims((None, "pipeline", None))`
    for layers stacked as `(virtual, stages, per_chunk)`. A `sharded`/`stacked`
    entry naming an attribute that holds `Dims` stands for all of them."""


def stacked(*leading: str | None) -> dict[str, Any]:
    """Field metadata for a sub-module whose arrays all carry extra leading dims.

    Use it as `layers: Block = eqx.field(metadata=eqxpar.stacked(None))` for layers
    stacked for `jax.lax.scan` (leading dim replicated), or with the name of an
    attribute holding `"pipeline"` for pipeline stages. The declared specs of the
    inner module are shifted right by `len(leading)`.

    **Arguments:**

    - `*leading`: like `sharded`'s dims, for the added leading dims.

    **Returns:**

    A metadata dict for `eqx.field`.
    """
    return {_LEADING: tuple(leading)}


def is_arraylike(x: Any) -> bool:
    """True for JAX/NumPy arrays and for abstract `jax.ShapeDtypeStruct`s."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


@functools.cache
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _resolve(module: eqx.Module, field: str, entries: tuple[str | None, ...]) -> tuple:
    out = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        if not hasattr(module, entry):
            raise AttributeError(
                f"{type(module).__name__}.{field} declares a sharded dim on attribute "
                f"{entry!r}, which {type(module).__name__} does not have. Declare the "
                f"attribute (e.g. `{entry}: str = eqx.field(static=True)`) or fix the name."
            )
        value = getattr(module, entry)
        out.extend(value) if isinstance(value, Dims) else out.append(value)
    return tuple(out)


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, GetAttrKey):
        return getattr(node, key.name)
    if isinstance(key, SequenceKey):
        return node[key.idx]
    if isinstance(key, DictKey):
        return node[key.key]
    return None  # an opaque custom pytree: nothing below it is declared


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """What the declarations say about one array: its spec, how many of its leading
    dims are stacked-layer dims (`stacked`), and whether its layer gathers it on use."""

    spec: P
    leading: int
    gathers_on_use: bool


def _leaf_layout(tree: Any, path: tuple, leaf: Any) -> LeafLayout | None:
    if not is_arraylike(leaf):
        return None
    node, lead, dims, gathers = tree, (), (), False
    for depth, key in enumerate(path):
        if isinstance(node, eqx.Module) and isinstance(key, GetAttrKey):
            meta = _fields(type(node))[key.name].metadata
            if _LEADING in meta:
                lead += _resolve(node, key.name, meta[_LEADING])
            if depth == len(path) - 1 and _DIMS in meta:
                dims = _resolve(node, key.name, meta[_DIMS])
                gathers = bool(meta.get(_GATHERS, False))
        node = _child(node, key)
        if node is None:
            break
    entries = lead + dims
    if len(entries) > leaf.ndim:
        raise ValueError(
            f"partition_specs: the array at {keystr(path) or 'the root'} has shape "
            f"{tuple(leaf.shape)} but its declaration shards {len(entries)} dims "
            f"({entries}). Declare at most {leaf.ndim} dims."
        )
    while entries and entries[-1] is None:
        entries = entries[:-1]
    return LeafLayout(P(*entries), len(lead), gathers)


def layouts(tree: T) -> T:
    """A `LeafLayout` for every array of `tree` (`None` elsewhere)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: _leaf_layout(tree, p, x), tree)


def partition_specs(tree: T) -> T:
    """The `PartitionSpec` of every array in `tree`, from the modules' declarations.

    Works on any pytree: composed modules, lists of layers, `(model, opt_state)`.
    Arrays in fields without a declaration (e.g. inside plain `eqx.nn` layers) are
    replicated, `P()`.

    **Arguments:**

    - `tree`: any pytree; arrays may be concrete or `jax.ShapeDtypeStruct`.

    **Returns:**

    A pytree of the same structure with a `PartitionSpec` at every array leaf and
    `None` at every other leaf.
    """
    return jax.tree.map(
        lambda layout: None if layout is None else layout.spec,
        layouts(tree),
        is_leaf=lambda x: x is None or isinstance(x, LeafLayout),
    )


def _axes_of(entry: AxisName) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def spec_problem(
    spec: Any, leaf: Any, mesh: Any, *, divisible: bool = True
) -> tuple[int | None, str] | None:
    """Why `spec` cannot shard `leaf` on `mesh`: `(dim or None, message)`, or `None`
    if it can. The message starts after the leaf's name (`"dim 0 has size ..."`)."""
    sizes = dict(mesh.shape)
    shown = describe_mesh(mesh)
    if not isinstance(spec, P):
        return None, (
            f"expected a jax.sharding.PartitionSpec or None, got {spec!r}. Use P(...) from "
            f"jax.sharding, or None for the module's declared specs."
        )
    shape = tuple(leaf.shape)
    if len(spec) > len(shape):
        return None, (
            f"spec {spec} has {len(spec)} entries but the array has shape {shape} (rank "
            f"{len(shape)}). Use at most {len(shape)} entries, e.g. "
            f"P{tuple(spec)[: len(shape)]}."
        )
    seen: set[str] = set()
    for dim, entry in enumerate(spec):
        axes = _axes_of(entry)
        for axis in axes:
            if axis not in sizes:
                guess = difflib.get_close_matches(str(axis), list(sizes), n=1)
                fix = f"did you mean {guess[0]!r}?" if guess else "use one of the mesh's axes."
                return dim, (
                    f"spec {spec} names mesh axis {axis!r}, but the mesh is {shown} with "
                    f"axes {tuple(sizes)}; {fix}"
                )
            if axis in seen:
                return dim, (
                    f"spec {spec} uses mesh axis {axis!r} twice; an axis can shard at most one dim."
                )
            seen.add(axis)
        parts = math.prod(sizes[a] for a in axes)
        if divisible and parts > 1 and shape[dim] % parts:
            return dim, (
                f"dim {dim} has size {shape[dim]}, which {shown} cannot split {parts} ways "
                f"over {axes}. Make the size a multiple of {parts}, or change the mesh so "
                f"that {' x '.join(axes)} divides {shape[dim]}."
            )
    return None


def owner(tree: Any, path: tuple, dim: int | None = None) -> str:
    """`"ColumnParallelLinear.weight, out_features=12"`: the module and field that hold
    the array at `path` in `tree`, and the module's static int fields equal to the size
    of `dim` (the sizes that make it), for error messages. `""` when no module owns it."""
    node, found = tree, ""
    for key in path:
        if isinstance(node, eqx.Module) and isinstance(key, GetAttrKey):
            found = f"{type(node).__name__}.{key.name}"
            holder = node
        node = _child(node, key)
        if node is None:
            break
    if not found or dim is None or node is None or not is_arraylike(node):
        return found
    size = node.shape[dim] if dim < node.ndim else None
    fields = [
        f"{f.name}={getattr(holder, f.name)}"
        for f in dataclasses.fields(holder)
        if f.metadata.get("static")
        and getattr(holder, f.name, None) == size
        and isinstance(getattr(holder, f.name), int)
        and not isinstance(getattr(holder, f.name), bool)
    ]
    return ", ".join([found, *fields])


def raise_problems(problems: list[tuple[type, str]], what: str, mesh: Any) -> None:
    """Raises one error listing every offending leaf (as `jax.shard_map` does); a single
    problem keeps its one-line message."""
    if not problems:
        return
    if len(problems) == 1:
        error, message = problems[0]
        raise error(message)
    error = TypeError if all(e is TypeError for e, _ in problems) else ValueError
    lines = "\n".join(f"  - {message.removeprefix(what + ': ')}" for _, message in problems)
    raise error(
        f"{what}: {len(problems)} arrays cannot be placed on {describe_mesh(mesh)}:\n{lines}"
    )


def leaf_problem(
    tree: Any, path: tuple, leaf: Any, spec: Any, mesh: Any, where: str, *, divisible: bool
) -> tuple[type, str] | None:
    """`(error type, message)` if `spec` cannot place the array `leaf` found at `path`
    in `tree`; the message names it by `where` and by its owning layer field."""
    problem = spec_problem(spec, leaf, mesh, divisible=divisible)
    if problem is None:
        return None
    dim, message = problem
    held = owner(tree, path, dim)
    where = f"{where} ({held})" if held else where
    return (ValueError if isinstance(spec, P) else TypeError), f"{where}: {message}"


def leaf_problems(
    tree: Any, specs: Any, mesh: Any, root: str, *, divisible: bool = True
) -> list[tuple[type, str]]:
    """`(error type, message)` for every array of `tree` whose spec does not fit `mesh`."""
    problems = []
    for (path, leaf), spec in zip(
        jax.tree_util.tree_leaves_with_path(tree),
        jax.tree.structure(tree).flatten_up_to(specs),
        strict=True,
    ):
        if is_arraylike(leaf):
            where = f"{root}{keystr(path)}"
            problem = leaf_problem(tree, path, leaf, spec, mesh, where, divisible=divisible)
            problems += [] if problem is None else [problem]
    return problems


def check_tree(tree: Any, specs: Any, mesh: Any, root: str) -> None:
    """Raises one error naming every array of `tree` that its spec cannot place."""
    raise_problems(leaf_problems(tree, specs, mesh, root), root.split(":")[0], mesh)


def place(tree: T, mesh: Any, specs: Any = None) -> T:
    """Places every array of `tree` on `mesh` according to its declared specs.

    **Arguments:**

    - `tree`: any pytree holding arrays, e.g. a model.
    - `mesh`: a `jax.sharding.Mesh`.
    - `specs`: optional tree of `PartitionSpec` (as `partition_specs` returns) to use
      instead of the declared one.

    **Returns:**

    The same tree, with each array a `jax.Array` carrying a `NamedSharding`. Raises one
    `ValueError` naming every array (key path, layer and field) whose dim does not
    divide by its axes' sizes.
    """
    specs = partition_specs(tree) if specs is None else specs
    check_tree(tree, specs, mesh, "place: tree")

    def place(leaf, spec):
        return jax.device_put(leaf, NamedSharding(mesh, spec)) if eqx.is_array(leaf) else leaf

    return jax.tree.map(place, tree, specs, is_leaf=lambda x: x is None)


def shard(tree: T, mesh: Any, specs: Any = None) -> T:
    """Deprecated: the same as `eqxpar.place` (renamed so that placing, `place`, is not
    confused with declaring, `sharded`)."""
    warnings.warn(
        "eqxpar.shard is deprecated; use eqxpar.place (same arguments).",
        DeprecationWarning,
        stacklevel=2,
    )
    return place(tree, mesh, specs)


def sharded_init(make: Callable[..., T], /, *args: Any, mesh: Any, **kwargs: Any) -> T:
    """Builds `make(*args, **kwargs)` directly on `mesh`, each device creating its shards.

    The construction runs under `jax.jit` with the declared shardings as output
    shardings, so XLA partitions the random-number generation: no device ever holds a
    whole sharded weight. With JAX's partitionable threefry (the default) the same key
    gives bit-identical global weights on every mesh shape, and the same weights as
    calling `make` without a mesh.

    **Arguments:**

    - `make`: a constructor or any function returning a pytree, e.g. a model class.
    - `*args`, `**kwargs`: its arguments; arrays (such as `key`) are traced, everything
      else is static.
    - `mesh`: the `jax.sharding.Mesh` to build on.

    **Returns:**

    What `make` returns, placed like `shard(make(...), mesh)`.
    """
    abstract = eqx.filter_eval_shape(make, *args, **kwargs)
    specs = partition_specs(abstract)
    check_tree(abstract, specs, mesh, f"sharded_init({getattr(make, '__name__', make)})")
    _, static_out = eqx.partition(abstract, is_arraylike)
    dyn_specs = jax.tree.map(
        lambda s, x: s if is_arraylike(x) else None, specs, abstract, is_leaf=lambda x: x is None
    )
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), dyn_specs)
    dyn_in, static_in = eqx.partition((args, kwargs), eqx.is_array)

    def build(dyn):
        a, k = eqx.combine(dyn, static_in)
        return eqx.partition(make(*a, **k), eqx.is_array)[0]

    dyn_out = jax.jit(build, out_shardings=shardings)(dyn_in)
    return eqx.combine(dyn_out, static_out)
