"""`filter_shard_map`: `jax.shard_map` for pytrees that hold Equinox modules."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from jax.tree_util import keystr

from ._mesh import describe_mesh
from ._sharding import leaf_problem, partition_specs, raise_problems


class _Pair:
    """A spec and the subtree it covers (deliberately not a pytree: a leaf)."""

    def __init__(self, spec: Any, sub: Any):
        self.spec, self.sub = spec, sub


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, P)


def _expand(
    specs: Any, tree: Any, mesh: Any, root: str, *, divisible: bool, names: list | None = None
) -> list:
    """One spec per leaf of `tree` (None for non-arrays), checked, from a prefix tree.

    If `names` is given, the key path of each array leaf is appended to it.

    A `None` in `specs` means "the declared specs" (`partition_specs`) for the whole
    subtree below it; a `PartitionSpec` applies to every array below it.
    """
    try:
        pairs = jax.tree.map(lambda spec, sub: _Pair(spec, sub), specs, tree, is_leaf=_is_spec_leaf)
    except ValueError as e:
        raise ValueError(
            f"{root} must be a tree prefix of the arguments, with a PartitionSpec or None "
            f"at each of its leaves (None: use the modules' declared specs). The structures "
            f"do not match: {e}"
        ) from None
    out: list = []
    problems: list = []
    for prefix, pair in jax.tree_util.tree_leaves_with_path(pairs):
        spec, sub = pair.spec, pair.sub
        flat = jax.tree_util.tree_leaves_with_path(sub)
        flat_specs = (
            jax.tree.structure(sub).flatten_up_to(partition_specs(sub))
            if spec is None
            else [spec] * len(flat)
        )
        for (path, leaf), leaf_spec in zip(flat, flat_specs, strict=True):
            if not eqx.is_array(leaf):
                out.append(None)
                continue
            where = f"{root}{keystr(prefix)}{keystr(path)}"
            full = (*prefix, *path)
            problem = leaf_problem(tree, full, leaf, leaf_spec, mesh, where, divisible=divisible)
            problems += [] if problem is None else [problem]
            out.append(leaf_spec)
            if names is not None:
                names.append(where)
    raise_problems(problems, root, mesh)
    return out


def varying_axes(x: jax.Array) -> frozenset:
    """The mesh axes along which `x` may differ between devices (empty outside)."""
    mat = getattr(jax.typeof(x), "mat", None)
    return frozenset() if mat is None else mat.varying


def splits(x: jax.Array, axis: str) -> bool:
    """Whether `x` may differ between devices along the bound mesh axis `axis`, as
    `shard_map` tracks it; where it does not track varying values (`check_vma=False`),
    `True` (assume the worst: split)."""
    tracked = axis in varying_axes(jax.lax.axis_index(axis))
    return axis in varying_axes(x) or not tracked


def _check_replication(leaf: Any, spec: P, where: str, mesh: Any) -> None:
    """An output may vary only along the mesh axes its spec names (check_vma's rule,
    with the leaf's name and the fix)."""
    named = {a for entry in spec if entry is not None for a in _axes(entry)}
    extra = sorted(varying_axes(leaf) - named)
    if extra:
        axes = ", ".join(repr(a) for a in extra)
        raise ValueError(
            f"{where}: the value may differ between devices along mesh axis {axes} of "
            f"{describe_mesh(mesh)}, but its spec {spec} says it is replicated there. Reduce "
            f"it first (e.g. jax.lax.psum or pmean over {axes}), or name the axis in the spec "
            f"if each device's block is wanted."
        )


def _axes(entry: Any) -> tuple:
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _current_mesh(mesh: Any) -> Any:
    if mesh is not None:
        return mesh
    ctx = jax.sharding.get_abstract_mesh()
    if ctx.empty:
        raise ValueError(
            "filter_shard_map: no mesh. Pass `mesh=eqxpar.make_mesh(...)`, or call it "
            "inside `with jax.set_mesh(mesh):`."
        )
    return ctx


def _named(mesh: Any, spec: P) -> Any:
    return jax.sharding.NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec


def _split(leaves: list, specs: list) -> tuple[list, list]:
    dyn = [x for x, s in zip(leaves, specs, strict=True) if s is not None]
    static = [None if s is not None else x for x, s in zip(leaves, specs, strict=True)]
    return dyn, static


def _fill(static: list, mask: list[bool], dyn: list | tuple) -> list:
    it = iter(dyn)
    return [next(it) if m else s for s, m in zip(static, mask, strict=True)]


def filter_shard_map(
    f: Callable | None = None,
    /,
    *,
    mesh: Any = None,
    in_specs: Any = None,
    out_specs: Any = None,
    axis_names: frozenset[str] = frozenset(),
    check_vma: bool = True,
) -> Any:
    """`jax.shard_map` for pytrees that hold Equinox modules and other non-array leaves.

    Inside `f`, every array is its per-device block and collectives over the mesh's
    named axes are available. Non-array leaves (functions, Python numbers, `None`,
    static module fields) pass through untouched, both in and out.

    **Arguments:**

    - `f`: the function to map (positional-only). Omit it to use as a decorator:
      `@filter_shard_map(mesh=mesh, in_specs=..., out_specs=...)`.
    - `mesh`: a `jax.sharding.Mesh`; defaults to the one set by `jax.set_mesh`.
    - `in_specs`: a tree prefix of the positional arguments (a tuple, one entry per
      argument). Each leaf is a `PartitionSpec`, applied to every array below it, or
      `None`, meaning the declared specs of the modules below it (`partition_specs`;
      undeclared arrays are replicated). Default `None`: declared specs everywhere.
    - `out_specs`: the same, for the output tree. A `None` leaf makes returned modules
      (e.g. gradients or an updated model) come back with their declared sharding.
    - `axis_names`: the mesh axes to map over manually (default: all), as in
      `jax.shard_map`.
    - `check_vma`: as in `jax.shard_map`: track which values vary across devices and
      check `out_specs` against it. Keep it on: gradients through replicated inputs
      rely on it.

    **Returns:**

    The mapped function, taking and returning global arrays. Specs that do not fit
    raise a `ValueError` naming the leaf by its key path (`in_specs[0].weight`), the
    mesh, and the fix.
    """
    if f is None:
        return functools.partial(
            filter_shard_map,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            axis_names=axis_names,
            check_vma=check_vma,
        )
    if not callable(f):
        raise TypeError(f"filter_shard_map: expected a function to map, got {f!r}.")

    @functools.wraps(f)
    def mapped(*args: Any) -> Any:
        the_mesh = _current_mesh(mesh)
        if (
            isinstance(in_specs, tuple)
            and not isinstance(in_specs, P)
            and len(in_specs) != len(args)
        ):
            raise ValueError(
                f"filter_shard_map: in_specs has {len(in_specs)} entries but "
                f"{getattr(f, '__name__', 'f')} was called with {len(args)} positional "
                f"arguments; give one spec (or None) per argument."
            )
        flat_in = _expand(
            in_specs,
            args,
            the_mesh,
            "in_specs",
            divisible=True,
        )
        leaves, treedef = jax.tree.flatten(args)
        dyn, static = _split(leaves, flat_in)
        mask = [s is not None for s in flat_in]
        dyn_specs = tuple(s for s in flat_in if s is not None)
        if all(t == AxisType.Explicit for t in the_mesh.axis_types):
            dyn = [
                jax.sharding.reshard(x, _named(the_mesh, s))
                for x, s in zip(dyn, dyn_specs, strict=True)
            ]

        out_box: dict[str, Any] = {}

        def per_shard(*dyn_leaves: Any) -> Any:
            out = f(*treedef.unflatten(_fill(static, mask, dyn_leaves)))
            out_leaves, out_def = jax.tree.flatten(out)
            out_mask = [eqx.is_array(x) for x in out_leaves]
            for leaf, (where, spec) in zip(
                (x for x, m in zip(out_leaves, out_mask, strict=True) if m),
                out_box.get("check", ()),
            ):
                _check_replication(leaf, spec, where, the_mesh)
            out_box.update(
                treedef=out_def,
                mask=out_mask,
                static=[None if m else x for x, m in zip(out_leaves, out_mask, strict=True)],
                abstract=out,
            )
            return tuple(x for x, m in zip(out_leaves, out_mask, strict=True) if m)

        def run(flat_out_specs: Any) -> tuple:
            return jax.shard_map(
                per_shard,
                mesh=mesh,
                in_specs=dyn_specs,
                out_specs=flat_out_specs,
                axis_names=axis_names,
                check_vma=check_vma,
            )(*dyn)

        # The output structure is only known once `f` has been traced. One abstract
        # trace (no compilation) finds it; out_specs are then expanded against it.
        jax.eval_shape(
            lambda *d: jax.shard_map(
                per_shard,
                mesh=mesh,
                in_specs=dyn_specs,
                out_specs=P(),
                axis_names=axis_names,
                check_vma=False,
            )(*d),
            *dyn,
        )
        abstract_out = out_box["abstract"]
        names: list[str] = []
        flat_out = _expand(
            out_specs, abstract_out, the_mesh, "out_specs", divisible=False, names=names
        )
        dyn_out_specs = tuple(s for s in flat_out if s is not None)
        if check_vma:
            out_box["check"] = list(zip(names, dyn_out_specs, strict=True))
        out_dyn = run(dyn_out_specs)
        return out_box["treedef"].unflatten(_fill(out_box["static"], out_box["mask"], out_dyn))

    return mapped
