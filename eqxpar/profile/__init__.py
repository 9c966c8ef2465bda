"""Inspecting compiled programs and planning layouts: collective counts from HLO,
communication and memory reports beside the analytic model, and the planner."""

from ._check import abstract_state as abstract_state
from ._check import check_layout as check_layout
from ._cost import Hardware as Hardware
from ._cost import Layout as Layout
from ._cost import MemoryEstimate as MemoryEstimate
from ._cost import communication_theory as communication_theory
from ._cost import estimate_memory as estimate_memory
from ._cost import step_times as step_times
from ._cost import train_flops as train_flops
from ._hlo import CollectiveReport as CollectiveReport
from ._hlo import array_shapes as array_shapes
from ._hlo import count_collectives as count_collectives
from ._maps import mesh_table as mesh_table
from ._maps import partition_table as partition_table
from ._maps import plot_mesh as plot_mesh
from ._maps import plot_partition as plot_partition
from ._planner import Candidate as Candidate
from ._planner import Plan as Plan
from ._planner import plan as plan
from ._report import CommRow as CommRow
from ._report import CommunicationReport as CommunicationReport
from ._report import StepMemoryReport as StepMemoryReport
from ._report import communication_report as communication_report
from ._report import layout_of as layout_of
from ._report import step_memory_report as step_memory_report
