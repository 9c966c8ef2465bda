"""A Megatron-style decoder-only Transformer (GPT / Llama) built from eqxpar layers."""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

import eqxpar as ep
from eqxpar.collectives import axis_size, shard_count
from eqxpar.nn import (
    ColumnParallelLinear,
    LayerNorm,
    MoEStats,
    RMSNorm,
    VocabParallelEmbedding,
    apply_layer,
    remat,
    scan_layers,
    vocab_parallel_cross_entropy,
)
from eqxpar.pipeline import batch_pipeline_loss

from ._block import TransformerBlock, make_norm
from ._config import TransformerConfig
from ._generate import generate


class Transformer(eqx.Module):
    """A decoder-only Transformer with Megatron's tensor (and sequence) parallelism.

    Vocab-parallel embedding -> `num_layers` blocks (stacked on a leading dim and run
    with `jax.lax.scan`, so compile time does not grow with depth) -> final norm ->
    column-parallel head (or the embedding table, tied) -> vocab-parallel
    cross-entropy. Outside `shard_map` it is the plain dense model; inside
    `eqxpar.filter_shard_map` every layer works on its shard.

    Per layer, the forward pass issues two all-reduces over the tensor axis (after
    attention and after the MLP), four counting the backward pass; with sequence
    parallelism two all-gathers and two reduce-scatters instead.
    """

    embed: VocabParallelEmbedding
    layers: TransformerBlock | None = eqx.field(metadata=ep.stacked("layer_dims"))
    moe_layers: TransformerBlock | None = eqx.field(metadata=ep.stacked(None))
    norm: RMSNorm | LayerNorm
    head: ColumnParallelLinear | None
    config: TransformerConfig = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        """**Arguments:**

        - `config`: a `TransformerConfig`.
        - `key`: PRNG key.
        """
        ke, kl, kh = jax.random.split(key, 3)
        embed = VocabParallelEmbedding(
            config.vocab_size,
            config.dim,
            sequence_parallel=config.sequence_parallel,
            axis_name=config.axis_name,
            dtype=config.param_dtype,
            key=ke,
        )
        # GPT-2's N(0, 0.02) table: sensible logits when the head is tied.
        self.embed = eqx.tree_at(lambda e: e.weight, embed, 0.02 * embed.weight)
        moe, dense = config.moe_layers, config.num_layers - config.moe_layers
        keys = jax.random.split(kl, config.num_layers)
        self.layers = None
        if dense:
            layers = eqx.filter_vmap(lambda k: TransformerBlock(config, key=k))(keys[:dense])
            self.layers = _stack_as(layers, config)
        self.moe_layers = None
        if moe:
            self.moe_layers = eqx.filter_vmap(lambda k: TransformerBlock(config, moe=True, key=k))(
                keys[dense:]
            )
        self.norm = make_norm(config)
        self.head = (
            None
            if config.tie_embeddings
            else ColumnParallelLinear(
                config.dim,
                config.vocab_size,
                use_bias=False,
                sequence_parallel=config.sequence_parallel,
                collective_matmul=config.collective_matmul,
                axis_name=config.axis_name,
                dtype=config.param_dtype,
                key=kh,
            )
        )
        self.config = config

    @property
    def layer_dims(self) -> ep.Dims:
        return self.config.layer_dims

    def flat_layers(self) -> TransformerBlock:
        """The (dense) layers stacked `(num_layers, ...)` in order, whatever the pipeline
        layout. With MoE blocks, the dense blocks only (`blocks` runs them all)."""
        if self.layers is None:
            raise ValueError("flat_layers: every block of this model is an MoE block.")
        return jax.tree.map(lambda a: a.reshape(-1, *a.shape[len(self.layer_dims) :]), self.layers)

    def blocks(
        self, x: Array, *, key: PRNGKeyArray | None = None, cache: Any = None
    ) -> tuple[Any, MoEStats | None]:
        """Runs every block in order (one scan): `(x, None)` for a dense model,
        `(x, stats)` with the MoE blocks' `MoEStats` summed over them; with a `cache`
        (stacked `(num_layers, ...)` in layer order), `((x, cache), None)`."""
        c = self.config
        self._check_not_pipelined("running the layers in order")
        if self.moe_layers is None:
            out = scan_layers(self.flat_layers(), x, key=key, cache=cache, remat_policy=c.remat)
            return out, None
        group = _MoEGroup(self._grouped_dense(), self.moe_layers)
        if cache is not None:
            (x, grouped) = scan_layers(group, x, key=key, cache=_group(cache, c.moe_every))
            return (x, _ungroup(grouped)), None
        x, stats = scan_layers(group, x, key=key, remat_policy=c.remat, with_aux=True)
        return x, jax.tree.map(functools.partial(jnp.sum, axis=0), stats)

    def _grouped_dense(self) -> TransformerBlock | None:
        """The dense blocks as `(num_moe_layers, moe_every - 1, ...)`: the ones before
        each MoE block."""
        if self.layers is None:
            return None
        groups = self.config.moe_layers
        return jax.tree.map(lambda a: a.reshape(groups, -1, *a.shape[1:]), self.flat_layers())

    def _cast(self) -> Transformer:
        dtype = jnp.dtype(self.config.compute_dtype)
        if dtype == jnp.dtype(self.config.param_dtype):
            return self
        return jax.tree.map(lambda p: p.astype(dtype) if eqx.is_inexact_array(p) else p, self)

    def _logits(self, x: Array) -> Array:
        if self.head is not None:
            return self.head(x)
        return self.embed.attend(x, collective_matmul=self.config.collective_matmul)

    def __call__(
        self, tokens: Int[Array, "batch seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "batch seq vocab_shard"]:
        """**Arguments:**

        - `tokens`: `(batch, seq)` token ids, replicated over the tensor axis (with
          `context_parallel`, this device's context shard, in `context_order`).
        - `key`: PRNG key for dropout; `None` disables dropout.

        **Returns:**

        Per-shard logits `(batch, seq, vocab_size / t)` in the compute dtype.
        """
        return self._forward(tokens, key)[0]

    def _forward(self, tokens: Array, key: PRNGKeyArray | None) -> tuple[Array, Any]:
        """Logits and the MoE blocks' summed `MoEStats` (`None` without MoE)."""
        c = self.config
        length = tokens.shape[1] * (shard_count(c.context_axis) if c.context_parallel else 1)
        if length > c.max_seq_len:
            raise ValueError(
                f"Transformer: sequence length {length} exceeds max_seq_len={c.max_seq_len}."
            )
        model = self._cast()
        with jax.named_scope("models.Transformer"):
            x = model.embed(tokens)
            x, stats = model.blocks(x, key=key)
            return model._logits(model.norm(x)), stats

    def per_token_loss(
        self,
        tokens: Int[Array, "batch seq"],
        targets: Int[Array, "batch seq"],
        *,
        key: PRNGKeyArray | None = None,
        mask: Array | None = None,
    ) -> Float[Array, "batch seq"]:
        """Vocab-parallel cross-entropy of `targets` at each position, in float32.

        The full logits are never gathered. `mask` (`(batch, seq)` bool) zeroes
        positions. With `context_parallel`, the positions of this device's context
        shard (the train step averages the loss over `data` and `context`). Dropout
        masks depend on the token's global position and head, not on the batch row's
        global index: with the batch split over `"data"`, give each data
        shard its own `key` (`eqxpar.train.make_train_step` folds the data index in).
        With MoE blocks this is the cross-entropy alone: `loss` and `loss_and_metrics`
        add the auxiliary losses.
        """
        logits = self(tokens, key=key)
        return vocab_parallel_cross_entropy(
            logits, targets, axis_name=self.config.axis_name, where=mask
        )

    def loss_and_metrics(
        self,
        tokens: Int[Array, "batch seq"],
        targets: Int[Array, "batch seq"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """`(loss, metrics)`: the mean cross-entropy over this device's batch plus, with
        MoE blocks, their auxiliary losses (summed over the blocks); `metrics` then
        holds `moe_dropped_fraction` (mean over MoE blocks), `moe_load_balance_loss`
        and `moe_z_loss` (means over MoE blocks), else it is empty. A `loss_fn` for
        `eqxpar.train.make_train_step` can return it as it is."""
        logits, stats = self._forward(tokens, key)
        ce = vocab_parallel_cross_entropy(logits, targets, axis_name=self.config.axis_name)
        loss = jnp.mean(ce)
        if stats is None:
            return loss, {}
        n = self.config.moe_layers
        metrics = {
            "moe_dropped_fraction": stats.dropped_fraction / n,
            "moe_load_balance_loss": stats.load_balance_loss / n,
            "moe_z_loss": stats.z_loss / n,
        }
        return loss + stats.aux_loss, metrics

    def loss(
        self,
        tokens: Int[Array, "batch seq"],
        targets: Int[Array, "batch seq"],
        *,
        key: PRNGKeyArray | None = None,
        schedule: Any = None,
        microbatches: int = 1,
    ) -> Float[Array, ""]:
        """Mean next-token cross-entropy over this device's batch (plus, with MoE
        blocks, their auxiliary losses: see `loss_and_metrics`).

        With `pipeline_stages > 1`, inside `filter_shard_map` with the pipeline axis
        bound, the batch is split into `microbatches` and run through `schedule` (an
        `eqxpar.pipeline` schedule; default `OneFOneB()`, or `Interleaved1F1B` when
        `virtual_stages > 1`): the embedding on the first chunk's stage, the head and
        loss on the last one's. Microbatch `i` uses `fold_in(key, i)`, as gradient
        accumulation over the same microbatches does, so the dropout masks are those
        of the unpipelined model run microbatch by microbatch; `remat` checkpoints
        each layer there too.
        """
        c = self.config
        if c.chunks == 1 or axis_size(c.pipeline_axis) is None:
            return self.loss_and_metrics(tokens, targets, key=key)[0]
        model = self._cast()
        head = model.head if model.head is not None else _TiedHead(model.embed, c)
        return batch_pipeline_loss(
            (_embed, remat(apply_layer, c.remat), _last_loss),
            (model.embed, model.layers, (model.norm, head, c.axis_name)),
            tokens,
            targets,
            stages=c.pipeline_stages,
            virtual=c.virtual_stages,
            microbatches=microbatches,
            schedule=schedule,
            axis_name=c.pipeline_axis,
            key=key,
        )

    def _check_not_pipelined(self, what: str) -> None:
        c = self.config
        if c.chunks > 1 and axis_size(c.pipeline_axis) not in (None, 1):
            raise ValueError(
                f"{what} runs every layer on one device, but this model's layers are split "
                f"over the {c.pipeline_axis!r} axis here. Use Transformer.loss (pipelined), "
                f"or call it outside the pipeline axis (e.g. in_specs that keep the layers "
                f"whole), or on model.with_config(pipeline_stages=1, virtual_stages=1)."
            )

    def with_config(self, **changes: Any) -> Transformer:
        """The same weights under a config with some switches changed (e.g.
        `sequence_parallel=False` for generation, another `remat`, or another pipeline
        layout of the same layers).

        Only the fields in `models.SAME_WEIGHTS` may change; any other field (a size,
        the activation, `rope_theta`, ...) would reinterpret the weights as another
        model and raises a `ValueError` naming it.
        """
        config = self.config.replace(**changes)
        self.config.check_same_weights(config)
        skeleton = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
        leaves = jax.tree.leaves(self)
        want = jax.tree.leaves(skeleton)
        # Only the stacked layer layout may change (pipeline chunking): a reshape, since
        # chunk order is layer order.
        leaves = [x.reshape(w.shape) for x, w in zip(leaves, want, strict=True)]
        return jax.tree.unflatten(jax.tree.structure(skeleton), leaves)

    def generate(
        self,
        prompt: Int[Array, "batch prompt"],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        key: PRNGKeyArray | None = None,
    ) -> Int[Array, "batch total"]:
        """Continues `prompt` token by token with a KV cache.

        Greedy when `temperature == 0`, else samples from `softmax(logits / T)` with
        the Gumbel-max trick, drawing noise for the global vocabulary so the result
        is the same however the vocabulary and heads are split. Works inside
        `filter_shard_map` (each device keeps the cache of its own KV heads; no logits
        are gathered) and outside it. With the batch split over `"data"`, fold the data
        index into `key` (`jax.random.fold_in(key, jax.lax.axis_index("data"))`) so the
        data shards draw independent noise.

        **Arguments:**

        - `prompt`: `(batch, prompt_len)` token ids.
        - `max_new_tokens`: tokens to add; `prompt_len + max_new_tokens` must not
          exceed `max_seq_len`.
        - `temperature`: `0` for greedy decoding.
        - `key`: PRNG key, required when `temperature > 0`.

        **Returns:**

        `(batch, prompt_len + max_new_tokens)` token ids.
        """
        return generate(self, prompt, max_new_tokens, temperature=temperature, key=key)


def count_params(model: eqx.Module) -> int:
    """The number of array elements in `model` (global sizes)."""
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, ep.is_arraylike)))


def _stack_as(layers: TransformerBlock, config: TransformerConfig) -> TransformerBlock:
    """`(num_layers, ...)` -> `(virtual, stages, per_chunk, ...)` when pipelined."""
    if config.chunks == 1:
        return layers
    shape = (config.virtual_stages, config.pipeline_stages, config.num_layers // config.chunks)
    return jax.tree.map(lambda a: a.reshape(*shape, *a.shape[1:]), layers)


def _embed(embed: VocabParallelEmbedding, tokens: Array) -> Array:
    return embed(tokens)


def _last_loss(parts: tuple, x: Array, targets: Array) -> Array:
    """The final norm, the head and the mean cross-entropy of one microbatch."""
    norm, head, axis_name = parts
    logits = head(norm(x))
    return jnp.mean(vocab_parallel_cross_entropy(logits, targets, axis_name=axis_name))


class _TiedHead(eqx.Module):
    """The output head tied to the embedding table (for the last pipeline stage)."""

    embed: VocabParallelEmbedding
    collective_matmul: Any = eqx.field(static=True)

    def __init__(self, embed: VocabParallelEmbedding, config: TransformerConfig):
        self.embed = embed
        self.collective_matmul = config.collective_matmul

    def __call__(self, x: Array) -> Array:
        return self.embed.attend(x, collective_matmul=self.collective_matmul)


class _MoEGroup(eqx.Module):
    """`moe_every - 1` dense blocks (stacked, or `None`) then one MoE block: the unit
    the scan over layers repeats in a model with MoE blocks."""

    dense: TransformerBlock | None
    moe: TransformerBlock

    def __call__(self, x: Array, key: PRNGKeyArray | None = None, cache: Any = None) -> Any:
        kd, km = (None, None) if key is None else tuple(jax.random.split(key))
        dense_cache, moe_cache = (None, None) if cache is None else cache
        if self.dense is not None:
            x = scan_layers(self.dense, x, key=kd, cache=dense_cache)
            if cache is not None:
                x, dense_cache = x
        out = self.moe(x, km, moe_cache)
        if cache is None:
            return out  # (x, stats)
        x, moe_cache = out
        return x, (dense_cache, moe_cache)


def _group(cache: Any, every: int) -> Any:
    """Caches stacked `(num_layers, ...)` in layer order -> per group: the dense
    blocks' `(groups, every - 1, ...)` (or `None`) and the MoE block's `(groups, ...)`."""
    grouped = jax.tree.map(lambda a: a.reshape(-1, every, *a.shape[1:]), cache)
    dense = jax.tree.map(lambda a: a[:, :-1], grouped) if every > 1 else None
    return dense, jax.tree.map(lambda a: a[:, -1], grouped)


def _ungroup(grouped: Any) -> Any:
    dense, moe = grouped
    moe = jax.tree.map(lambda a: a[:, None], moe)
    if dense is not None:
        moe = jax.tree.map(lambda d, m: jnp.concatenate([d, m], 1), dense, moe)
    both = moe
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), both)
