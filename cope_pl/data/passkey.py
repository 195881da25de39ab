"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): find a key hidden in filler text.

A sequence is BOS, filler, the needle `KEY d1 .. dk` at a chosen depth of the filler, more filler, then the
question `QUERY` followed by the key's digits. Only the k answer digits are scored, so the loss can only fall
by finding the needle and copying it; a model that reads the needle at any distance retrieves the key at any
length. Depth is the fraction of the filler placed before the needle: 0 puts it right after BOS, 1 right
before the question. Training draws the depth uniformly from [0, 1]; each evaluation set has one depth
(`depth000`, `depth025`, ... for depths 0, 0.25, ...).

Filler is either `sentences` (the classic passkey filler "the grass is green . the sky is blue . the sun is
yellow . here we go . there and back again ." repeated, from a random point of the cycle) or `random`
(tokens drawn uniformly from `filler_vocab` filler words).

The model reads seq_len tokens: BOS + filler + needle (k + 1) + QUERY + the first k - 1 answer digits as
inputs, the k digits as the scored labels. Sequences are generated from (seed, split, index); item j of a
split has the same key at every depth and length (only the filler and the needle's place change), so
accuracies at different depths and lengths compare the same keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from cope_pl.data.base import LMDataModule, shift_labels
from cope_pl.seeding import generator

NUM_DIGITS = 10  # key digits 0..9 are token ids 0..9
BOS, KEY, QUERY = 10, 11, 12
FIRST_FILLER = 13  # filler word w has token id FIRST_FILLER + w
SENTENCES = "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again ."
SENTENCE_WORDS = list(dict.fromkeys(SENTENCES.split()))  # 16 distinct words
SENTENCE_IDS = torch.tensor([FIRST_FILLER + SENTENCE_WORDS.index(w) for w in SENTENCES.split()])  # one cycle
FILLERS = ("sentences", "random")
EVAL_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
FIXED_TOKENS = 3  # BOS, KEY and QUERY


def depth_name(depth: float) -> str:
    """0.25 -> 'depth025', 0.125 -> 'depth012_5': the evaluation set's name, in percent, padded so that names
    sort by depth."""
    whole, _, fraction = f"{100 * depth:g}".partition(".")
    return f"depth{int(whole):03d}" + (f"_{fraction}" if fraction else "")


def filler_length(seq_len: int, key_len: int) -> int:
    """Filler tokens in a sequence whose model input is seq_len tokens: seq_len + 1 - BOS, KEY, QUERY, 2 keys."""
    return seq_len + 1 - FIXED_TOKENS - 2 * key_len


def needle_start(seq_len: int, key_len: int, depth: float) -> int:
    """Index of the KEY token in the input (after BOS and round(depth * filler) filler tokens)."""
    return 1 + round(depth * filler_length(seq_len, key_len))


def passkey_tokens(
    seq_len: int, key_len: int, depth: float | None, filler: str, filler_vocab: int, g: torch.Generator
) -> torch.Tensor:
    """One sequence of seq_len + 1 tokens: BOS, filler, KEY key, filler, QUERY key. depth None draws it."""
    key = torch.randint(0, NUM_DIGITS, (key_len,), generator=g)  # (K,) first, so it is the same at any length
    drawn = torch.rand((), generator=g).item()
    depth = drawn if depth is None else depth
    total = filler_length(seq_len, key_len)
    if filler == "sentences":
        offset = int(torch.randint(0, len(SENTENCE_IDS), (), generator=g))
        cycles = -(-(offset + total) // len(SENTENCE_IDS))
        text = SENTENCE_IDS.repeat(cycles)[offset : offset + total]  # (F,)
    else:
        text = torch.randint(FIRST_FILLER, FIRST_FILLER + filler_vocab, (total,), generator=g)  # (F,)
    before = round(depth * total)
    parts = [torch.tensor([BOS]), text[:before], torch.tensor([KEY]), key, text[before:], torch.tensor([QUERY]), key]
    return torch.cat(parts)  # (T + 1,)


class PasskeySequences(Dataset):
    """`num_sequences` passkey sequences at one depth (None: a uniform depth per sequence)."""

    def __init__(
        self,
        num_sequences: int,
        seq_len: int,
        key_len: int,
        depth: float | None,
        filler: str,
        filler_vocab: int,
        seed: int,
    ):
        self.num_sequences = num_sequences
        self.seq_len = seq_len
        self.key_len = key_len
        self.depth = depth
        self.filler = filler
        self.filler_vocab = filler_vocab
        self.seed = seed

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = generator(self.seed, index)
        tokens = passkey_tokens(self.seq_len, self.key_len, self.depth, self.filler, self.filler_vocab, g)
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[-self.key_len :] = True  # the answer digits after QUERY, nothing else
        return shift_labels(tokens, scored)


class PasskeyDataModule(LMDataModule):
    """Passkey retrieval: train at depths drawn uniformly, evaluate one set per depth in `depths`.

    Args:
        seq_len: tokens the model reads per sequence (filler fills what BOS, needle and question leave).
        key_len: digits of the key (5 in the usual probe); only these are scored.
        depths: evaluation depths, fractions of the filler before the needle (default 0, .25, .5, .75, 1).
        filler: `sentences` (the classic repeated sentences) or `random` (uniform filler words).
        filler_vocab: number of filler words for `random` filler (`sentences` uses its own 16 words).
        train_size: sequences per training epoch (generated on the fly).
        eval_size: sequences per evaluation depth.
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 32,
        key_len: int = 5,
        depths: Sequence[float] | None = None,
        filler: str = "sentences",
        filler_vocab: int = 16,
        train_size: int = 1_000_000,
        eval_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        eval_seed: int = 0,
    ):
        super().__init__(
            seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, seed=seed, eval_seed=eval_seed
        )
        if key_len < 1:
            raise ValueError(f"data.key_len must be >= 1, got {key_len}")
        if filler_length(seq_len, key_len) < 0:
            raise ValueError(
                f"data.seq_len={seq_len} is too short for a passkey of data.key_len={key_len} digits: "
                f"BOS, needle, question and answer need seq_len >= {2 * key_len + FIXED_TOKENS - 1}; "
                "raise data.seq_len or lower data.key_len"
            )
        if filler not in FILLERS:
            raise ValueError(f"data.filler must be one of {', '.join(FILLERS)}, got {filler!r}")
        if filler_vocab < 1:
            raise ValueError(f"data.filler_vocab must be >= 1, got {filler_vocab}")
        depths = list(EVAL_DEPTHS if depths is None else depths)
        if not depths or any(not 0 <= d <= 1 for d in depths):
            raise ValueError(f"data.depths must be a non-empty list of fractions in [0, 1], got {depths}")
        names = [depth_name(d) for d in depths]
        if len(set(names)) != len(names):
            raise ValueError(f"data.depths has repeated depths {depths}; list each depth once")
        self.key_len = key_len
        self.depths = [float(d) for d in depths]
        self.filler = filler
        self.filler_vocab = filler_vocab
        self.train_size = train_size
        self.eval_size = eval_size

    @property
    def vocab_size(self) -> int:
        return FIRST_FILLER + (len(SENTENCE_WORDS) if self.filler == "sentences" else self.filler_vocab)

    @property
    def depth_of(self) -> dict[str, float]:
        """Evaluation set name -> its depth."""
        return {depth_name(d): d for d in self.depths}

    def setup(self, stage: str | None = None) -> None:
        # Seeds per split: 3 * seed train; 3 * eval_seed + 1 validation, + 2 test (`cope-pl test` sees keys
        # validation never did). Every depth of a split shares the split's seed: item j has the same key at each depth.
        eval_seed = 3 * self.eval_seed + (2 if stage == "test" else 1)
        args = (self.seq_len, self.key_len)
        train_seed = 3 * self.seed
        self.train_set = PasskeySequences(self.train_size, *args, None, self.filler, self.filler_vocab, seed=train_seed)
        self.eval_sets = {
            name: PasskeySequences(self.eval_size, *args, depth, self.filler, self.filler_vocab, seed=eval_seed)
            for name, depth in self.depth_of.items()
        }
