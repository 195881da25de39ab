"""Selective Copy (Gu & Dao 2023, Mamba; CoPE paper Table 2).

`num_tokens` data tokens are scattered at random positions among `num_blanks` blank tokens; a separator
follows, and the model must output the data tokens in order. Only the answer after the separator is scored,
so the model has to count data tokens while skipping blanks. The in-distribution set has the training number
of blanks; the out-of-distribution sets have fewer (dense) or more (sparse) blanks, hence other lengths.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cope_pl.data.base import LMDataModule, shift_labels
from cope_pl.seeding import generator

BLANK, SEP = 0, 1
FIRST_SYMBOL = 2  # data symbols are 2 .. num_symbols + 1


def selective_copy_tokens(num_tokens: int, num_blanks: int, num_symbols: int, g: torch.Generator) -> torch.Tensor:
    """region (data tokens among blanks), SEP, the data tokens in order: (2 * num_tokens + num_blanks + 1,)."""
    region = torch.full((num_tokens + num_blanks,), BLANK)
    places = torch.randperm(num_tokens + num_blanks, generator=g)[:num_tokens].sort().values  # (N,)
    data = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + num_symbols, (num_tokens,), generator=g)  # (N,)
    region[places] = data
    return torch.cat([region, torch.tensor([SEP]), data])


class SelectiveCopySequences(Dataset):
    def __init__(self, num_sequences: int, num_tokens: int, num_blanks: int, num_symbols: int, seed: int):
        self.num_sequences = num_sequences
        self.num_tokens = num_tokens
        self.num_blanks = num_blanks
        self.num_symbols = num_symbols
        self.seed = seed

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = generator(self.seed, index)
        tokens = selective_copy_tokens(self.num_tokens, self.num_blanks, self.num_symbols, g)
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[-self.num_tokens :] = True
        return shift_labels(tokens, scored)


class SelectiveCopyDataModule(LMDataModule):
    """Selective copy; sequences have 2 * num_tokens + blanks input tokens (the sets differ in length).

    Args:
        num_tokens: data tokens to copy per sequence (16 in Mamba).
        num_symbols: size of the data vocabulary (16 in Mamba); blank and separator come on top.
        num_blanks, dense_blanks, sparse_blanks: blanks in training/in-distribution, ood_dense and ood_sparse.
        train_size: sequences per training epoch (generated on the fly).
    """

    def __init__(
        self,
        batch_size: int = 32,
        num_tokens: int = 16,
        num_symbols: int = 16,
        num_blanks: int = 256,
        dense_blanks: int = 128,
        sparse_blanks: int = 512,
        train_size: int = 1_000_000,
        eval_size: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        eval_seed: int = 0,
    ):
        seq_len = 2 * num_tokens + max(num_blanks, dense_blanks, sparse_blanks)  # the longest set's input length
        super().__init__(
            seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, seed=seed, eval_seed=eval_seed
        )
        if num_tokens < 1 or num_symbols < 1 or min(num_blanks, dense_blanks, sparse_blanks) < 0:
            raise ValueError(
                "data.num_tokens and data.num_symbols must be >= 1 and the blank counts >= 0, got "
                f"{num_tokens}, {num_symbols}, {(num_blanks, dense_blanks, sparse_blanks)}"
            )
        self.num_tokens = num_tokens
        self.num_symbols = num_symbols
        self.num_blanks = num_blanks
        self.eval_blanks = {"in_dist": num_blanks, "ood_dense": dense_blanks, "ood_sparse": sparse_blanks}
        self.train_size = train_size
        self.eval_size = eval_size

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.num_symbols

    def setup(self, stage: str | None = None) -> None:
        # Seeds per split: 8 * seed train; 8 * eval_seed + 1-3 validation, + 4-6 test.
        first_eval = 8 * self.eval_seed + (4 if stage == "test" else 1)
        args = (self.num_tokens, self.num_blanks, self.num_symbols)
        self.train_set = SelectiveCopySequences(self.train_size, *args, seed=8 * self.seed)
        self.eval_sets = {
            name: SelectiveCopySequences(self.eval_size, self.num_tokens, blanks, self.num_symbols, seed=first_eval + i)
            for i, (name, blanks) in enumerate(self.eval_blanks.items())
        }
