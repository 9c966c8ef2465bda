"""Inspecting compiled programs: collective counts and array shapes from HLO."""

from ._hlo import CollectiveReport as CollectiveReport
from ._hlo import array_shapes as array_shapes
from ._hlo import count_collectives as count_collectives
