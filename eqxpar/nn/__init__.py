"""Parallel layers: tensor-parallel linear layers, embeddings and the vocab-parallel loss."""

from ._embedding import ParallelEmbedding as ParallelEmbedding
from ._embedding import VocabParallelEmbedding as VocabParallelEmbedding
from ._linear import ColumnParallelLinear as ColumnParallelLinear
from ._linear import RowParallelLinear as RowParallelLinear
from ._loss import vocab_parallel_cross_entropy as vocab_parallel_cross_entropy
