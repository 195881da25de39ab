"""Data modules: each gives the model a vocabulary size and batches of input_ids/labels."""

from cope_pl.data.base import IGNORE_INDEX, LMDataModule, shift_labels
from cope_pl.data.code import CodeDataModule
from cope_pl.data.copy_task import CopyDataModule
from cope_pl.data.counting import CountingDataModule
from cope_pl.data.flipflop import FlipFlopDataModule
from cope_pl.data.passkey import PasskeyDataModule
from cope_pl.data.selective_copy import SelectiveCopyDataModule
from cope_pl.data.token_data import TokenArrayDataModule
from cope_pl.data.wikitext import WikiTextDataModule

__all__ = [
    "IGNORE_INDEX",
    "CodeDataModule",
    "CopyDataModule",
    "CountingDataModule",
    "FlipFlopDataModule",
    "LMDataModule",
    "PasskeyDataModule",
    "SelectiveCopyDataModule",
    "TokenArrayDataModule",
    "WikiTextDataModule",
    "shift_labels",
]
