"""Autoregressive generation with a KV cache, for `Transformer.generate`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray

from eqxpar.collectives import shard_count, shard_index
from eqxpar.nn import KVCache, vocab_parallel_argmax

if TYPE_CHECKING:
    from ._transformer import Transformer


def generate(
    model: Transformer,
    prompt: Int[Array, "batch prompt"],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    key: PRNGKeyArray | None = None,
) -> Int[Array, "batch total"]:
    """See `Transformer.generate`."""
    c = model.config
    if c.sequence_parallel:
        raise ValueError(
            "generate() decodes one token at a time, which sequence parallelism cannot "
            "split; call model.with_config(sequence_parallel=False).generate(...)."
        )
    total = prompt.shape[1] + max_new_tokens
    if total > c.max_seq_len:
        raise ValueError(f"generate: {total} tokens exceed max_seq_len={c.max_seq_len}.")
    if temperature > 0.0 and key is None:
        raise ValueError("generate: temperature > 0 needs a `key`.")
    model._check_not_pipelined("generate()")
    key = jax.random.key(0) if key is None else key
    model = model._cast()
    batch = prompt.shape[0]
    kv_local = c.kv_heads // shard_count(c.axis_name)
    cache = KVCache.empty(batch, total, kv_local, c.head_dim, jnp.dtype(c.compute_dtype))
    caches = jax.tree.map(lambda a: jnp.stack([a] * c.num_layers), cache)
    logits, caches = _decode(model, prompt, caches)
    start = prompt.shape[1]

    def emit(out: Array, logits: Array, i: Array) -> tuple[Array, Array]:
        token = _sample(model, logits, temperature, jax.random.fold_in(key, i))
        token = token[:, None].astype(prompt.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, token, start + i, 1), token

    out = jnp.concatenate([prompt, jnp.zeros((batch, max_new_tokens), prompt.dtype)], 1)
    if max_new_tokens == 0:
        return out
    out, token = emit(out, logits, jnp.zeros((), jnp.int32))

    def body(carry, i):
        out, token, caches = carry
        logits, caches = _decode(model, token, caches)
        out, token = emit(out, logits, i)
        return (out, token, caches), None

    steps = jnp.arange(1, max_new_tokens, dtype=jnp.int32)
    (out, _, _), _ = jax.lax.scan(body, (out, token, caches), steps)
    return out


def _decode(model: Transformer, tokens: Array, caches: KVCache) -> tuple[Array, KVCache]:
    """Runs `tokens` through every layer with the caches: the last position's logits."""
    (x, caches), _ = model.blocks(model.embed(tokens), cache=caches)
    return model._logits(model.norm(x[:, -1:]))[:, 0], caches


def _sample(model: Transformer, logits: Array, temperature: float, key: PRNGKeyArray) -> Array:
    """Greedy, or Gumbel-max sampling at `temperature` with noise drawn for the global
    vocabulary, so the result does not depend on how the vocabulary is split."""
    axis = model.config.axis_name
    logits = logits.astype(jnp.float32)
    if temperature > 0.0:
        width = logits.shape[-1]
        noise = jax.random.gumbel(key, (logits.shape[0], model.config.vocab_size))
        start = shard_index(axis) * width
        logits = logits / temperature + jax.lax.dynamic_slice_in_dim(noise, start, width, 1)
    return vocab_parallel_argmax(logits, axis_name=axis)
