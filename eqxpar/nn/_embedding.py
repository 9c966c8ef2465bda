"""Embeddings split over the vocabulary or over the embedding dim."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._collectives import (
    gather_from_region,
    reduce_from_region,
    reduce_scatter_to_sequence,
    shard_count,
    shard_index,
)
from .._sharding import sharded
from .._typecheck import typechecked
from ._common import check_divisible, default_float, local_param, regather_in_backward, tp_block
from ._linear import CollectiveMatmul, column_parallel_matmul


def vocab_range(size: int, axis: Any) -> tuple[jax.Array | int, int]:
    """`(start, block)`: the first id and the number of ids this device holds."""
    block = size // shard_count(axis)
    return shard_index(axis) * block, block


class VocabParallelEmbedding(eqx.Module):
    """An embedding table split over the vocabulary (its rows), as in Megatron-LM.

    Each device looks up the ids that fall in its own range of the vocabulary, writes
    zeros for the rest, and one all-reduce sums the blocks. With
    `sequence_parallel=True` that all-reduce is a reduce-scatter along the sequence
    dim (-1 of the ids), leaving each device its sequence block.

    Outside `shard_map` it is `eqx.nn.Embedding` applied to every id, and the same key
    gives the same table. Ids outside `[0, num_embeddings)` embed to zeros.
    """

    weight: Float[Array, "num_embeddings embedding_dim"] = eqx.field(
        metadata=sharded("axis_name", None, gathers_on_use=True)
    )
    num_embeddings: int = eqx.field(static=True)
    embedding_dim: int = eqx.field(static=True)
    sequence_parallel: bool = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        sequence_parallel: bool = False,
        axis_name: str = "tensor",
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_embeddings`: global vocabulary size; split over `axis_name`.
        - `embedding_dim`: size of each embedding vector.
        - `sequence_parallel`: reduce-scatter the output along the sequence instead of
          all-reducing it.
        - `axis_name`: the mesh axis to split over.
        - `dtype`: table dtype (default f32).
        - `key`: PRNG key; the table is `N(0, 1)` like `eqx.nn.Embedding`.
        """
        dtype = default_float(dtype)
        self.weight = jax.random.normal(key, (num_embeddings, embedding_dim), dtype)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.sequence_parallel = sequence_parallel
        self.axis_name = axis_name

    def __check_init__(self):
        name = "VocabParallelEmbedding"
        check_divisible(name, "num_embeddings", self.num_embeddings, self.axis_name)

    @typechecked
    def __call__(self, ids: Int[Array, "*batch"]) -> Float[Array, "... embedding_dim"]:
        """**Arguments:**

        - `ids`: integer token ids `(*batch)`, global, replicated over `axis_name`.

        **Returns:**

        `(*batch, embedding_dim)`, identical on every device (all-reduce); with
        `sequence_parallel`, `(*batch_but_last, seq_shard, embedding_dim)`.
        """
        name = "VocabParallelEmbedding"
        with jax.named_scope(f"eqxpar.{name}"):
            axis = self.axis_name
            weight = self._table()
            start, block = vocab_range(self.num_embeddings, axis)
            local = ids - start
            mine = (local >= 0) & (local < block)
            rows = jnp.take(weight, jnp.where(mine, local, 0), axis=0)
            rows = jnp.where(mine[..., None], rows, jnp.zeros((), rows.dtype))
            if self.sequence_parallel:
                if ids.ndim < 1 or ids.shape[-1] % shard_count(axis):
                    raise ValueError(
                        f"{name}: with sequence_parallel the ids' last dim (the sequence) "
                        f"must split {shard_count(axis)} ways; got shape {ids.shape}."
                    )
                return reduce_scatter_to_sequence(rows, axis, dim=-2)
            return reduce_from_region(rows, axis)

    def _table(self) -> Array:
        block = (tp_block(self.num_embeddings, self.axis_name), self.embedding_dim)
        return local_param("VocabParallelEmbedding", "weight", self.weight, block)

    @typechecked
    def attend(
        self, x: Float[Array, "*batch embedding_dim"], *, collective_matmul: CollectiveMatmul = None
    ) -> Float[Array, "... vocab_shard"]:
        """Logits against the table, `x @ weight.T`: a language-model head tied to the
        embedding. Column-parallel over the vocabulary, like `ColumnParallelLinear`.

        **Arguments:**

        - `x`: `(*batch, embedding_dim)` replicated over `axis_name`; with
          `sequence_parallel`, `(*batch, seq_shard, embedding_dim)` (all-gathered first).
        - `collective_matmul`: overlap that all-gather with the matmul.

        **Returns:**

        Per-shard logits `(*batch, num_embeddings / t)`.
        """
        with jax.named_scope("eqxpar.VocabParallelEmbedding.attend"):
            block = (tp_block(self.num_embeddings, self.axis_name), self.embedding_dim)
            return regather_in_backward(
                lambda w, x: column_parallel_matmul(
                    x,
                    local_param("VocabParallelEmbedding", "weight", w, block),
                    axis_name=self.axis_name,
                    sequence_parallel=self.sequence_parallel,
                    collective_matmul=collective_matmul,
                ),
                self.weight,
                x,
            )


class ParallelEmbedding(eqx.Module):
    """An embedding table split over the embedding dim (its columns).

    Each device looks up its block of every vector; one all-gather along the last dim
    assembles them (backward: each device keeps its block of the gradient).

    Outside `shard_map` it is `eqx.nn.Embedding` applied to every id.
    """

    weight: Float[Array, "num_embeddings embedding_dim"] = eqx.field(
        metadata=sharded(None, "axis_name", gathers_on_use=True)
    )
    num_embeddings: int = eqx.field(static=True)
    embedding_dim: int = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        axis_name: str = "tensor",
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_embeddings`: vocabulary size.
        - `embedding_dim`: global size of each vector; split over `axis_name`.
        - `axis_name`: the mesh axis to split over.
        - `dtype`: table dtype (default f32).
        - `key`: PRNG key; the table is `N(0, 1)` like `eqx.nn.Embedding`.
        """
        dtype = default_float(dtype)
        self.weight = jax.random.normal(key, (num_embeddings, embedding_dim), dtype)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.axis_name = axis_name

    def __check_init__(self):
        check_divisible("ParallelEmbedding", "embedding_dim", self.embedding_dim, self.axis_name)

    @typechecked
    def __call__(self, ids: Int[Array, "*batch"]) -> Float[Array, "*batch embedding_dim"]:
        """**Arguments:**

        - `ids`: integer token ids `(*batch)`, replicated over `axis_name`.

        **Returns:**

        `(*batch, embedding_dim)`, identical on every device (all-gather).
        """
        name = "ParallelEmbedding"
        with jax.named_scope(f"eqxpar.{name}"):
            axis = self.axis_name
            block = (self.num_embeddings, tp_block(self.embedding_dim, axis))
            weight = local_param(name, "weight", self.weight, block)
            return gather_from_region(jnp.take(weight, ids, axis=0), axis)
