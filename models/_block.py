"""`TransformerBlock`: one pre-norm layer of the Transformer (attention, then MLP)."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from eqxpar.collectives import shard_index
from eqxpar.nn import KVCache, LayerNorm, ParallelAttention, ParallelMLP, RMSNorm, indexed_dropout

from ._config import TransformerConfig


def make_norm(config: TransformerConfig) -> RMSNorm | LayerNorm:
    kw: dict[str, Any] = dict(
        sequence_parallel=config.sequence_parallel,
        axis_name=config.axis_name,
        dtype=config.param_dtype,
    )
    if config.norm == "rmsnorm":
        return RMSNorm(config.dim, **kw)
    return LayerNorm(config.dim, use_bias=config.use_bias, **kw)


def _token_index(x: Array, sequence_parallel: bool, axis_name: str) -> Array:
    """Global positions of the tokens along `x`'s sequence dim (1) on this device."""
    s = x.shape[1]
    first = shard_index(axis_name) * s if sequence_parallel else 0
    return first + jnp.arange(s, dtype=jnp.int32)


class TransformerBlock(eqx.Module):
    """Pre-norm block: `x + drop(attn(norm(x)))`, then `x + drop(mlp(norm(x)))`."""

    attn_norm: RMSNorm | LayerNorm
    attn: ParallelAttention
    mlp_norm: RMSNorm | LayerNorm
    mlp: ParallelMLP
    dropout: float = eqx.field(static=True)
    sequence_parallel: bool = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        ka, km = jax.random.split(key)
        kw: dict[str, Any] = dict(
            use_bias=config.use_bias,
            sequence_parallel=config.sequence_parallel,
            collective_matmul=config.collective_matmul,
            axis_name=config.axis_name,
            dtype=config.param_dtype,
        )
        self.attn_norm = make_norm(config)
        self.attn = ParallelAttention(
            config.dim,
            config.num_heads,
            num_kv_heads=config.kv_heads,
            rope_theta=config.rope_theta,
            dropout=config.attention_dropout,
            **kw,
            key=ka,
        )
        self.mlp_norm = make_norm(config)
        self.mlp = ParallelMLP(
            config.dim, config.hidden, activation=config.activation, **kw, key=km
        )
        self.dropout = config.dropout
        self.sequence_parallel = config.sequence_parallel
        self.axis_name = config.axis_name

    def __call__(
        self, x: Array, key: PRNGKeyArray | None = None, cache: KVCache | None = None
    ) -> Any:
        """`x: (batch, seq, dim)` (a sequence block with SP); with a cache, also returns
        the updated cache."""
        keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
        index = _token_index(x, self.sequence_parallel, self.axis_name)
        h = self.attn(self.attn_norm(x), key=keys[0], cache=cache)
        if cache is not None:
            h, cache = h
        x = x + indexed_dropout(h, self.dropout, keys[1], index=index, axis=1)
        h = self.mlp(self.mlp_norm(x))
        x = x + indexed_dropout(h, self.dropout, keys[2], index=index, axis=1)
        return x if cache is None else (x, cache)
