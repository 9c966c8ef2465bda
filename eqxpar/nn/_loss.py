"""Cross-entropy over logits split along the vocabulary, without gathering them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from .._collectives import axis_size, reduce_from_region, shard_count
from .._typecheck import typechecked
from ._embedding import vocab_range


@typechecked
def vocab_parallel_cross_entropy(
    logits: Float[Array, "*batch vocab_shard"],
    labels: Int[Array, "*batch"],
    *,
    axis_name: str = "tensor",
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    where: Bool[Array, "*batch"] | None = None,
) -> Float[Array, "*batch"]:
    """Softmax cross-entropy of integer labels, with the logits split over the vocab.

    Numerically stable (the max is subtracted first) and the full `(*batch, vocab)`
    logits never exist on one device: the max is all-reduced with `pmax`, and the
    sum of exponentials and the label's logit with all-reduces of `(*batch)` arrays.
    Computed in float32 whatever the logits' dtype. Outside `shard_map` it equals
    `optax.softmax_cross_entropy_with_integer_labels` (with smoothing, `optax`'s
    `softmax_cross_entropy` against `optax.smooth_labels`).

    **Arguments:**

    - `logits`: per-shard `(*batch, vocab_shard)`: this device's block of the
      vocabulary, e.g. from a `ColumnParallelLinear` head without `gather_output`.
    - `labels`: global ids `(*batch)` in `[0, vocab)`, replicated over `axis_name`.
    - `axis_name`: the mesh axis the vocabulary is split over.
    - `label_smoothing`: `eps` in `[0, 1)`: the target is `(1 - eps)` on the label plus
      `eps / vocab` everywhere.
    - `ignore_index`: a label value whose positions get loss 0 (and no gradient).
    - `where`: a boolean mask `(*batch)`; `False` positions get loss 0.

    **Returns:**

    The per-example loss `(*batch)` in float32, identical on every device. Average it
    over the unmasked positions yourself.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}; it must be in [0, 1).")
    with jax.named_scope("eqxpar.vocab_parallel_cross_entropy"):
        axis = axis_name
        logits = logits.astype(jnp.float32)
        vocab = logits.shape[-1] * shard_count(axis)
        local_max = lax.stop_gradient(jnp.max(logits, axis=-1))
        top = local_max if axis_size(axis) is None else lax.pmax(local_max, axis)
        z = logits - top[..., None]
        lse = jnp.log(reduce_from_region(jnp.sum(jnp.exp(z), axis=-1), axis))
        start, block = vocab_range(vocab, axis)
        local = labels - start
        mine = (local >= 0) & (local < block)
        picked = jnp.take_along_axis(z, jnp.where(mine, local, 0)[..., None], axis=-1)[..., 0]
        picked = reduce_from_region(jnp.where(mine, picked, 0.0), axis)
        loss = lse - picked
        if label_smoothing:
            mean_z = reduce_from_region(jnp.sum(z, axis=-1), axis) / vocab
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - mean_z)
        keep = jnp.ones(labels.shape, bool) if where is None else where
        if ignore_index is not None:
            keep = keep & (labels != ignore_index)
        return jnp.where(keep, loss, 0.0)


@typechecked
def vocab_parallel_argmax(
    logits: Float[Array, "*batch vocab_shard"], *, axis_name: str = "tensor"
) -> Int[Array, "*batch"]:
    """The global arg-max id of logits split over the vocabulary, without gathering them.

    Each device finds its best id and value; an all-gather of those `(t, *batch)`
    pairs picks the winner (the lowest id on ties, like `jnp.argmax`).

    **Arguments:**

    - `logits`: per-shard `(*batch, vocab_shard)`.
    - `axis_name`: the mesh axis the vocabulary is split over.

    **Returns:**

    Global ids `(*batch)`, identical on every device.
    """
    with jax.named_scope("eqxpar.vocab_parallel_argmax"):
        start, _ = vocab_range(logits.shape[-1] * shard_count(axis_name), axis_name)
        best = jnp.max(logits, axis=-1)
        ids = jnp.argmax(logits, axis=-1).astype(jnp.int32) + start
        if axis_size(axis_name) is None:
            return ids
        all_best = lax.all_gather(best, axis_name, to="invarying")  # (t, *batch)
        all_ids = lax.all_gather(ids, axis_name, to="invarying")
        winner = jnp.argmax(all_best, axis=0)
        return jnp.take_along_axis(all_ids, winner[None], axis=0)[0]
