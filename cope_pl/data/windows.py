"""Fixed-length windows over a token array, as map-style Datasets of input_ids/labels.

Training samples random windows; item `index` always gives the same window (its start comes from a
generator seeded by (seed, index)), so shuffling, resuming and splitting across DDP ranks are the
sampler's job. Evaluation walks non-overlapping windows so every token after the first is scored once;
the last window is padded with IGNORE_INDEX labels where the tokens run out. `SlidingWindows` scores a stream
with overlapping windows (eval-context's --stride), each token once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from cope_pl.data.base import IGNORE_INDEX, shift_labels
from cope_pl.data.token_array import TokenArray


def _window(array: TokenArray, start: int, length: int) -> torch.Tensor:
    return torch.from_numpy(array.tokens[start : start + length].astype(np.int64))


class RandomWindows(Dataset):
    """`num_samples` windows of seq_len + 1 tokens at random starts (seq_len inputs, seq_len labels)."""

    def __init__(self, array: TokenArray, seq_len: int, num_samples: int, seed: int):
        if len(array) < seq_len + 1:
            raise ValueError(
                f"{array.path} has {len(array)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; "
                "lower data.seq_len or use more data"
            )
        self.array = array
        self.seq_len = seq_len
        self.num_samples = num_samples
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        start = int(rng.integers(0, len(self.array) - self.seq_len))  # last start leaves seq_len + 1 tokens
        return shift_labels(_window(self.array, start, self.seq_len + 1))


class EvalWindows(Dataset):
    """Non-overlapping windows: window k predicts tokens k*seq_len + 1 .. (k+1)*seq_len of the array."""

    def __init__(self, array: TokenArray, seq_len: int):
        if len(array) < 2:
            raise ValueError(f"{array.path} has {len(array)} tokens; an evaluation split needs at least 2")
        self.array = array
        self.seq_len = seq_len

    def __len__(self) -> int:
        return math.ceil((len(self.array) - 1) / self.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        tokens = _window(self.array, index * self.seq_len, self.seq_len + 1)  # shorter at the end
        item = shift_labels(tokens)
        pad = self.seq_len - len(item["labels"])
        if pad:  # inputs padded with token 0 after the end: causal attention never lets them reach real tokens
            item["input_ids"] = torch.cat([item["input_ids"], item["input_ids"].new_zeros(pad)])
            item["labels"] = torch.cat([item["labels"], item["labels"].new_full((pad,), IGNORE_INDEX)])
        return item


class SlidingWindows(Dataset):
    """Windows of seq_len tokens every `stride` tokens; each token is scored once, by the first window in
    which it is a target, so every scored token but the first seq_len - stride sees >= seq_len - stride
    tokens of context."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, stride: int):
        if not 1 <= stride <= seq_len:
            raise ValueError(f"--stride must be between 1 and the length ({seq_len}), got {stride}")
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"the token stream has {tokens.numel()} tokens, fewer than one window of {seq_len}")
        self.tokens, self.seq_len = tokens.long(), seq_len
        last = tokens.numel() - seq_len - 1
        self.starts = list(range(0, last + 1, stride))
        if self.starts[-1] != last:
            self.starts.append(last)  # a final window so the stream's tail is scored too

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.starts[index]
        window = self.tokens[start : start + self.seq_len + 1]  # (T + 1,)
        labels = window[1:].clone()
        if index > 0:  # targets up to the previous window's end were already scored
            seen = self.starts[index - 1] + self.seq_len - start
            labels[:seen] = IGNORE_INDEX
        return {"input_ids": window[:-1], "labels": labels}
