"""cope_pl: train and compare position encodings (CoPE and friends) for Transformer LMs with Lightning."""

from cope_pl.lm import LanguageModel
from cope_pl.model import TransformerLM

__version__ = "0.1.0"
__all__ = ["LanguageModel", "TransformerLM"]
