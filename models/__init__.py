"""The model zoo: thin compositions of eqxpar layers, nothing parallel of their own."""

from ._block import TransformerBlock as TransformerBlock
from ._classifier import PPClassifier as PPClassifier
from ._classifier import SimpleClassifier as SimpleClassifier
from ._classifier import TPClassifier as TPClassifier
from ._config import SAME_WEIGHTS as SAME_WEIGHTS
from ._config import TransformerConfig as TransformerConfig
from ._config import flops_per_token as flops_per_token
from ._config import param_count as param_count
from ._transformer import Transformer as Transformer
from ._transformer import count_params as count_params
