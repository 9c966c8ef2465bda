"""Megatron's parallel self-attention: heads split over the tensor axis."""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._collectives import shard_count, shard_index
from .._shard_map import varying_axes
from .._typecheck import typechecked
from ._common import check_divisible
from ._context import (
    LAYOUTS,
    STRATEGIES,
    ContextStrategy,
    Layout,
    blockwise_attention,
    ring_attention,
    token_positions,
)
from ._dropout import indexed_dropout
from ._linear import CollectiveMatmul, ColumnParallelLinear, RowParallelLinear


class KVCache(eqx.Module):
    """Keys and values of the tokens seen so far, per device (its own KV heads).

    `k`, `v`: `(batch, max_len, kv_heads_shard, head_dim)`; `length`: how many
    positions are filled.
    """

    k: Array
    v: Array
    length: Array

    @classmethod
    def empty(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any) -> KVCache:
        """A cache of zeros for `kv_heads` (per-device) heads, `length = 0`."""
        zeros = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
        return cls(zeros, zeros, jnp.zeros((), jnp.int32))


def rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding (RoFormer) of `x: (b, s, ..., d)` at `positions: (s,)`.

    Rotates pairs `(x[..., i], x[..., i + d/2])` by `position * theta^(-2i/d)`,
    computed in float32.
    """
    d = x.shape[-1]
    freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angle = positions.astype(jnp.float32)[:, None] * freq[None, :]  # (s, d/2)
    angle = angle.reshape(1, angle.shape[0], *([1] * (x.ndim - 3)), d // 2)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class ParallelAttention(eqx.Module):
    """Causal multi-head (or grouped-query) self-attention with rotary positions.

    The fused QKV projection is column-parallel and the output projection
    row-parallel, so each device computes whole heads and one all-reduce (or, with
    sequence parallelism, one reduce-scatter) closes the block.

    QKV layout: the rows of `qkv.weight` are grouped by KV head: for each KV head `j`,
    its `num_heads / num_kv_heads` query heads, then its key, then its value, each
    `head_dim` rows. Splitting the rows over `t` devices gives each device whole groups
    (`num_kv_heads` must divide by `t`), whatever `t` is.
    """

    qkv: ColumnParallelLinear
    out: RowParallelLinear
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)
    context_parallel: ContextStrategy | None = eqx.field(static=True)
    context_axis: str = eqx.field(static=True)
    context_layout: Layout = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        use_bias: bool = False,
        rope_theta: float = 10000.0,
        dropout: float = 0.0,
        sequence_parallel: bool = False,
        collective_matmul: CollectiveMatmul = None,
        axis_name: str = "tensor",
        context_parallel: ContextStrategy | None = None,
        context_axis: str = "context",
        context_layout: Layout = "load_balanced",
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: model width.
        - `num_heads`: query heads.
        - `num_kv_heads`: key/value heads (grouped-query attention); default
          `num_heads`. Must divide `num_heads`.
        - `head_dim`: per-head size; default `dim // num_heads`. Must be even (RoPE).
        - `use_bias`: biases in the projections.
        - `rope_theta`: RoPE base.
        - `dropout`: attention-probability dropout rate.
        - `sequence_parallel`, `collective_matmul`, `axis_name`, `dtype`: passed to the
          projections.
        - `context_parallel`: `None`, or how attention crosses a sequence split over
          `context_axis` in `context_layout` (see `ring_attention`): `"ring"` or
          `"all_gather"`.
        - `key`: PRNG key.
        """
        kv = num_heads if num_kv_heads is None else num_kv_heads
        hd = dim // num_heads if head_dim is None else head_dim
        k1, k2 = jax.random.split(key)
        kw: dict[str, Any] = dict(
            use_bias=use_bias,
            sequence_parallel=sequence_parallel,
            collective_matmul=collective_matmul,
            axis_name=axis_name,
            dtype=dtype,
        )
        self.qkv = ColumnParallelLinear(dim, (num_heads + 2 * kv) * hd, **kw, key=k1)
        self.out = RowParallelLinear(num_heads * hd, dim, **kw, key=k2)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, kv, hd
        self.rope_theta, self.dropout, self.axis_name = rope_theta, dropout, axis_name
        self.context_parallel, self.context_axis = context_parallel, context_axis
        self.context_layout = context_layout

    def __check_init__(self):
        name = "ParallelAttention"
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{name}: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"{name}: head_dim={self.head_dim} must be even for RoPE.")
        check_divisible(name, "num_kv_heads", self.num_kv_heads, self.axis_name)
        if self.context_parallel not in (None, *STRATEGIES):
            raise ValueError(
                f"{name}: context_parallel={self.context_parallel!r}; use None or one of "
                f"{STRATEGIES}."
            )
        if self.context_layout not in LAYOUTS:
            raise ValueError(
                f"{name}: context_layout={self.context_layout!r}; use one of {LAYOUTS}."
            )
        if self.context_parallel is not None and self.dropout > 0.0:
            raise ValueError(
                f"{name}: attention dropout ({self.dropout}) is not supported with "
                f"context_parallel; set the attention dropout to 0."
            )

    @typechecked
    def __call__(
        self,
        x: Float[Array, "batch seq dim"],
        *,
        key: PRNGKeyArray | None = None,
        cache: KVCache | None = None,
    ) -> Any:
        """**Arguments:**

        - `x`: `(batch, seq, dim)`, replicated over the tensor axis (or, with sequence
          parallelism, `(batch, seq_shard, dim)`). With `context_parallel`, `seq` is
          this device's context shard, in the layout of `eqxpar.nn.context_order`.
        - `key`: PRNG key for attention dropout; `None` disables it.
        - `cache`: a `KVCache`: `x` holds the next `seq` tokens after `cache.length`.

        **Returns:**

        The output, shaped like `x`; with a `cache`, `(output, updated_cache)`.
        """
        with jax.named_scope("eqxpar.ParallelAttention"):
            parts = shard_count(self.axis_name)
            if self.num_kv_heads % parts:
                raise ValueError(
                    f"ParallelAttention: num_kv_heads={self.num_kv_heads} does not split "
                    f"{parts} ways over {self.axis_name!r}."
                )
            kv_local = self.num_kv_heads // parts
            group = self.num_heads // self.num_kv_heads
            h = self.qkv(x)
            b, s = h.shape[0], h.shape[1]
            h = h.reshape(b, s, kv_local, group + 2, self.head_dim)
            q, k, v = h[..., :group, :], h[..., group, :], h[..., group + 1, :]
            if cache is None:
                positions = self._positions(h)
            else:
                positions = cache.length + jnp.arange(s, dtype=jnp.int32)
            q = rotary(q, positions, self.rope_theta)
            k = rotary(k, positions, self.rope_theta)
            if cache is not None:
                start = cache.length
                k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), start, 1)
                v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), start, 1)
                cache = KVCache(k, v, start + s)
            if cache is not None or (key is not None and self.dropout > 0.0):
                key_positions = jnp.arange(k.shape[1], dtype=jnp.int32)
                out = self._attend(q, k, v, positions, key_positions, key, kv_local, group)
            else:
                out = self._attend_blocks(q, k, v)
            out = self.out(out.reshape(b, s, kv_local * group * self.head_dim))
            return out if cache is None else (out, cache)

    def _context_size(self) -> int:
        if self.context_parallel is None:
            return 1
        return shard_count(self.context_axis)

    def _positions(self, h: Array) -> Array:
        """Global positions of this device's tokens along `h`'s dim 1: its context
        shard's, in the context layout, when the sequence is split."""
        self._check_split(h)
        if self.context_parallel is None:
            return jnp.arange(h.shape[1], dtype=jnp.int32)
        return token_positions(
            h.shape[1], context_axis=self.context_axis, layout=self.context_layout
        )

    def _check_split(self, h: Array) -> None:
        """Where `shard_map` tracks varying values, the activations must vary over the
        context axis exactly when the config says the sequence is split over it."""
        axis, c = self.context_axis, shard_count(self.context_axis)
        if c == 1 or axis not in varying_axes(jax.lax.axis_index(axis)):
            return
        split = axis in varying_axes(h)
        if self.context_parallel is None and split:
            raise ValueError(
                f"ParallelAttention: the input varies over the {axis!r} axis (size {c}) but "
                f"context_parallel=None, so each device would attend only within its own "
                f"sequence shard. Set context_parallel='ring' (or 'all_gather') in the "
                f"config, or keep the sequence whole (in_specs without {axis!r})."
            )
        if self.context_parallel is not None and not split:
            raise ValueError(
                f"ParallelAttention: context_parallel={self.context_parallel!r} but the input "
                f"is the same on every device of the {axis!r} axis (size {c}): the sequence "
                f"is not split. Split tokens P('data', {axis!r}) (in context_order), or use "
                f"model.with_config(context_parallel=None)."
            )

    def _attend_blocks(self, q: Array, k: Array, v: Array) -> Array:
        """Attention without materialising the scores: over the context ring, with
        cuDNN's fused kernel on GPU (half precision), or blockwise."""
        b, s, kv_local, group, hd = q.shape
        q = q.reshape(b, s, kv_local * group, hd)
        if self._context_size() > 1:
            assert self.context_parallel is not None
            out = ring_attention(
                q,
                k,
                v,
                axis_name=self.context_axis,
                layout=self.context_layout,
                strategy=self.context_parallel,
            )
        elif use_cudnn(q):
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        else:
            out = blockwise_attention(q, k, v)
        return out.reshape(b, s, kv_local, group, hd)

    def _attend(self, q, k, v, q_pos, k_pos, key, kv_local, group):
        """Dense attention (the whole score matrix): for decoding with a KV cache and
        for attention dropout."""
        if self._context_size() > 1:
            raise ValueError(
                f"ParallelAttention: decoding with a KV cache (or attention dropout) with "
                f"the sequence split over {self.context_axis!r} is not supported; generate "
                f"with the sequence whole (model.with_config(context_parallel=None), "
                f"in_specs without {self.context_axis!r})."
            )
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
        causal = (k_pos[None, :] <= q_pos[:, None])[None, None, None]  # (1, 1, 1, s, t)
        scores = jnp.where(causal, scores * scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        if key is not None and self.dropout > 0.0:
            first = shard_index(self.axis_name) * kv_local * group
            heads = first + jnp.arange(kv_local * group)
            flat = probs.reshape(probs.shape[0], kv_local * group, *probs.shape[3:])
            flat = indexed_dropout(flat, self.dropout, key, index=heads, axis=1)
            probs = flat.reshape(probs.shape)
        return jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v)


def use_cudnn(q: Array) -> bool:
    """Whether attention takes cuDNN's fused kernel (`jax.nn.dot_product_attention`):
    on GPU, in half precision (what the kernel supports); elsewhere the blockwise
    kernel."""
    return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
