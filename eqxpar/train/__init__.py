"""Training: the train state, the train step for DP / ZeRO-1 / ZeRO-2 / FSDP (with any
tensor parallelism), and memory reports."""

from ._checkpoint import Checkpointer as Checkpointer
from ._checkpoint import CheckpointError as CheckpointError
from ._fit import fit as fit
from ._fit import plot_losses as plot_losses
from ._fit import resume as resume
from ._memory import MemoryReport as MemoryReport
from ._memory import memory_report as memory_report
from ._state import TrainState as TrainState
from ._state import init_state as init_state
from ._state import state_spec_tree as state_spec_tree
from ._step import make_train_step as make_train_step
from ._strategy import LeafPlan as LeafPlan
from ._strategy import Strategy as Strategy
from ._strategy import plan as plan
