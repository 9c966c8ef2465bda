"""The model zoo: thin compositions of eqxpar layers, nothing parallel of their own."""

from ._classifier import SimpleClassifier as SimpleClassifier
from ._classifier import TPClassifier as TPClassifier
