"""Dropout whose mask does not depend on how the array is sharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray


def indexed_dropout(
    x: Array, rate: float, key: PRNGKeyArray | None, *, index: Array, axis: int
) -> Array:
    """Inverted dropout with one random stream per global index along `axis`.

    The mask of slice `i` along `axis` is drawn from `fold_in(key, index[i])`, so a
    device holding only some slices (some heads, or a block of the sequence) draws
    exactly the bits the dense computation draws for them: the result is the same on
    any mesh. Replicated slices get identical masks on every device, and different
    blocks get different masks — Megatron's two RNG streams, without a tracker.

    **Arguments:**

    - `x`: any array.
    - `rate`: probability of zeroing an element, in `[0, 1)`. `0` returns `x`.
    - `key`: PRNG key; `None` (inference) returns `x`.
    - `index`: `(x.shape[axis],)` integer global indices of the slices held here.
    - `axis`: the dim the indices run along.

    **Returns:**

    `x` with dropped elements zeroed and the rest scaled by `1 / (1 - rate)`.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate {rate} must be in [0, 1).")
    if key is None or rate == 0.0:
        return x
    moved = jnp.moveaxis(x, axis, 0)
    keep = jax.vmap(
        lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, moved.shape[1:])
    )(index)
    out = jnp.where(keep, moved / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
    return jnp.moveaxis(out, 0, axis)
