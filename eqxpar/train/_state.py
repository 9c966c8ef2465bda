"""The train state: model, optimizer state, step and PRNG key, placed on the mesh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, PRNGKeyArray

from .._sharding import check_tree, is_arraylike
from ._strategy import Strategy, as_strategy, opt_state_specs, param_specs, plan, state_specs


class TrainState(eqx.Module):
    """Everything a training run carries from step to step.

    **Fields:**

    - `model`: the model (global arrays, sharded on the mesh).
    - `opt_state`: the Optax state (split over the data axis under ZeRO / FSDP).
    - `step`: the number of updates applied, an int32 scalar.
    - `key`: the run's PRNG key; step `i` uses `fold_in(key, i)`.
    """

    model: Any
    opt_state: Any
    step: Array
    key: PRNGKeyArray


def state_spec_tree(state: TrainState, strategy: Strategy, mesh: Any) -> TrainState:
    """The `PartitionSpec` of every array of `state` under `strategy` (a `TrainState`
    of specs, `None` at non-array leaves)."""
    plans = plan(state.model, strategy, mesh)
    params = eqx.filter(state.model, is_arraylike)
    return TrainState(
        model=param_specs(plans, strategy),
        opt_state=opt_state_specs(state.opt_state, params, state_specs(plans, strategy)),
        step=P(),  # type: ignore[arg-type]
        key=P(),  # type: ignore[arg-type]
    )


def init_state(
    make: Callable[..., Any],
    /,
    *args: Any,
    optimizer: optax.GradientTransformation,
    mesh: Any,
    strategy: str | Strategy = "dp",
    rng: PRNGKeyArray | None = None,
    **kwargs: Any,
) -> TrainState:
    """Builds the model and its optimizer state directly on the mesh.

    Runs `make(*args, **kwargs)` and `optimizer.init` under one `jax.jit` whose output
    shardings are the strategy's specs, so each device creates only its own blocks:
    no array is ever whole on one device unless the strategy replicates it. The same
    `args` give the same global model on every mesh (see `eqxpar.sharded_init`).

    **Arguments:**

    - `make`: builds the model, e.g. `Transformer`.
    - `*args`, `**kwargs`: its arguments (arrays such as keys are traced).
    - `optimizer`: an Optax transformation. Its `update` runs on each device's block
      of the parameters: use element-wise transformations (Adam, SGD, weight decay,
      schedules) and leave gradient clipping to `make_train_step(clip_norm=...)`,
      which computes the norm across devices.
    - `mesh`: the mesh.
    - `strategy`: `"dp"`, `"zero1"`, `"zero2"`, `"fsdp"` or a `Strategy`.
    - `rng`: the training PRNG key (dropout and the like); default `key(0)`. (The
      model's own initialisation key goes in `args`/`kwargs`, e.g. `key=...`.)

    **Returns:**

    A `TrainState` at step 0.
    """
    strategy = as_strategy(strategy)
    key = jax.random.key(0) if rng is None else rng
    dyn_in, static_in = eqx.partition((args, kwargs), eqx.is_array)

    def build(dyn: Any, key: PRNGKeyArray) -> TrainState:
        a, k = eqx.combine(dyn, static_in)
        model = make(*a, **k)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        return TrainState(model, opt_state, jnp.zeros((), jnp.int32), key)

    abstract = eqx.filter_eval_shape(build, dyn_in, key)
    specs = state_spec_tree(abstract, strategy, mesh)
    check_tree(abstract, specs, mesh, "init_state: state")
    flat_specs = jax.tree.structure(abstract).flatten_up_to(specs)
    _, static_out = eqx.partition(abstract, is_arraylike)
    shardings = jax.tree.unflatten(
        jax.tree.structure(abstract),
        [
            NamedSharding(mesh, spec) if is_arraylike(leaf) else None
            for leaf, spec in zip(jax.tree.leaves(abstract), flat_specs, strict=True)
        ],
    )
    dyn_out = jax.jit(
        lambda dyn, key: eqx.partition(build(dyn, key), eqx.is_array)[0],
        out_shardings=shardings,
    )(dyn_in, key)
    return eqx.combine(dyn_out, static_out)
