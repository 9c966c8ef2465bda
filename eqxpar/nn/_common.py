"""Checks and initialisers shared by the parallel layers."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from .._collectives import shard_count
from .._mesh import describe_mesh

COLLECTIVE_MATMUL = (None, "unidirectional", "bidirectional")


def default_float(dtype: Any) -> Any:
    """`dtype`, or JAX's default float (f32, or f64 in x64 mode)."""
    return jnp.zeros((), float).dtype if dtype is None else dtype


def uniform_init(key: jax.Array, shape: tuple[int, ...], dtype: Any, fan_in: int) -> jax.Array:
    """`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, the initialiser of `eqx.nn.Linear`."""
    lim = 1.0 if fan_in == 0 else 1 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, minval=-lim, maxval=lim)


def check_divisible(layer: str, field: str, size: int, axis_name: Any) -> None:
    """At construction: if a mesh is set (`jax.set_mesh`), `size` must split over it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis_name is None:
        return
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    sizes = dict(mesh.shape)
    if not all(n in sizes for n in names):
        return
    parts = math.prod(sizes[n] for n in names)
    if size % parts:
        fits = [d for d in range(1, parts + 1) if size % d == 0 and parts % d == 0]
        raise ValueError(
            f"{layer}: {field}={size} cannot be split {parts} ways over mesh axis "
            f"{axis_name!r} of {describe_mesh(mesh)}. Make {field} a multiple of "
            f"{parts}, or a mesh whose {axis_name!r} size divides {size} "
            f"(e.g. {max(fits)})."
        )


def check_local(layer: str, name: str, array: jax.Array, dim: int, global_size: int, axis: Any):
    """Inside `shard_map`: a sharded parameter must hold exactly its own block.

    Catches a module passed with the wrong in_specs (e.g. replicated), which would
    otherwise compute a silently wrong result.
    """
    parts = shard_count(axis)
    want = global_size // parts
    if array.shape[dim] != want:
        raise ValueError(
            f"{layer}.{name}: dim {dim} has size {array.shape[dim]} on this device, but the "
            f"layer is split {parts} ways over {axis!r}, so each device must hold {want} of "
            f"{global_size}. Pass the module with its declared specs (in_specs=None for it "
            f"in eqxpar.filter_shard_map, or eqxpar.partition_specs(module))."
        )


def check_collective_matmul(layer: str, collective_matmul: Any, sequence_parallel: bool) -> None:
    """The collective-matmul switch is one of `COLLECTIVE_MATMUL` and needs SP."""
    if collective_matmul not in COLLECTIVE_MATMUL:
        raise ValueError(
            f"{layer}: collective_matmul={collective_matmul!r}; use one of {COLLECTIVE_MATMUL}."
        )
    if collective_matmul is not None and not sequence_parallel:
        raise ValueError(
            f"{layer}: collective_matmul={collective_matmul!r} needs sequence_parallel=True. "
            f"It overlaps the sequence all-gather (or reduce-scatter) with the matmul; without "
            f"sequence parallelism there is no such collective to overlap."
        )
