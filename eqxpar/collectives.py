"""Public access to Megatron's region mappings and the collective matmuls."""

from ._collectives import COLLECTIVE_OUTPUT as COLLECTIVE_OUTPUT
from ._collectives import all_gather_matmul as all_gather_matmul
from ._collectives import axis_size as axis_size
from ._collectives import copy_to_region as copy_to_region
from ._collectives import gather_from_region as gather_from_region
from ._collectives import gather_from_sequence as gather_from_sequence
from ._collectives import matmul_reduce_scatter as matmul_reduce_scatter
from ._collectives import reduce_from_region as reduce_from_region
from ._collectives import reduce_scatter_to_sequence as reduce_scatter_to_sequence
from ._collectives import scatter_to_region as scatter_to_region
from ._collectives import shard_count as shard_count
from ._collectives import shard_index as shard_index
from ._collectives import to_varying as to_varying
from ._shard_map import varying_axes as varying_axes
