"""A tiny built-in task that needs no files: repeat a random token string.

Each sequence is `prefix SEP prefix`; only the copy after SEP is scored, so the loss can only fall by
using positions. Sequences are generated from (seed, split, index), so any sample can be recreated.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cope_pl.data.base import LMDataModule, shift_labels
from cope_pl.seeding import generator


class CopySequences(Dataset):
    def __init__(self, num_sequences: int, prefix_len: int, num_symbols: int, seed: int):
        self.num_sequences = num_sequences
        self.prefix_len = prefix_len
        self.num_symbols = num_symbols
        self.seed = seed

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = generator(self.seed, index)
        prefix = torch.randint(1, self.num_symbols + 1, (self.prefix_len,), generator=g)  # 0 is SEP
        tokens = torch.cat([prefix, torch.zeros(1, dtype=torch.long), prefix])  # (2L + 1,)
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[self.prefix_len + 1 :] = True
        return shift_labels(tokens, scored)


class CopyDataModule(LMDataModule):
    """Copy task; seq_len = 2 * prefix_len, so a seq_len of 64 copies 32 tokens."""

    def __init__(
        self,
        seq_len: int = 64,
        batch_size: int = 32,
        num_symbols: int = 16,
        train_size: int = 20_000,
        eval_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        eval_seed: int = 0,
    ):
        super().__init__(
            seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, seed=seed, eval_seed=eval_seed
        )
        if seq_len < 2 or seq_len % 2:
            raise ValueError(f"data.seq_len must be an even number >= 2 for the copy task, got {seq_len}")
        self.num_symbols = num_symbols
        self.train_size = train_size
        self.eval_size = eval_size

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 1

    def setup(self, stage: str | None = None) -> None:
        prefix = self.seq_len // 2
        # Distinct seeds per split keep the splits apart: 3 * seed train, 3 * eval_seed + 1 evaluation.
        self.train_set = CopySequences(self.train_size, prefix, self.num_symbols, seed=3 * self.seed)
        self.eval_sets = {"": CopySequences(self.eval_size, prefix, self.num_symbols, seed=3 * self.eval_seed + 1)}
