"""Compile a planned layout's train step abstractly and report it against the model."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from .._mesh import make_mesh
from ..train import Strategy, TrainState, make_train_step, state_spec_tree
from ._cost import Layout
from ._report import (
    CommunicationReport,
    StepMemoryReport,
    communication_report,
    step_memory_report,
)


def abstract_state(
    make: Any, config: Any, *, optimizer: Any, mesh: Any, strategy: Strategy
) -> TrainState:
    """The `TrainState` that `eqxpar.train.init_state(make, config, ...)` would build,
    as `jax.ShapeDtypeStruct`s carrying their shardings: no array is created."""

    def build(key: Any) -> TrainState:
        model = make(config, key=key)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        return TrainState(model, opt_state, jnp.zeros((), jnp.int32), key)

    abstract = eqx.filter_eval_shape(build, jax.random.key(0))
    specs = jax.tree.structure(abstract).flatten_up_to(state_spec_tree(abstract, strategy, mesh))
    leaves = [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
        if isinstance(x, jax.ShapeDtypeStruct)
        else x
        for x, spec in zip(jax.tree.leaves(abstract), specs, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def _step(layout: Layout, optimizer: Any, mesh: Any, strategy: Strategy) -> Any:
    """The layout's train step: the pipelined loss with its schedule, or gradient
    accumulation over `layout.microbatches` without a pipeline."""
    from ..pipeline import GPipe, OneFOneB

    schedule = OneFOneB() if layout.schedule == "1f1b" else GPipe()

    def loss_fn(model: Any, x: Any, y: Any, key: Any) -> Any:
        if layout.pipeline > 1:
            return model.loss(x, y, schedule=schedule, microbatches=layout.microbatches)
        return model.loss(x, y)

    accumulate = layout.microbatches if layout.pipeline == 1 else 1
    return make_train_step(
        loss_fn, optimizer, mesh=mesh, strategy=strategy, accumulation_steps=accumulate
    )


def check_layout(
    make: Any,
    config: Any,
    layout: Layout,
    *,
    batch: int,
    seq: int,
    optimizer: Any = None,
    devices: Any = None,
) -> tuple[CommunicationReport, StepMemoryReport]:
    """Builds `layout`'s train step for `make(layout.config(config), key=...)` (e.g.
    `models.Transformer`), compiles it on abstract arrays (nothing is allocated or
    run), and reports its communication and memory against the cost model.

    **Arguments:**

    - `make`: the model class; `config`: its `TransformerConfig`.
    - `layout`: a `Layout`, e.g. `eqxpar.plan(...).best.layout`.
    - `batch`, `seq`: global batch and sequence length.
    - `optimizer`: default `optax.adam(1e-3)` (the cost model assumes Adam).
    - `devices`: `layout.devices` devices; default the first of `jax.devices()`.

    **Returns:** `(CommunicationReport, StepMemoryReport)`.
    """
    available = jax.devices() if devices is None else list(devices)
    if len(available) < layout.devices:
        raise ValueError(
            f"check_layout: {layout} needs {layout.devices} devices, {len(available)} are "
            f"available; pass devices=, or simulate them with "
            f"eqxpar.simulate_cpu_devices({layout.devices}) before JAX starts."
        )
    mesh = make_mesh(
        data=layout.data,
        tensor=layout.tensor,
        pipeline=layout.pipeline,
        devices=available[: layout.devices],
    )
    config = layout.config(config)
    optimizer = optax.adam(1e-3) if optimizer is None else optimizer
    strategy = Strategy(layout.strategy, min_shard_size=layout.min_shard_size)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes ints and floats
        state = abstract_state(make, config, optimizer=optimizer, mesh=mesh, strategy=strategy)
        step = _step(layout, optimizer, mesh, strategy)
        x = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        # `eqx.filter_jit` would take ShapeDtypeStructs for static leaves: trace the
        # step inside a `jax.jit` that sees them as abstract arguments.
        dyn, static = eqx.partition(state, lambda a: isinstance(a, jax.ShapeDtypeStruct))
        outer = jax.jit(lambda d, a, b: step(eqx.combine(d, static), a, b))
        compiled = outer.lower(dyn, x, x).compile()
    kw: dict[str, Any] = dict(
        batch=batch,
        seq=seq,
        strategy=strategy,
        microbatches=layout.microbatches,
        schedule=layout.schedule,
    )
    return (
        communication_report(compiled, mesh, config, **kw),
        step_memory_report(compiled, mesh, config, **kw),
    )
