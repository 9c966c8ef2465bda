"""`TransformerBlock`: one pre-norm layer of the Transformer (attention, then MLP)."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, PRNGKeyArray

from eqxpar.nn import (
    KVCache,
    LayerNorm,
    MoE,
    ParallelAttention,
    ParallelMLP,
    RMSNorm,
    indexed_dropout,
    token_positions,
)

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


class TransformerBlock(eqx.Module):
    """Pre-norm block: `x + drop(attn(norm(x)))`, then `x + drop(mlp(norm(x)))`; the
    MLP is a mixture of experts (`MoE`) in an MoE block."""

    attn_norm: RMSNorm | LayerNorm
    attn: ParallelAttention
    mlp_norm: RMSNorm | LayerNorm
    mlp: ParallelMLP | MoE
    dropout: float = eqx.field(static=True)
    config: TransformerConfig = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, moe: bool = False, key: PRNGKeyArray):
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
            context_parallel=config.context_parallel,
            context_axis=config.context_axis,
            context_layout=config.context_layout,
            **kw,
            key=ka,
        )
        self.mlp_norm = make_norm(config)
        self.mlp = (
            MoE(
                config.dim,
                config.hidden,
                config.num_experts,
                top_k=config.top_k,
                capacity_factor=config.capacity_factor,
                activation=config.activation,
                expert_axis=config.expert_axis,
                axis_name=config.axis_name,
                router_z_loss=config.router_z_loss,
                load_balance_loss=config.load_balance_loss,
                dtype=config.param_dtype,
                key=km,
            )
            if moe
            else ParallelMLP(config.dim, config.hidden, activation=config.activation, **kw, key=km)
        )
        self.dropout = config.dropout
        self.config = config

    def __call__(
        self, x: Array, key: PRNGKeyArray | None = None, cache: KVCache | None = None
    ) -> Any:
        """`x: (batch, seq, dim)` (a sequence block with SP, a context shard with context
        parallelism); with a cache, also returns the updated cache; an MoE block
        without a cache returns `(x, MoEStats)`. Dropout masks follow the tokens'
        global positions, so they do not depend on the mesh."""
        keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
        c = self.config
        index = token_positions(
            x.shape[1],
            context_axis=c.context_axis if c.context_parallel else None,
            layout=c.context_layout,
            sequence_axis=c.axis_name if c.sequence_parallel else None,
        )
        h = self.attn(self.attn_norm(x), key=keys[0], cache=cache)
        if cache is not None:
            h, cache = h
        x = x + indexed_dropout(h, self.dropout, keys[1], index=index, axis=1)
        stats = None
        if isinstance(self.mlp, MoE):  # decoding (a cache): a few tokens, drop none
            h, stats = self.mlp(self.mlp_norm(x), dropless=cache is not None)
        else:
            h = self.mlp(self.mlp_norm(x))
        x = x + indexed_dropout(h, self.dropout, keys[2], index=index, axis=1)
        if cache is not None:
            return x, cache
        return x if stats is None else (x, stats)
