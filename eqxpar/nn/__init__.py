"""Parallel layers: tensor-parallel linear layers, embeddings, attention (ring attention
over a context axis), MLP, mixture of experts, norms, loss."""

from ._attention import KVCache as KVCache
from ._attention import ParallelAttention as ParallelAttention
from ._attention import rotary as rotary
from ._common import FSDPShard as FSDPShard
from ._common import local_param as local_param
from ._common import regather_in_backward as regather_in_backward
from ._context import ContextStrategy as ContextStrategy
from ._context import Layout as Layout
from ._context import attention_blocks as attention_blocks
from ._context import blockwise_attention as blockwise_attention
from ._context import context_order as context_order
from ._context import ring_attention as ring_attention
from ._context import token_positions as token_positions
from ._dropout import indexed_dropout as indexed_dropout
from ._embedding import ParallelEmbedding as ParallelEmbedding
from ._embedding import VocabParallelEmbedding as VocabParallelEmbedding
from ._linear import ColumnParallelLinear as ColumnParallelLinear
from ._linear import RowParallelLinear as RowParallelLinear
from ._linear import column_parallel_matmul as column_parallel_matmul
from ._loss import vocab_parallel_argmax as vocab_parallel_argmax
from ._loss import vocab_parallel_cross_entropy as vocab_parallel_cross_entropy
from ._mlp import ParallelMLP as ParallelMLP
from ._moe import MoE as MoE
from ._moe import MoEStats as MoEStats
from ._moe import capacity as capacity
from ._norm import LayerNorm as LayerNorm
from ._norm import RMSNorm as RMSNorm
from ._stack import REMAT as REMAT
from ._stack import Remat as Remat
from ._stack import apply_layer as apply_layer
from ._stack import remat as remat
from ._stack import scan_layers as scan_layers
