"""eqxpar: Megatron-style parallel building blocks for JAX + Equinox."""

import sys
import types

from . import collectives as collectives
from . import distributed as distributed
from . import nn as nn
from . import profile as profile
from . import train as train
from ._mesh import AXIS_ORDER as AXIS_ORDER
from ._mesh import CONTEXT as CONTEXT
from ._mesh import DATA as DATA
from ._mesh import EXPERT as EXPERT
from ._mesh import PIPELINE as PIPELINE
from ._mesh import TENSOR as TENSOR
from ._mesh import make_mesh as make_mesh
from ._mesh import simulate_cpu_devices as simulate_cpu_devices
from ._shard_map import filter_shard_map as filter_shard_map
from ._sharding import Dims as Dims
from ._sharding import is_arraylike as is_arraylike
from ._sharding import partition_specs as partition_specs
from ._sharding import place as place
from ._sharding import shard as shard
from ._sharding import sharded as sharded
from ._sharding import sharded_init as sharded_init
from ._sharding import stacked as stacked
from ._typecheck import ShardShapeError as ShardShapeError
from ._typecheck import set_typecheck as set_typecheck
from ._typecheck import typecheck_enabled as typecheck_enabled

__version__ = "0.1.0"

from .profile._planner import plan as plan  # noqa: E402


class _Package(types.ModuleType):
    """`eqxpar`'s module type: keeps `eqxpar.plan` the function when `eqxpar.plan`
    the CLI module (`python -m eqxpar.plan`) is imported, which would otherwise bind
    the submodule over it."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "plan" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
