"""RMSNorm and LayerNorm over the last dim, for replicated or sequence-split inputs."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._collectives import copy_to_region
from .._sharding import sharded
from .._typecheck import typechecked
from ._common import default_float, local_param


def _param(norm: RMSNorm | LayerNorm, name: str, ndim: int) -> Array:
    weight = local_param(type(norm).__name__, name, getattr(norm, name), (norm.dim,))
    sequence_parallel, axis_name = norm.sequence_parallel, norm.axis_name
    # Under sequence parallelism each device normalises its own sequence block, so the
    # replicated weight's gradient must be summed over the blocks (Megatron's f).
    if sequence_parallel:
        weight = copy_to_region(weight, axis_name)
    return weight.astype(jnp.float32).reshape((1,) * (ndim - 1) + weight.shape)


class RMSNorm(eqx.Module):
    """`x / rms(x) * weight` over the last dim, computed in float32.

    The weight is replicated. With `sequence_parallel=True` the input is a sequence
    block and the weight's gradient is all-reduced over `axis_name`.
    """

    weight: Float[Array, " dim"] = eqx.field(metadata=sharded(gathers_on_use=True))
    dim: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    sequence_parallel: bool = eqx.field(static=True)
    axis_name: str | None = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        sequence_parallel: bool = False,
        axis_name: str | None = "tensor",
        dtype: Any = None,
    ):
        """**Arguments:**

        - `dim`: size of the normalised (last) dim.
        - `eps`: added to the mean square.
        - `sequence_parallel`: inputs are sequence blocks (sums the weight gradient).
        - `axis_name`: the tensor-parallel axis (used with `sequence_parallel`).
        - `dtype`: weight dtype (default f32).
        """
        self.weight = jnp.ones((dim,), default_float(dtype))
        self.dim, self.eps = dim, eps
        self.sequence_parallel, self.axis_name = sequence_parallel, axis_name

    @typechecked
    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        """Normalises `(*batch, dim)`; returns the same shape and dtype."""
        with jax.named_scope("eqxpar.RMSNorm"):
            h = x.astype(jnp.float32)
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
            h = h * _param(self, "weight", x.ndim)
            return h.astype(x.dtype)


class LayerNorm(eqx.Module):
    """`(x - mean) / std * weight + bias` over the last dim, computed in float32.

    The weight and bias are replicated. With `sequence_parallel=True` the input is a
    sequence block and their gradients are all-reduced over `axis_name`.
    """

    weight: Float[Array, " dim"] = eqx.field(metadata=sharded(gathers_on_use=True))
    bias: Float[Array, " dim"] | None = eqx.field(metadata=sharded(gathers_on_use=True))
    dim: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    sequence_parallel: bool = eqx.field(static=True)
    axis_name: str | None = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        *,
        use_bias: bool = True,
        sequence_parallel: bool = False,
        axis_name: str | None = "tensor",
        dtype: Any = None,
    ):
        """**Arguments:**

        - `dim`: size of the normalised (last) dim.
        - `eps`: added to the variance.
        - `use_bias`: whether to add a learned bias.
        - `sequence_parallel`: inputs are sequence blocks (sums the parameter gradients).
        - `axis_name`: the tensor-parallel axis (used with `sequence_parallel`).
        - `dtype`: parameter dtype (default f32).
        """
        dtype = default_float(dtype)
        self.weight = jnp.ones((dim,), dtype)
        self.bias = jnp.zeros((dim,), dtype) if use_bias else None
        self.dim, self.eps = dim, eps
        self.sequence_parallel, self.axis_name = sequence_parallel, axis_name

    @typechecked
    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        """Normalises `(*batch, dim)`; returns the same shape and dtype."""
        with jax.named_scope("eqxpar.LayerNorm"):
            h = x.astype(jnp.float32)
            mean = jnp.mean(h, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
            h = (h - mean) * jax.lax.rsqrt(var + self.eps)
            h = h * _param(self, "weight", x.ndim)
            if self.bias is not None:
                h = h + _param(self, "bias", x.ndim)
            return h.astype(x.dtype)
