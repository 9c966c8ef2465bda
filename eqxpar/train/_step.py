"""One train-step factory for every data-parallel strategy, composed with TP."""

from __future__ import annotations

import functools
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
from ..nn._common import fsdp_axis
from ._state import TrainState, state_spec_tree
from ._strategy import LeafPlan, Strategy, as_strategy, is_plan, plan, plan_leaves


def _grad_split(p: LeafPlan, strategy: Strategy) -> bool:
    """Whether this leaf's gradient ends up split over the data axis."""
    return p.param_split or (p.zero_dim is not None and strategy.kind in ("zero2", "fsdp"))


def _microbatches(batch: tuple, count: int) -> tuple:
    def split(x):
        if x.shape[0] % count:
            raise ValueError(
                f"accumulation_steps={count} does not divide this device's batch of "
                f"{x.shape[0]}; use a per-device batch that is a multiple of {count}."
            )
        return x.reshape(count, x.shape[0] // count, *x.shape[1:])

    return jax.tree.map(split, batch)


def _local_step(
    state: TrainState,
    *batch: Any,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    strategy: Strategy,
    plans: Any,
    data_size: int,
    accumulation_steps: int,
    clip_norm: float | None,
    loss_scale: float | None,
    skip_nonfinite: bool,
) -> tuple[TrainState, dict]:
    axis = strategy.data_axis
    params, static = eqx.partition(state.model, eqx.is_array)
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), lax.axis_index(axis))
    scale = 1.0 if loss_scale is None else loss_scale

    # Differentiate with respect to parameters marked as varying over the data axis,
    # so each device's gradient comes back unreduced and the strategy chooses the
    # collective (all-reduce or reduce-scatter) below.
    varying = jax.tree.map(lambda x: to_varying(x, axis), params)

    def local_loss(p, micro, k):
        return loss_fn(eqx.combine(p, static), *micro, k) * scale

    grad_fn = jax.value_and_grad(local_loss)
    if accumulation_steps == 1:
        loss, grads = grad_fn(varying, batch, key)
    else:

        def accumulate(carry, xs):
            micro, i = xs
            value, g = grad_fn(varying, micro, jax.random.fold_in(key, i))
            return (carry[0] + value, jax.tree.map(jnp.add, carry[1], g)), None

        zero = (to_varying(jnp.zeros((), jnp.float32), axis), jax.tree.map(jnp.zeros_like, varying))
        xs = (_microbatches(batch, accumulation_steps), jnp.arange(accumulation_steps))
        (loss, grads), _ = lax.scan(accumulate, zero, xs)
        loss = loss / accumulation_steps
        grads = jax.tree.map(lambda g: g / accumulation_steps, grads)

    def reduce(p: LeafPlan | None, g: Any) -> Any:
        if p is None:
            return None
        if p.param_split:  # FSDP: the transpose of the all-gather already reduce-scattered
            return g / (data_size * scale)
        if _grad_split(p, strategy):
            assert p.zero_dim is not None
            g = lax.psum_scatter(g, axis, scatter_dimension=p.zero_dim, tiled=True)
            return g / (data_size * scale)
        return lax.psum(g, axis) / (data_size * scale)

    grads = jax.tree.map(reduce, plans, grads, is_leaf=is_plan)
    loss = lax.psum(loss, axis) / (data_size * scale)

    # Global gradient norm: each leaf's sum of squares is summed over the mesh axes
    # it is split over (replicated copies are counted once).
    squares: dict[tuple[str, ...], Any] = {}
    for p, g in zip(plan_leaves(plans), jax.tree.leaves(grads)):
        axes = p.sharded_axes(axis, _grad_split(p, strategy))
        squares[axes] = squares.get(axes, 0.0) + jnp.sum(jnp.square(g.astype(jnp.float32)))
    total = sum(lax.psum(v, axes) if axes else v for axes, v in squares.items())
    grad_norm = jnp.sqrt(total)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    if clip_norm is not None:
        factor = jnp.minimum(1.0, clip_norm / (grad_norm + 1e-6))
        grads = jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads)

    index = lax.axis_index(axis)

    def block(p: LeafPlan | None, x: Any) -> Any:  # replicated array -> this device's block
        if p is None or p.zero_dim is None or p.param_split:
            return x
        size = x.shape[p.zero_dim] // data_size
        return lax.dynamic_slice_in_dim(x, index * size, size, axis=p.zero_dim)

    def unblock(p: LeafPlan | None, x: Any) -> Any:  # updated block -> replicated array
        if p is None or p.zero_dim is None or p.param_split:
            return x
        return lax.all_gather(x, axis, axis=p.zero_dim, tiled=True, to="invarying")

    param_blocks = jax.tree.map(block, plans, params, is_leaf=is_plan)
    grad_blocks = jax.tree.map(
        lambda p, g: g if p is None or _grad_split(p, strategy) else block(p, g),
        plans,
        grads,
        is_leaf=is_plan,
    )
    updates, opt_state = optimizer.update(grad_blocks, state.opt_state, param_blocks)
    new_params = jax.tree.map(
        unblock, plans, optax.apply_updates(param_blocks, updates), is_leaf=is_plan
    )
    if skip_nonfinite:
        keep = functools.partial(jnp.where, finite)
        new_params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    applied = finite.astype(jnp.int32) if skip_nonfinite else 1
    new_state = TrainState(
        eqx.combine(new_params, static), opt_state, state.step + applied, state.key
    )
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


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
      global loss is the mean over data shards, which must be of equal size.
    - `optimizer`: an Optax transformation with element-wise updates (see
      `init_state`).
    - `mesh`: the mesh.
    - `strategy`: `"dp"`, `"zero1"`, `"zero2"`, `"fsdp"` or a `Strategy`.
    - `batch_specs`: one `PartitionSpec` per batch argument; default
      `P(data_axis)` for each.
    - `accumulation_steps`: split each device's batch into this many microbatches and
      sum their gradients before one update.
    - `clip_norm`: clip gradients to this global norm (computed across all devices).
    - `loss_scale`: multiply the loss by this before differentiating and divide the
      gradients after (static loss scaling for float16).
    - `skip_nonfinite`: leave the parameters and optimizer state unchanged when the
      loss or gradient norm is not finite; default: on when `loss_scale` is set.

    **Returns:**

    `step(state, *batch)`, returning the new `TrainState` (same shardings) and a dict
    of replicated scalars: `loss`, `grad_norm` (before clipping), `finite`.
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

    @eqx.filter_jit
    def step(state: TrainState, *batch: Any) -> tuple[TrainState, dict]:
        plans = plan(state.model, strategy, mesh)
        specs = state_spec_tree(state, strategy, mesh)
        bspecs = (P(strategy.data_axis),) * len(batch) if batch_specs is None else batch_specs
        local = functools.partial(
            _local_step,
            loss_fn=loss_fn,
            optimizer=optimizer,
            strategy=strategy,
            plans=plans,
            data_size=sizes[strategy.data_axis],
            accumulation_steps=accumulation_steps,
            clip_norm=clip_norm,
            loss_scale=loss_scale,
            skip_nonfinite=skip,
        )
        mapped = filter_shard_map(
            local, mesh=mesh, in_specs=(specs, *bspecs), out_specs=(specs, P())
        )
        with fsdp_axis(strategy.data_axis):  # layers gather FSDP-split weights over it
            return mapped(state, *batch)

    return step
