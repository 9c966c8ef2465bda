"""The model zoo: thin compositions of eqxpar layers, nothing parallel of their own."""

from ._classifier import PPClassifier as PPClassifier
from ._classifier import SimpleClassifier as SimpleClassifier
from ._classifier import TPClassifier as TPClassifier
from ._transformer import Transformer as Transformer
from ._transformer import TransformerBlock as TransformerBlock
from ._transformer import TransformerConfig as TransformerConfig
from ._transformer import count_params as count_params
from ._transformer import flops_per_token as flops_per_token
from ._transformer import param_count as param_count
