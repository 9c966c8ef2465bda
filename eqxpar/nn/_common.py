"""Checks and initialisers shared by the parallel layers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

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


class FSDPShard(eqx.Module):
    """A parameter stored split over the FSDP axis, as the train step's plan says.

    `eqxpar.train.make_train_step(..., strategy="fsdp")` wraps each parameter its plan
    splits (`LeafPlan.param_split`) in an `FSDPShard` before calling the loss, so the
    layer that uses it knows, without guessing from shapes, that it must all-gather
    `value` over `axis` along `dim` (see `local_param`). Nothing else is ever gathered:
    a plain array that arrives with the wrong shape raises instead.

    **Fields:**

    - `value`: this device's shard of the parameter.
    - `axis`: the mesh axis it is split over (the strategy's data axis).
    - `dim`: the split dim, counted from the end (negative), so it stays right when
      stacked-layer dims in front are indexed away by a scan.
    """

    value: jax.Array
    axis: str = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __check_init__(self):
        if self.dim >= 0:
            raise ValueError(f"FSDPShard(dim={self.dim}): count the dim from the end (< 0).")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)


def local_param(
    layer: str, name: str, array: jax.Array | FSDPShard, expected: tuple[int, ...]
) -> jax.Array:
    """This device's block of a parameter, all-gathered first if it is an `FSDPShard`.

    Inside `shard_map` a layer's parameter must be its tensor-parallel block,
    `expected`. Under FSDP the train step passes it as an `FSDPShard`: it is
    all-gathered here over its axis, at the point of use, so only the layer being
    computed is ever whole (inside a scanned stack: one layer at a time). The transpose
    of that gather is the reduce-scatter of the gradient.

    **Arguments:**

    - `layer`, `name`: for messages, e.g. `"ColumnParallelLinear"`, `"weight"`.
    - `array`: the parameter as this device holds it (an array or an `FSDPShard`).
    - `expected`: its tensor-parallel block shape.

    **Returns:**

    The `expected`-shaped block. Raises `ValueError` naming the dim if the array was
    passed with the wrong specs.
    """
    if isinstance(array, FSDPShard):
        gathered = jax.lax.all_gather(array.value, array.axis, axis=array.dim, tiled=True)
        array = checkpoint_name(gathered, FSDP_GATHERED)
    assert not isinstance(array, FSDPShard)
    for dim, (have, want) in enumerate(zip(array.shape, expected, strict=True)):
        if have != want:
            raise ValueError(
                f"{layer}.{name}: dim {dim} has size {have} on this device, but this layer's "
                f"block of it is {want} (shape {expected}). Pass the module with its declared "
                f"specs (in_specs=None for it in eqxpar.filter_shard_map, or "
                f"eqxpar.partition_specs(module))."
            )
    return array


FSDP_GATHERED = "eqxpar.fsdp_gathered"
"""The `checkpoint_name` of every FSDP all-gather's result, for remat policies."""


def regather_in_backward(fn: Callable[..., Any], param: jax.Array | FSDPShard, *args: Any) -> Any:
    """`fn(param, *args)`, without keeping an FSDP-gathered `param` for the backward pass.

    When `param` is an `FSDPShard`, `fn` runs under `jax.checkpoint` saving only its
    inputs, so the backward pass all-gathers the weight again from the shard — ZeRO-3's
    second gather — instead of holding every layer's whole weights from the forward
    pass to the backward pass. For a linear layer nothing else is recomputed but what
    the backward needs (the weight; with sequence parallelism also the gathered input,
    as Megatron does). Otherwise it is just `fn(param, *args)`.
    """
    if not isinstance(param, FSDPShard):
        return fn(param, *args)
    policy = jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)(param, *args)


def tp_block(size: int, axis: Any) -> int:
    """The size of a dim split over tensor-parallel `axis` (the whole size outside)."""
    return size // shard_count(axis)


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
