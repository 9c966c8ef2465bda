"""One scan over a stack of layers, with activation checkpointing (remat) policies."""

from __future__ import annotations

from typing import Any, Literal

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray

from .._collectives import COLLECTIVE_OUTPUT

Remat = Literal["none", "full", "selective", "offload"]
REMAT: tuple[str, ...] = ("none", "full", "selective", "offload")


def remat(fn: Any, policy: Remat) -> Any:
    """`fn` under `jax.checkpoint` with one of eqxpar's activation-checkpointing policies.

    **Arguments:**

    - `fn`: the function to checkpoint (e.g. one layer, or a scan body).
    - `policy`: `"none"` (return `fn` itself), `"full"` (save only the inputs, recompute
      everything), `"selective"` (save matmul outputs and collective outputs, named
      `eqxpar.collectives.COLLECTIVE_OUTPUT`; recompute attention scores and elementwise
      ops, as Korthikanti et al. do), `"offload"` (like selective, but saved matmul
      outputs go to pinned host memory; needs a platform that has it).

    **Returns:**

    The checkpointed function.
    """
    policies = jax.checkpoint_policies
    if policy not in REMAT:
        raise ValueError(f"remat={policy!r}; use one of {REMAT}.")
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    keep_collectives = policies.save_only_these_names(COLLECTIVE_OUTPUT)
    if policy == "selective":
        saved = policies.save_from_both_policies(
            policies.dots_with_no_batch_dims_saveable, keep_collectives
        )
        return jax.checkpoint(fn, policy=saved, prevent_cse=False)
    memories = {m.kind for m in jax.devices()[0].addressable_memories()}
    if "pinned_host" not in memories:
        raise ValueError(
            f"remat='offload' needs a device with pinned host memory; "
            f"{jax.devices()[0].platform} offers {sorted(memories)}. Use "
            f"remat='selective' instead."
        )
    offload = policies.offload_dot_with_no_batch_dims("device", "pinned_host")

    def offloading(*args: Any, **params: Any) -> Any:
        # Collective outputs stay on the device; matmul outputs go to the host.
        return True if keep_collectives(*args, **params) else offload(*args, **params)

    return jax.checkpoint(fn, policy=offloading, prevent_cse=False)


def apply_layer(layer: Any, x: jax.Array, key: PRNGKeyArray | None = None) -> Any:
    """`layer(x)`, or `layer(x, key=key)` when a key is given: how `scan_layers` and the
    pipeline executor (`eqxpar.pipeline.pipeline_loss`'s `layer_fn`) call one layer."""
    return layer(x) if key is None else layer(x, key=key)


def scan_layers(
    layers: Any,
    x: jax.Array,
    *,
    key: PRNGKeyArray | None = None,
    cache: Any = None,
    remat_policy: Remat = "none",
    with_aux: bool = False,
) -> Any:
    """Runs a stack of layers in order with one `jax.lax.scan`.

    The layers are one module whose arrays carry a leading layer dim (built with
    `eqx.filter_vmap`), so compile time does not grow with depth. Each layer is called
    as `layer(x)`, `layer(x, key=k)` with its own key, or `layer(x, key=k, cache=c)`
    returning `(x, c)` with its own slice of `cache`.

    **Arguments:**

    - `layers`: the stacked layers, leading dim `L` on every array.
    - `x`: the input to the first layer; each layer returns the same shape and dtype.
    - `key`: split into `L` keys, one per layer; `None` calls the layers without one.
    - `cache`: a pytree whose arrays have a leading dim `L` (e.g. stacked KV caches).
    - `remat_policy`: checkpoint each layer with `remat` (see there).
    - `with_aux`: each layer returns `(x, aux)` (e.g. an MoE layer's `MoEStats`).

    **Returns:**

    The last layer's output; with a `cache`, `(output, updated stacked cache)`; with
    `with_aux`, `(output, aux stacked over the layers)`.
    """
    if with_aux and cache is not None:
        raise ValueError("scan_layers: with_aux and cache cannot be combined.")
    dynamic, static = eqx.partition(layers, eqx.is_array)
    num = jax.tree.leaves(dynamic)[0].shape[0]
    keys = None if key is None else jax.random.split(key, num)

    def body(x: jax.Array, xs: tuple) -> tuple:
        layer, k, c = xs
        layer = eqx.combine(layer, static)
        if c is not None:
            return layer(x, **({} if k is None else {"key": k}), cache=c)
        return apply_layer(layer, x, k) if with_aux else (apply_layer(layer, x, k), None)

    x, ys = jax.lax.scan(remat(body, remat_policy), x, (dynamic, keys, cache))
    return x if ys is None else (x, ys)
