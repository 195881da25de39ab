"""Data modules: each gives the model a vocabulary size and batches of input_ids/labels."""

from cope_pl.data.base import IGNORE_INDEX, LMDataModule, shift_labels
from cope_pl.data.copy_task import CopyDataModule

__all__ = ["IGNORE_INDEX", "CopyDataModule", "LMDataModule", "shift_labels"]
