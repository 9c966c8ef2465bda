"""Mixture of experts with expert parallelism (GShard / Switch Transformer).

A router sends each token to its `top_k` experts; each expert takes at most
`capacity` tokens per group (this device's tokens), the rest of a token's
assignments are dropped (the token keeps its residual). Tokens are laid out in a
dense `(experts, capacity, dim)` buffer (one-hot dispatch and combine tensors), which
runs on every platform. With the experts split over `expert_axis`, one `all_to_all`
sends each expert's slice of the buffer to the device that holds it and a second one
brings the outputs back: two all-to-alls forward, two backward.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from .._collectives import axis_size, shard_count, shard_index, to_varying
from .._shard_map import splits
from .._sharding import stacked
from .._typecheck import typechecked
from ._mlp import Activation, ParallelMLP


class MoEStats(eqx.Module):
    """What one MoE layer reports (global over the axes that split the batch).

    - `load_balance_loss`: Switch Transformer's `N * sum_i f_i P_i` (`f_i`: fraction
      of token-expert assignments routed to expert `i`, `P_i`: its mean router
      probability); 1 when perfectly balanced.
    - `z_loss`: ST-MoE's mean squared log-sum-exp of the router logits.
    - `aux_loss`: `load_balance_coef * load_balance_loss + z_loss_coef * z_loss`, what
      the model adds to its loss.
    - `dropped`: token-expert assignments dropped by capacity; `dropped_fraction`:
      their fraction of all `tokens * top_k` assignments.
    """

    load_balance_loss: Array
    z_loss: Array
    aux_loss: Array
    dropped: Array
    dropped_fraction: Array

    @classmethod
    def zero(cls) -> MoEStats:
        z = jnp.zeros((), jnp.float32)
        return cls(z, z, z, z, z)

    def __add__(self, other: MoEStats) -> MoEStats:
        return jax.tree.map(jnp.add, self, other)


def capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens each expert takes per group.

    **Arguments:**

    - `tokens`: the group's tokens (one device's batch x sequence).
    - `num_experts`, `top_k`, `capacity_factor`: as in `MoE`.

    **Returns:**

    `ceil(capacity_factor * tokens * top_k / num_experts)`, at least 1.
    """
    return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def _split_axes(x: Array, *axes: str | None) -> tuple[str, ...]:
    """The bound axes among `axes` that split the tokens `x` here (not those `x` is
    replicated over, as in decoding with the prompt on every device)."""
    return tuple(a for a in axes if a is not None and axis_size(a) is not None and splits(x, a))


def _global_mean(x: Array, axes: tuple[str, ...]) -> Array:
    return lax.pmean(to_varying(x, axes), axes) if axes else x


class MoE(eqx.Module):
    """A mixture-of-experts MLP: router, top-k, capacity, experts split over
    `expert_axis`, each expert a `ParallelMLP` (tensor-parallel over `axis_name`).

    The expert axis splits the batch as well as the experts (GShard): each device
    routes its own tokens, and the all-to-alls over `expert_axis` carry them to
    their experts and back. Outside `shard_map` it is the plain dense computation.
    """

    router: Array
    experts: ParallelMLP = eqx.field(metadata=stacked("expert_axis"))
    num_experts: int = eqx.field(static=True)
    top_k: int = eqx.field(static=True)
    capacity_factor: float = eqx.field(static=True)
    router_z_loss: float = eqx.field(static=True)
    load_balance_loss: float = eqx.field(static=True)
    expert_axis: str = eqx.field(static=True)
    data_axis: str | None = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        *,
        top_k: int = 2,
        capacity_factor: float = 1.25,
        activation: Activation = "swiglu",
        expert_axis: str = "expert",
        axis_name: str = "tensor",
        data_axis: str | None = "data",
        router_z_loss: float = 1e-3,
        load_balance_loss: float = 1e-2,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: model width; `hidden`: each expert's hidden size (per branch for
          SwiGLU), split over `axis_name`.
        - `num_experts`: experts, split over `expert_axis` (which must divide it).
        - `top_k`: experts per token; their router weights are renormalised to sum to 1.
        - `capacity_factor`: each expert takes at most
          `ceil(capacity_factor * tokens * top_k / num_experts)` tokens per group.
        - `activation`: the experts' activation, `"swiglu"` or `"gelu"`.
        - `expert_axis`, `axis_name`: the mesh axes of the experts and of each
          expert's hidden units.
        - `data_axis`: the other axis that splits the batch; the auxiliary losses are
          averaged over it and `expert_axis`, so they are those of the global batch.
        - `router_z_loss`, `load_balance_loss`: the auxiliary losses' coefficients.
        - `dtype`: parameter dtype; `key`: PRNG key.
        """
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE: top_k={top_k} must be in [1, num_experts={num_experts}].")
        if capacity_factor <= 0:
            raise ValueError(f"MoE: capacity_factor={capacity_factor} must be > 0.")
        kr, ke = jax.random.split(key)
        self.router = jax.random.normal(kr, (num_experts, dim), dtype or jnp.float32) * 0.02
        self.experts = eqx.filter_vmap(
            lambda k: ParallelMLP(
                dim,
                hidden,
                activation=activation,
                use_bias=False,
                axis_name=axis_name,
                dtype=dtype,
                key=k,
            )
        )(jax.random.split(ke, num_experts))
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.router_z_loss, self.load_balance_loss = router_z_loss, load_balance_loss
        self.expert_axis, self.data_axis = expert_axis, data_axis

    def _route(
        self, tokens: Array, factor: float, axes: tuple[str, ...]
    ) -> tuple[Array, Array, MoEStats]:
        """The dispatch and combine tensors `(tokens, experts, capacity)` and the stats
        (global over `axes`, the axes that split the tokens)."""
        t, e, k = tokens.shape[0], self.num_experts, self.top_k
        logits = tokens.astype(jnp.float32) @ self.router.astype(jnp.float32).T
        probs = jax.nn.softmax(logits, axis=-1)
        weight, expert = lax.top_k(probs, k)  # (t, k)
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
        chosen = jax.nn.one_hot(expert, e, dtype=jnp.int32)  # (t, k, e)
        # Position in the expert's buffer: every token's first choice before any
        # second choice (GShard), tokens in order within a choice.
        slot_major = jnp.swapaxes(chosen, 0, 1).reshape(k * t, e)
        position = jnp.sum((jnp.cumsum(slot_major, axis=0) - 1) * slot_major, axis=-1)
        position = jnp.swapaxes(position.reshape(k, t), 0, 1)  # (t, k)
        cap = capacity(t, e, k, factor)
        kept = position < cap
        where = chosen[..., None] * jax.nn.one_hot(position, cap, dtype=jnp.int32)[:, :, None]
        where = where * kept[..., None, None].astype(jnp.int32)  # (t, k, e, cap)
        dispatch = jnp.sum(where, axis=1).astype(tokens.dtype)
        combine = jnp.einsum("tk,tkec->tec", weight, where.astype(jnp.float32))
        return dispatch, combine, self._stats(logits, probs, chosen, kept, axes)

    def _stats(self, logits, probs, chosen, kept, axes: tuple[str, ...]) -> MoEStats:
        routed = jnp.mean(jnp.sum(chosen, axis=1).astype(jnp.float32), axis=0) / self.top_k
        fraction = _global_mean(lax.stop_gradient(routed), axes)
        mean_prob = _global_mean(jnp.mean(probs, axis=0), axes)
        balance = self.num_experts * jnp.sum(fraction * mean_prob)
        z = _global_mean(jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2), axes)
        dropped_local = jnp.sum(~kept).astype(jnp.float32)
        dropped = lax.psum(to_varying(dropped_local, axes), axes) if axes else dropped_local
        total = kept.size * math.prod(shard_count(a) for a in axes)
        aux = self.load_balance_loss * balance + self.router_z_loss * z
        return MoEStats(balance, z, aux, lax.stop_gradient(dropped), dropped / total)

    def _local_experts(self, buffer: Array) -> Array:
        """This device's experts, each on its row of `buffer` `(local_experts, n, dim)`."""
        return eqx.filter_vmap(lambda mlp, h: mlp(h))(self.experts, buffer)

    def _experts(self, buffer: Array) -> Array:
        """`(experts, capacity, dim)` in, the same out: all-to-all to the devices that
        hold the experts, each local expert's MLP on every device's tokens for it,
        all-to-all back."""
        n = shard_count(self.expert_axis)
        e, cap, dim = buffer.shape
        if n > 1:  # (e, cap, dim) -> (n * e_local, cap, dim), grouped by source device
            buffer = lax.all_to_all(buffer, self.expert_axis, 0, 0, tiled=True)
            buffer = buffer.reshape(n, e // n, cap, dim).swapaxes(0, 1).reshape(e // n, -1, dim)
        out = self._local_experts(buffer)
        if n > 1:
            out = out.reshape(e // n, n, cap, dim).swapaxes(0, 1).reshape(e, cap, dim)
            out = lax.all_to_all(out, self.expert_axis, 0, 0, tiled=True)
        return out

    @typechecked
    def __call__(
        self, x: Float[Array, "batch seq dim"], *, dropless: bool = False
    ) -> tuple[Array, MoEStats]:
        """**Arguments:**

        - `x`: `(batch, seq, dim)`, this device's tokens (replicated over the tensor
          axis).
        - `dropless`: give every expert room for all the group's tokens (capacity
          `tokens`), so nothing is dropped: for decoding, where the groups are a few
          tokens.

        **Returns:**

        `(y, stats)`: `y` shaped like `x` (a dropped assignment contributes nothing;
        a token with every assignment dropped gets zeros), and the `MoEStats`.
        """
        n = shard_count(self.expert_axis)
        if self.num_experts % n:
            raise ValueError(
                f"MoE: num_experts={self.num_experts} does not split {n} ways over "
                f"{self.expert_axis!r}; use a multiple of {n} experts."
            )
        with jax.named_scope("eqxpar.MoE"):
            tokens = x.reshape(-1, x.shape[-1])
            factor = self.num_experts / self.top_k if dropless else self.capacity_factor
            axes = _split_axes(x, self.data_axis, self.expert_axis)
            dispatch, combine, stats = self._route(tokens, factor, axes)
            if n > 1 and self.expert_axis not in axes:
                y = self._replicated(dispatch, combine, tokens)
            else:
                buffer = jnp.einsum("tec,td->ecd", dispatch, tokens)
                out = self._experts(buffer)
                y = jnp.einsum("tec,ecd->td", combine.astype(out.dtype), out)
            return y.reshape(x.shape).astype(x.dtype), stats

    def _replicated(self, dispatch: Array, combine: Array, tokens: Array) -> Array:
        """Tokens the same on every device of the expert axis (decoding a prompt held
        everywhere): each device runs its own experts on them and one all-reduce sums
        the experts' contributions, instead of the all-to-alls."""
        n = shard_count(self.expert_axis)
        local = self.num_experts // n
        first = shard_index(self.expert_axis) * local
        dispatch = lax.dynamic_slice_in_dim(dispatch, first, local, 1)
        combine = lax.dynamic_slice_in_dim(combine, first, local, 1)
        buffer = jnp.einsum("tec,td->ecd", dispatch, tokens)
        out = self._local_experts(buffer)
        y = jnp.einsum("tec,ecd->td", combine.astype(out.dtype), out)
        return lax.psum(y, self.expert_axis)
