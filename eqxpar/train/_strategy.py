"""Data-parallel strategies: which dim of each array goes on the data axis, and where.

| strategy | parameters | gradients | optimizer state |
| --- | --- | --- | --- |
| `"dp"` | replicated | all-reduced | replicated |
| `"zero1"` | replicated (all-gathered after the update) | all-reduced | split |
| `"zero2"` | replicated (all-gathered after the update) | reduce-scattered | split |
| `"fsdp"` | split (all-gathered at use, per layer) | reduce-scattered | split |

"Split" means: on the data axis along one dim of the array, the largest one that is
not already split over another axis (tensor parallelism) nor a stacked-layer dim, that
the data size divides, for arrays of at least `min_shard_size` elements. Smaller
arrays stay replicated and their gradients all-reduced. FSDP splits the parameters of
eqxpar layers, which all-gather them where they are used; other arrays are handled
as under `"zero2"`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
from jax.sharding import PartitionSpec as P

from .._sharding import LeafLayout, layouts

Kind = Literal["dp", "zero1", "zero2", "fsdp"]
KINDS: tuple[str, ...] = ("dp", "zero1", "zero2", "fsdp")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How a train step uses the data axis.

    **Fields:**

    - `kind`: `"dp"`, `"zero1"`, `"zero2"` or `"fsdp"` (ZeRO-3).
    - `data_axis`: the mesh axis the batch is split over.
    - `min_shard_size`: arrays with fewer elements are never split over the data axis.
    """

    kind: Kind = "dp"
    data_axis: str = "data"
    min_shard_size: int = 1024

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Strategy.kind={self.kind!r}; use one of {KINDS}.")


def as_strategy(strategy: str | Strategy) -> Strategy:
    """`"fsdp"` -> `Strategy("fsdp")`; a `Strategy` is returned as it is."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in KINDS:
        raise ValueError(f"strategy={strategy!r}; use one of {KINDS} or an eqxpar.train.Strategy.")
    return Strategy(kind=strategy)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """The plan for one array: its declared spec, and the dim split over the data axis
    (`None`: replicated), and whether the parameter itself is split (FSDP) or only its
    optimizer state (and, for ZeRO-2, its gradient)."""

    spec: P
    ndim: int
    zero_dim: int | None
    param_split: bool

    def grad_split(self, kind: str) -> bool:
        """Whether the reduced gradient is split over the data axis under strategy
        `kind`: for split parameters (FSDP), and for ZeRO-2 / FSDP optimizer blocks.
        The one place this rule lives (the train step and memory reports use it)."""
        return self.param_split or (self.zero_dim is not None and kind in ("zero2", "fsdp"))

    def with_data(self, axis: str, split: bool) -> P:
        """The declared spec with `axis` added on `zero_dim` when `split`."""
        entries = list(self.spec) + [None] * (self.ndim - len(self.spec))
        if split and self.zero_dim is not None:
            entries[self.zero_dim] = axis
        while entries and entries[-1] is None:
            entries.pop()
        return P(*entries)

    def sharded_axes(self, axis: str, split: bool) -> tuple[str, ...]:
        """Mesh axes the array is split over (for summing norms across devices)."""
        spec = self.with_data(axis, split)
        names = [e for entry in spec if entry is not None for e in _names(entry)]
        return tuple(names)


def _names(entry: Any) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _plan_leaf(layout: LeafLayout, leaf: Any, strategy: Strategy, data_size: int) -> LeafPlan:
    spec, ndim = layout.spec, leaf.ndim
    zero_dim = None
    if strategy.kind != "dp" and data_size > 1 and leaf.size >= strategy.min_shard_size:
        entries = list(spec) + [None] * (ndim - len(spec))
        candidates = [
            d
            for d in range(layout.leading, ndim)
            if entries[d] is None and leaf.shape[d] % data_size == 0
        ]
        if candidates:
            zero_dim = max(candidates, key=lambda d: (leaf.shape[d], -d))
    param_split = strategy.kind == "fsdp" and layout.gathers_on_use and zero_dim is not None
    return LeafPlan(spec, ndim, zero_dim, param_split)


def plan(model: Any, strategy: str | Strategy, mesh: Any) -> Any:
    """The `LeafPlan` of every array of `model` (`None` at other leaves).

    **Arguments:**

    - `model`: the model, with global arrays (concrete or abstract).
    - `strategy`: a `Strategy` or its kind.
    - `mesh`: the mesh (for the data axis size).

    **Returns:**

    A tree like `model` with a `LeafPlan` at each array.
    """
    strategy = as_strategy(strategy)
    sizes = dict(mesh.shape)
    if strategy.data_axis not in sizes:
        raise ValueError(
            f"Strategy.data_axis={strategy.data_axis!r} is not an axis of the mesh "
            f"{tuple(sizes)}; use eqxpar.make_mesh or name an existing axis."
        )
    data_size = sizes[strategy.data_axis]
    return jax.tree.map(
        lambda layout, leaf: (
            None if layout is None else _plan_leaf(layout, leaf, strategy, data_size)
        ),
        layouts(model),
        model,
        is_leaf=lambda x: x is None or isinstance(x, LeafLayout),
    )


def is_plan(x: Any) -> bool:
    return x is None or isinstance(x, LeafPlan)


def plan_leaves(plans: Any) -> list[LeafPlan]:
    """The `LeafPlan`s of a plan tree, in the order of the model's array leaves."""
    return [p for p in jax.tree.leaves(plans, is_leaf=is_plan) if p is not None]


def param_specs(plans: Any, strategy: Strategy) -> Any:
    """Specs of the parameters as stored (split only under FSDP)."""
    axis = strategy.data_axis
    return jax.tree.map(
        lambda p: None if p is None else p.with_data(axis, p.param_split), plans, is_leaf=is_plan
    )


def state_specs(plans: Any, strategy: Strategy) -> Any:
    """Specs of optimizer-state arrays shaped like the parameters (split under ZeRO)."""
    axis = strategy.data_axis
    return jax.tree.map(
        lambda p: None if p is None else p.with_data(axis, True), plans, is_leaf=is_plan
    )


def opt_state_specs(opt_state: Any, params: Any, specs: Any) -> Any:
    """Specs for an Optax state: subtrees shaped like `params` take `specs`; every other
    array (step counts, scalars) is replicated."""
    structure = jax.tree.structure(params)

    def like_params(x: Any) -> bool:
        return jax.tree.structure(x) == structure

    return jax.tree.map(
        lambda sub: specs if like_params(sub) else (P() if hasattr(sub, "shape") else None),
        opt_state,
        is_leaf=like_params,
    )
