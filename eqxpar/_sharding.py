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


def check_spec(spec: Any, leaf: Any, mesh: Any, where: str, *, divisible: bool = True) -> None:
    """Raises a clear error if `spec` cannot shard `leaf` on `mesh`.

    **Arguments:**

    - `spec`: a `PartitionSpec`.
    - `leaf`: the array (or abstract array) it applies to.
    - `mesh`: a `Mesh` or `AbstractMesh`.
    - `where`: the leaf's name for the message, e.g. `in_specs[0].weight`.
    - `divisible`: also check that each sharded dim divides by its axes' sizes.
    """
    sizes = dict(mesh.shape)
    shown = describe_mesh(mesh)
    if not isinstance(spec, P):
        raise TypeError(
            f"{where}: expected a jax.sharding.PartitionSpec or None, got {spec!r}. "
            f"Use P(...) from jax.sharding, or None for the module's declared specs."
        )
    shape = tuple(leaf.shape)
    if len(spec) > len(shape):
        raise ValueError(
            f"{where}: spec {spec} has {len(spec)} entries but the array has shape {shape} "
            f"(rank {len(shape)}). Use at most {len(shape)} entries, e.g. "
            f"P{tuple(spec)[: len(shape)]}."
        )
    seen: set[str] = set()
    for dim, entry in enumerate(spec):
        axes = _axes_of(entry)
        for axis in axes:
            if axis not in sizes:
                guess = difflib.get_close_matches(str(axis), list(sizes), n=1)
                fix = f"did you mean {guess[0]!r}?" if guess else "use one of the mesh's axes."
                raise ValueError(
                    f"{where}: spec {spec} names mesh axis {axis!r}, but the mesh is "
                    f"{shown} with axes {tuple(sizes)}; {fix}"
                )
            if axis in seen:
                raise ValueError(
                    f"{where}: spec {spec} uses mesh axis {axis!r} twice; an axis can "
                    f"shard at most one dim."
                )
            seen.add(axis)
        parts = math.prod(sizes[a] for a in axes)
        if divisible and parts > 1 and shape[dim] % parts:
            raise ValueError(
                f"{where}: dim {dim} has size {shape[dim]}, which {shown} cannot split "
                f"{parts} ways over {axes}. Make the size a multiple of {parts}, or change "
                f"the mesh so that {' x '.join(axes)} divides {shape[dim]}."
            )


def _check_tree(tree: Any, specs: Any, mesh: Any, root: str) -> None:
    for (path, leaf), spec in zip(
        jax.tree_util.tree_leaves_with_path(tree),
        jax.tree.structure(tree).flatten_up_to(specs),
        strict=True,
    ):
        if is_arraylike(leaf):
            check_spec(spec, leaf, mesh, f"{root}{keystr(path)}")


def shard(tree: T, mesh: Any, specs: Any = None) -> T:
    """Places every array of `tree` on `mesh` according to its declared specs.

    **Arguments:**

    - `tree`: any pytree holding arrays, e.g. a model.
    - `mesh`: a `jax.sharding.Mesh`.
    - `specs`: optional tree of `PartitionSpec` (as `partition_specs` returns) to use
      instead of the declared one.

    **Returns:**

    The same tree, with each array a `jax.Array` carrying a `NamedSharding`. Raises a
    `ValueError` naming the leaf if a dim does not divide by its axes' sizes.
    """
    specs = partition_specs(tree) if specs is None else specs
    _check_tree(tree, specs, mesh, "shard: tree")

    def place(leaf, spec):
        return jax.device_put(leaf, NamedSharding(mesh, spec)) if eqx.is_array(leaf) else leaf

    return jax.tree.map(place, tree, specs, is_leaf=lambda x: x is None)


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
    _check_tree(abstract, specs, mesh, f"sharded_init({getattr(make, '__name__', make)})")
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
