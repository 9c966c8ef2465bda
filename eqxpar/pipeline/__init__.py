"""Pipeline parallelism: schedules as data (tick tables) and one executor for any table."""

from ._executor import batch_pipeline_loss as batch_pipeline_loss
from ._executor import pipeline_loss as pipeline_loss
from ._plot import plot_schedule as plot_schedule
from ._schedule import AbstractSchedule as AbstractSchedule
from ._schedule import Action as Action
from ._schedule import GPipe as GPipe
from ._schedule import Interleaved1F1B as Interleaved1F1B
from ._schedule import OneFOneB as OneFOneB
from ._schedule import TickTable as TickTable
from ._schedule import ZeroBubbleH1 as ZeroBubbleH1
