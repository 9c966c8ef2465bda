"""MLP classifiers: a data-parallel baseline and a tensor-parallel residual MLP."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

import eqxpar as ep
from eqxpar.collectives import axis_size, gather_from_region, scatter_to_region
from eqxpar.nn import ColumnParallelLinear, RowParallelLinear, apply_layer, scan_layers
from eqxpar.pipeline import AbstractSchedule, batch_pipeline_loss


class SimpleClassifier(eqx.Module):
    """A plain MLP, replicated on every device: the data-parallel baseline.

    Built from eqxpar linear layers with `axis_name=None` (not split), so it is the
    same model as `eqx.nn.MLP` and trains with the same code as the parallel models.
    """

    layers: list[ColumnParallelLinear]

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 64,
        depth: int = 2,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`: input size.
        - `num_classes`: number of classes (output logits).
        - `width`: hidden size.
        - `depth`: number of hidden layers.
        - `key`: PRNG key.
        """
        sizes = [in_features] + [width] * depth + [num_classes]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            ColumnParallelLinear(i, o, axis_name=None, key=k)  # type: ignore[arg-type]
            for i, o, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        ]

    def __call__(self, x: Float[Array, "batch in"]) -> Float[Array, "batch classes"]:
        """Logits `(batch, num_classes)` for inputs `(batch, in_features)`."""
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


class _Block(eqx.Module):
    norm: eqx.nn.LayerNorm
    up: ColumnParallelLinear
    down: RowParallelLinear

    def __init__(
        self,
        width: int,
        hidden: int,
        axis_name: str,
        *,
        sequence_parallel: bool = False,
        key: PRNGKeyArray,
    ):
        k1, k2 = jax.random.split(key)
        sp = sequence_parallel
        self.norm = eqx.nn.LayerNorm(width)
        self.up = ColumnParallelLinear(
            width, hidden, sequence_parallel=sp, axis_name=axis_name, key=k1
        )
        self.down = RowParallelLinear(
            hidden, width, sequence_parallel=sp, axis_name=axis_name, key=k2
        )

    def __call__(self, x: Array) -> Array:
        h = jax.vmap(self.norm)(x)
        return x + self.down(jax.nn.gelu(self.up(h)))


class TPClassifier(eqx.Module):
    """A residual MLP whose blocks are Megatron Column -> Row pairs.

    `x -> ColumnParallelLinear(gather) -> [x + Row(gelu(Column(LayerNorm(x))))] * depth
    -> RowParallelLinear(head)`. Each block costs one all-reduce over `axis_name`
    forward and one backward; the head splits its input features so any number of
    classes works. Trains with DP x TP: shard the batch over `"data"`.

    With `sequence_parallel=True` (Megatron's sequence parallelism, the rows playing
    the sequence) the residual stream between the embedding and the head is split by
    rows over `axis_name`, so the LayerNorms and residual adds run on `1/t` of the rows;
    each block's all-reduce becomes an all-gather before `up` and a reduce-scatter after
    `down`, the same bytes. The weights are the same either way; the rows per device
    must be a multiple of the tensor size.
    """

    embed: ColumnParallelLinear
    blocks: list[_Block]
    norm: eqx.nn.LayerNorm
    head: RowParallelLinear
    sequence_parallel: bool = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 64,
        hidden: int = 256,
        depth: int = 2,
        *,
        sequence_parallel: bool = False,
        axis_name: str = ep.TENSOR,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`: input size.
        - `num_classes`: number of classes.
        - `width`: residual stream size (split over `axis_name` only inside the
          embedding and head).
        - `hidden`: MLP hidden size, split over `axis_name`.
        - `depth`: number of residual blocks.
        - `sequence_parallel`: split the residual stream's rows over `axis_name`
          between the embedding and the head (see above).
        - `axis_name`: the tensor-parallel mesh axis.
        - `key`: PRNG key.
        """
        ke, kh, *kb = jax.random.split(key, depth + 2)
        self.embed = ColumnParallelLinear(
            in_features, width, gather_output=True, axis_name=axis_name, key=ke
        )
        self.blocks = [
            _Block(width, hidden, axis_name, sequence_parallel=sequence_parallel, key=k) for k in kb
        ]
        self.norm = eqx.nn.LayerNorm(width)
        self.head = RowParallelLinear(
            width, num_classes, input_is_parallel=False, axis_name=axis_name, key=kh
        )
        self.sequence_parallel, self.axis_name = sequence_parallel, axis_name

    def __call__(self, x: Float[Array, "batch in"]) -> Float[Array, "batch classes"]:
        """Logits `(batch, num_classes)`, identical on every device of a tensor group."""
        h = self.embed(x)
        if self.sequence_parallel:
            h = scatter_to_region(h, self.axis_name, dim=0)
        for block in self.blocks:
            h = block(h)
        h = jax.vmap(self.norm)(h)
        if self.sequence_parallel:
            h = gather_from_region(h, self.axis_name, dim=0)
        return self.head(h)


def accuracy(logits: Array, labels: Array) -> Array:
    """Fraction of rows whose arg-max logit is the label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


class PPClassifier(eqx.Module):
    """`TPClassifier`'s residual MLP, its blocks split into pipeline stages.

    The blocks are stacked as `(virtual, stages, blocks_per_chunk, ...)`, the stage
    dim split over the pipeline axis: chunk `v * stages + s` (Megatron's interleaved
    order) lives on stage `s`. The embedding runs on the first chunk's stage, the norm,
    head and loss on the last one's. Every block is also tensor-parallel, so it trains
    on data x tensor x pipeline meshes.
    """

    embed: ColumnParallelLinear
    blocks: _Block = eqx.field(metadata=ep.stacked(None, "pipeline_axis", None))
    norm: eqx.nn.LayerNorm
    head: RowParallelLinear
    stages: int = eqx.field(static=True)
    virtual: int = eqx.field(static=True)
    pipeline_axis: str = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 64,
        hidden: int = 256,
        depth: int = 4,
        *,
        stages: int,
        virtual: int = 1,
        axis_name: str = ep.TENSOR,
        pipeline_axis: str = ep.PIPELINE,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`, `num_classes`, `width`, `hidden`: as for `TPClassifier`.
        - `depth`: residual blocks in all; `stages * virtual` must divide it.
        - `stages`: pipeline stages (the pipeline axis size it runs on).
        - `virtual`: model chunks per stage (interleaved schedules).
        - `axis_name`, `pipeline_axis`: the tensor and pipeline mesh axes.
        - `key`: PRNG key.
        """
        chunks = stages * virtual
        if depth % chunks:
            raise ValueError(
                f"PPClassifier: depth={depth} blocks do not split into stages x virtual = "
                f"{stages} x {virtual} = {chunks} chunks; use a multiple of {chunks}."
            )
        ke, kh, kb = jax.random.split(key, 3)
        self.embed = ColumnParallelLinear(
            in_features, width, gather_output=True, axis_name=axis_name, key=ke
        )
        blocks = eqx.filter_vmap(lambda k: _Block(width, hidden, axis_name, key=k))(
            jax.random.split(kb, depth)
        )
        shape = (virtual, stages, depth // chunks)
        self.blocks = jax.tree.map(lambda a: a.reshape(*shape, *a.shape[1:]), blocks)
        self.norm = eqx.nn.LayerNorm(width)
        self.head = RowParallelLinear(
            width, num_classes, input_is_parallel=False, axis_name=axis_name, key=kh
        )
        self.stages, self.virtual, self.pipeline_axis = stages, virtual, pipeline_axis

    @staticmethod
    def _first(embed: ColumnParallelLinear, x: Array) -> Array:
        return embed(x)

    @staticmethod
    def _last_logits(last: tuple[eqx.nn.LayerNorm, RowParallelLinear], h: Array) -> Array:
        norm, head = last
        return head(jax.vmap(norm)(h))

    def __call__(self, x: Float[Array, "batch in"]) -> Float[Array, "batch classes"]:
        """Logits, running every chunk in order on this device (no pipeline)."""
        flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[3:]), self.blocks)
        h = scan_layers(flat, self._first(self.embed, x))
        return self._last_logits((self.norm, self.head), h)

    def loss(
        self,
        x: Float[Array, "batch in"],
        labels: Array,
        *,
        schedule: AbstractSchedule | None = None,
        microbatches: int = 1,
    ) -> Array:
        """Mean softmax cross-entropy over the batch.

        Inside `filter_shard_map` with the pipeline axis bound, runs `schedule` (an
        `eqxpar.pipeline` schedule; default `OneFOneB()`, or `Interleaved1F1B(virtual)`
        when `virtual > 1`) over `microbatches` equal slices of the batch; otherwise
        runs the layers in order.
        """
        if axis_size(self.pipeline_axis) is None:
            return _cross_entropy(self(x), labels)
        return batch_pipeline_loss(
            (self._first, apply_layer, _last_loss),
            (self.embed, self.blocks, (self.norm, self.head)),
            x,
            labels,
            stages=self.stages,
            virtual=self.virtual,
            microbatches=microbatches,
            schedule=schedule,
            axis_name=self.pipeline_axis,
        )


def _cross_entropy(logits: Array, labels: Array) -> Array:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _last_loss(last: tuple[eqx.nn.LayerNorm, RowParallelLinear], h: Array, labels: Array) -> Array:
    return _cross_entropy(PPClassifier._last_logits(last, h), labels)
