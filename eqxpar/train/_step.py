"""One train-step factory for every data-parallel strategy, composed with TP."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from .._collectives import to_varying
from .._shard_map import filter_shard_map
from ..nn._common import FSDPShard
from ._state import TrainState, state_spec_tree
from ._strategy import LeafPlan, Strategy, as_strategy, is_plan, plan, plan_leaves


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The static settings of one train step (everything but the state and batch)."""

    loss_fn: Callable
    optimizer: optax.GradientTransformation
    strategy: Strategy
    data_size: int
    sample_axes: tuple[str, ...]
    sample_size: int
    accumulation_steps: int
    clip_norm: float | None
    loss_scale: float | None
    skip_nonfinite: bool

    @property
    def scale(self) -> float:
        return 1.0 if self.loss_scale is None else self.loss_scale

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Every mesh axis the batch is split over: the data axis, then the others
        (e.g. `"context"`, which splits each sequence)."""
        return (self.strategy.data_axis, *self.sample_axes)


def _microbatches(batch: tuple, count: int) -> tuple:
    def split(x):
        if x.shape[0] % count:
            raise ValueError(
                f"accumulation_steps={count} does not divide this device's batch of "
                f"{x.shape[0]}; use a per-device batch that is a multiple of {count}."
            )
        return x.reshape(count, x.shape[0] // count, *x.shape[1:])

    return jax.tree.map(split, batch)


def _fsdp_view(plans: Any, model: Any, axis: str) -> Any:
    """The model as the loss sees it: each array the plan splits (FSDP) wrapped in an
    `FSDPShard` saying which axis and dim its layer must all-gather."""

    def view(p: LeafPlan | None, x: Any) -> Any:
        if p is None or not p.param_split or p.zero_dim is None:
            return x
        return FSDPShard(x, axis, p.zero_dim - p.ndim)

    return jax.tree.map(view, plans, model, is_leaf=is_plan)


def _loss_and_grads(s: _Settings, plans: Any, params: Any, static: Any, batch: tuple, key: Any):
    """This device's (scaled) loss, the loss function's own metrics and the unreduced
    gradients, accumulated (averaged) over microbatches."""
    axis = s.strategy.data_axis
    # Differentiate with respect to parameters marked as varying over the axes that
    # split the batch, so each device's gradient comes back unreduced and the strategy
    # chooses the collective (all-reduce or reduce-scatter) in `_reduce`.
    varying = jax.tree.map(lambda x: to_varying(x, s.batch_axes), params)

    def local_loss(p, micro, k):
        model = _fsdp_view(plans, eqx.combine(p, static), axis)
        out = s.loss_fn(model, *micro, k)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        return loss * s.scale, metrics

    grad_fn = jax.value_and_grad(local_loss, has_aux=True)
    n = s.accumulation_steps
    if n == 1:
        (loss, metrics), grads = grad_fn(varying, batch, key)
        return loss, metrics, grads

    def accumulate(carry, xs):
        micro, i = xs
        (value, metrics), g = grad_fn(varying, micro, jax.random.fold_in(key, i))
        return (carry[0] + value, jax.tree.map(jnp.add, carry[1], g)), metrics

    zero = (
        to_varying(jnp.zeros((), jnp.float32), s.batch_axes),
        jax.tree.map(jnp.zeros_like, varying),
    )
    micro = (_microbatches(batch, n), jnp.arange(n))
    (loss, grads), metrics = lax.scan(accumulate, zero, micro)
    mean = functools.partial(jnp.mean, axis=0)
    return loss / n, jax.tree.map(mean, metrics), jax.tree.map(lambda g: g / n, grads)


def _reduce(s: _Settings, plans: Any, grads: Any, loss: Any) -> tuple[Any, Any]:
    """Mean gradients and loss over the axes that split the batch, each gradient in
    the layout the strategy keeps it in (`LeafPlan.grad_split`): ZeRO and FSDP
    split over the data axis; the other batch axes (context, expert) are all-reduced,
    except for a parameter split over one of them (an expert's weights over
    `"expert"`): its all-to-alls already brought every shard's tokens to it."""
    axis, kind = s.strategy.data_axis, s.strategy.kind
    divide = s.data_size * s.sample_size * s.scale

    def reduce(p: LeafPlan | None, g: Any) -> Any:
        if p is None:
            return None
        own = p.sharded_axes(axis, False)
        others = tuple(a for a in s.sample_axes if a not in own)
        if p.param_split:  # FSDP: the transpose of the all-gather already reduce-scattered
            return (lax.psum(g, others) if others else g) / divide
        if p.grad_split(kind):
            assert p.zero_dim is not None
            g = lax.psum_scatter(g, axis, scatter_dimension=p.zero_dim, tiled=True)
            return (lax.psum(g, others) if others else g) / divide
        return lax.psum(g, (axis, *others)) / divide

    grads = jax.tree.map(reduce, plans, grads, is_leaf=is_plan)
    return grads, lax.psum(loss, s.batch_axes) / divide


def _global_norm(s: _Settings, plans: Any, grads: Any) -> Any:
    """The gradient norm over the whole model: each leaf's sum of squares is summed
    over the mesh axes it is split over (replicated copies are counted once)."""
    squares: dict[tuple[str, ...], Any] = {}
    for p, g in zip(plan_leaves(plans), jax.tree.leaves(grads), strict=True):
        axes = p.sharded_axes(s.strategy.data_axis, p.grad_split(s.strategy.kind))
        squares[axes] = squares.get(axes, 0.0) + jnp.sum(jnp.square(g.astype(jnp.float32)))
    return jnp.sqrt(sum(lax.psum(v, axes) if axes else v for axes, v in squares.items()))


def _update(s: _Settings, plans: Any, params: Any, grads: Any, opt_state: Any) -> tuple:
    """Applies the optimizer to this device's block of each parameter (its ZeRO block,
    or the whole array where nothing is split) and all-gathers the updated blocks of
    parameters the strategy keeps replicated."""
    axis, kind = s.strategy.data_axis, s.strategy.kind
    index = lax.axis_index(axis)

    def zero_dim(p: LeafPlan | None) -> int | None:  # optimizer state split, parameter whole
        return None if p is None or p.param_split else p.zero_dim

    def block(p: LeafPlan | None, x: Any) -> Any:  # replicated array -> this device's block
        dim = zero_dim(p)
        if dim is None:
            return x
        size = x.shape[dim] // s.data_size
        return lax.dynamic_slice_in_dim(x, index * size, size, axis=dim)

    def unblock(p: LeafPlan | None, x: Any) -> Any:  # updated block -> replicated array
        dim = zero_dim(p)
        return x if dim is None else lax.all_gather(x, axis, axis=dim, tiled=True, to="invarying")

    param_blocks = jax.tree.map(block, plans, params, is_leaf=is_plan)
    grad_blocks = jax.tree.map(
        lambda p, g: g if p is None or p.grad_split(kind) else block(p, g),
        plans,
        grads,
        is_leaf=is_plan,
    )
    updates, opt_state = s.optimizer.update(grad_blocks, opt_state, param_blocks)
    new_blocks = optax.apply_updates(param_blocks, updates)
    return jax.tree.map(unblock, plans, new_blocks, is_leaf=is_plan), opt_state


def _local_step(state: TrainState, *batch: Any, s: _Settings, plans: Any) -> tuple:
    """One step on this device: loss and gradients, reduction over the data axis,
    global norm and clipping, the optimizer update."""
    params, static = eqx.partition(state.model, eqx.is_array)
    axis = s.strategy.data_axis
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), lax.axis_index(axis))
    loss, extra, grads = _loss_and_grads(s, plans, params, static, batch, key)
    grads, loss = _reduce(s, plans, grads, loss)
    extra = jax.tree.map(lambda m: lax.pmean(to_varying(m, s.batch_axes), s.batch_axes), extra)
    grad_norm = _global_norm(s, plans, grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    if s.clip_norm is not None:
        factor = jnp.minimum(1.0, s.clip_norm / (grad_norm + 1e-6))
        grads = jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads)
    new_params, opt_state = _update(s, plans, params, grads, state.opt_state)
    if s.skip_nonfinite:
        keep = functools.partial(jnp.where, finite)
        new_params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    applied = finite.astype(jnp.int32) if s.skip_nonfinite else 1
    new_state = TrainState(
        eqx.combine(new_params, static), opt_state, state.step + applied, state.key
    )
    return new_state, {**extra, "loss": loss, "grad_norm": grad_norm, "finite": finite}


def _sample_axes(specs: tuple[P, ...] | None, data_axis: str, sizes: dict) -> tuple[str, ...]:
    """The mesh axes other than `data_axis` that `specs` split the batch over."""
    named: list[str] = []
    for spec in specs or ():
        for entry in spec:
            for name in () if entry is None else (entry,) if isinstance(entry, str) else entry:
                if name not in sizes:
                    raise ValueError(
                        f"batch_specs name the axis {name!r}, which is not an axis of the "
                        f"mesh {tuple(sizes)}."
                    )
                if name != data_axis and name not in named:
                    named.append(name)
    return tuple(named)


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    mesh: Any,
    strategy: str | Strategy = "dp",
    batch_specs: tuple[P, ...] | None = None,
    accumulation_steps: int = 1,
    clip_norm: float | None = None,
    loss_scale: float | None = None,
    skip_nonfinite: bool | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """A jitted `step(state, *batch) -> (state, metrics)` for any strategy and mesh.

    The whole step is one `eqx.filter_jit` around one `eqxpar.filter_shard_map` over
    the mesh. Inside, each device computes the loss and gradients of its batch shard
    (tensor-parallel layers issue their own collectives); the strategy then reduces the
    gradients over the data axis (all-reduce, or reduce-scatter for ZeRO-2 and FSDP),
    clips them by their global norm, and applies the optimizer to each device's block,
    all-gathering updated parameters where the strategy keeps them replicated.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *batch, key) -> scalar`: the mean loss over this
      device's batch shard (per-shard code: eqxpar layers see their blocks). The
      global loss is the mean over data shards, which must be of equal size. It may
      return `(scalar, metrics)` with `metrics` a dict of scalars (e.g. an MoE's
      dropped fraction): each is averaged over the batch shards (and microbatches)
      and returned with the step's metrics.
    - `optimizer`: an Optax transformation with element-wise updates (see
      `init_state`).
    - `mesh`: the mesh.
    - `strategy`: `"dp"`, `"zero1"`, `"zero2"`, `"fsdp"` or a `Strategy`.
    - `batch_specs`: one `PartitionSpec` per batch argument; default
      `P(data_axis)` for each. Every mesh axis they name splits the batch: e.g.
      `P("data", "context")` for tokens with context parallelism. The loss is then
      the mean over all those shards, and gradients of parameters replicated over
      them are all-reduced over them (ZeRO and FSDP still split over the data axis
      only).
    - `accumulation_steps`: split each device's batch into this many microbatches and
      sum their gradients before one update.
    - `clip_norm`: clip gradients to this global norm (computed across all devices).
    - `loss_scale`: multiply the loss by this before differentiating and divide the
      gradients after (static loss scaling for float16).
    - `skip_nonfinite`: leave the parameters and optimizer state unchanged when the
      loss or gradient norm is not finite; default: on when `loss_scale` is set.

    **Returns:**

    `step(state, *batch)`, returning the new `TrainState` (same shardings) and a dict
    of replicated scalars: `loss`, `grad_norm` (before clipping), `finite`, and the
    loss function's own metrics.
    """
    strategy = as_strategy(strategy)
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps={accumulation_steps}; it must be >= 1.")
    skip = loss_scale is not None if skip_nonfinite is None else skip_nonfinite
    sizes = dict(mesh.shape)
    if strategy.data_axis not in sizes:
        raise ValueError(
            f"strategy data_axis {strategy.data_axis!r} is not an axis of the mesh {tuple(sizes)}."
        )

    sample_axes = _sample_axes(batch_specs, strategy.data_axis, sizes)
    settings = _Settings(
        loss_fn,
        optimizer,
        strategy,
        sizes[strategy.data_axis],
        sample_axes,
        math.prod(sizes[a] for a in sample_axes),
        accumulation_steps,
        clip_norm,
        loss_scale,
        skip,
    )

    @eqx.filter_jit
    def step(state: TrainState, *batch: Any) -> tuple[TrainState, dict]:
        plans = plan(state.model, strategy, mesh)
        specs = state_spec_tree(state, strategy, mesh)
        bspecs = (P(strategy.data_axis),) * len(batch) if batch_specs is None else batch_specs
        local = functools.partial(_local_step, s=settings, plans=plans)
        mapped = filter_shard_map(
            local, mesh=mesh, in_specs=(specs, *bspecs), out_specs=(specs, P())
        )
        return mapped(state, *batch)

    return step
