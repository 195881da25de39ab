"""Flip-Flop language modelling (Liu et al. 2023, "Exposing Attention Glitches with Flip-Flop Language Modeling").

A sequence is instruction/bit pairs over the alphabet {w, r, i, 0, 1}: `w b` writes bit b, `i b` is a distractor
and `r b` must repeat the last written bit. FFL(p_i) draws each instruction with p(i) = p_i and
p(w) = p(r) = (1 - p_i) / 2; the first is always `w` and the last always `r`. Only the bits after `r` are scored.
Training and the in-distribution test use FFL(0.8); the out-of-distribution tests use FFL(0.1) (dense: many
writes and reads) and FFL(0.98) (sparse: long gaps between a write and its read).

The model reads BOS followed by the string, so seq_len is the length of the string (an even number).
Sequences are generated from (seed, split, index), or read from the `synthseq/flipflop` data set (parquet, one
`text` column, splits train/val/val_dense/val_sparse) when `source` names it or a local copy of it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from cope_pl.data.base import LMDataModule, shift_labels
from cope_pl.seeding import generator

ALPHABET = "wri01"  # token ids 0..4; BOS is 5
WRITE, READ, IGNORE = 0, 1, 2
BOS = len(ALPHABET)
CHAR_ID = {c: i for i, c in enumerate(ALPHABET)}
BIT_OFFSET = CHAR_ID["0"]  # bit b has token id BIT_OFFSET + b

# Evaluation set name -> its split in synthseq/flipflop.
EVAL_SETS = {"in_dist": "val", "ood_dense": "val_dense", "ood_sparse": "val_sparse"}


def flipflop_tokens(pairs: int, p_ignore: float, generator: torch.Generator) -> torch.Tensor:
    """One FFL(p_ignore) string of `pairs` instruction/bit pairs as token ids (2 * pairs,)."""
    p_write = (1 - p_ignore) / 2
    probs = torch.tensor([p_write, p_write, p_ignore])  # w, r, i
    instr = torch.multinomial(probs, pairs, replacement=True, generator=generator)  # (P,)
    instr[0], instr[-1] = WRITE, READ
    bits = torch.randint(0, 2, (pairs,), generator=generator)  # (P,)
    steps = torch.arange(pairs)
    last_write = torch.cummax(torch.where(instr == WRITE, steps, 0), dim=0).values  # (P,) index of the latest w
    bits = torch.where(instr == READ, bits[last_write], bits)
    return torch.stack([instr, bits + BIT_OFFSET], dim=1).flatten()  # (2P,) w b r b i b ...


def encode(text: str) -> torch.Tensor:
    """A flip-flop string such as 'w1i0r1' -> token ids; raises ValueError on a malformed string."""
    if len(text) % 2 or any(c not in CHAR_ID for c in text):
        raise ValueError(f"flip-flop text must be instruction/bit pairs over {ALPHABET!r}, got {text[:40]!r}...")
    return torch.tensor([CHAR_ID[c] for c in text])


def decode(tokens: torch.Tensor) -> str:
    return "".join(ALPHABET[int(t)] for t in tokens if int(t) != BOS)


def lm_example(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """BOS + string -> input_ids/labels, scoring only the bit after each `r`."""
    tokens = torch.cat([torch.tensor([BOS]), tokens])  # (T + 1,)
    scored = torch.zeros_like(tokens, dtype=torch.bool)
    scored[2::2] = tokens[1:-1:2] == READ  # the bit at 2k + 2 follows the instruction at 2k + 1
    return shift_labels(tokens, scored)


class FlipFlopSequences(Dataset):
    """FFL(p_ignore) strings of `length` characters, generated from (seed, index)."""

    def __init__(self, num_sequences: int, length: int, p_ignore: float, seed: int):
        self.num_sequences = num_sequences
        self.length = length
        self.p_ignore = p_ignore
        self.seed = seed

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = generator(self.seed, index)
        return lm_example(flipflop_tokens(self.length // 2, self.p_ignore, g))


class FlipFlopTexts(Dataset):
    """Flip-flop strings read from a data set's `text` column."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return lm_example(encode(self.texts[index]))


def load_texts(source: str, split: str, limit: int | None) -> list[str]:
    """The `text` column of one split of synthseq/flipflop: a hub name, or a local directory of parquet files
    named `<split>.parquet` or `<split>-*.parquet`."""
    import datasets  # imported here: only this path needs it

    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob(f"{split}.parquet")) + sorted(path.glob(f"{split}-*.parquet"))
        if not files:
            raise FileNotFoundError(f"no {split}.parquet or {split}-*.parquet in {path} (data.source)")
        ds = datasets.load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split)
    else:
        ds = datasets.load_dataset(source, split=split)
    if "text" not in ds.column_names:
        raise ValueError(f"{source} split {split} has columns {ds.column_names}; a flip-flop set needs 'text'")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return list(ds["text"])


class FlipFlopDataModule(LMDataModule):
    """Flip-Flop: train on FFL(p_ignore), evaluate on in_dist, ood_dense and ood_sparse.

    Args:
        seq_len: characters per string (512 in the paper, 256 pairs); the model reads BOS + string.
        p_ignore, p_dense, p_sparse: p_i of the training/in-distribution, dense and sparse sets.
        train_size: sequences per training epoch (generated on the fly, so any size costs nothing up front).
        eval_size: sequences per evaluation set.
        source: None to generate; otherwise `synthseq/flipflop` or a local directory with its parquet splits.
    """

    def __init__(
        self,
        seq_len: int = 512,
        batch_size: int = 32,
        p_ignore: float = 0.8,
        p_dense: float = 0.1,
        p_sparse: float = 0.98,
        train_size: int = 1_000_000,
        eval_size: int = 1000,
        source: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        eval_seed: int = 0,
    ):
        super().__init__(
            seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, seed=seed, eval_seed=eval_seed
        )
        if seq_len < 4 or seq_len % 2:
            raise ValueError(f"data.seq_len must be an even number >= 4 for flip-flop, got {seq_len}")
        for name, p in {"p_ignore": p_ignore, "p_dense": p_dense, "p_sparse": p_sparse}.items():
            if not 0 <= p < 1:
                raise ValueError(f"data.{name} must be in [0, 1), got {p}")
        self.p_ignore = p_ignore
        self.eval_p = {"in_dist": p_ignore, "ood_dense": p_dense, "ood_sparse": p_sparse}
        self.train_size = train_size
        self.eval_size = eval_size
        self.source = source

    @property
    def vocab_size(self) -> int:
        return len(ALPHABET) + 1  # + BOS

    def text_codec(self):
        from cope_pl.data.codec import VocabularyCodec

        return VocabularyCodec(ALPHABET, separator="", prefix=[BOS])  # sequences start with BOS, as in training

    def setup(self, stage: str | None = None) -> None:
        if self.source is not None:
            self.train_set = FlipFlopTexts(load_texts(self.source, "train", self.train_size))
            self.eval_sets = {
                name: FlipFlopTexts(load_texts(self.source, split, self.eval_size)) for name, split in EVAL_SETS.items()
            }
            return
        # Seeds per split: 8 * seed train; 8 * eval_seed + 1-3 validation, + 4-6 test (`cope-pl test` sees
        # sequences validation never did).
        first_eval = 8 * self.eval_seed + (4 if stage == "test" else 1)
        self.train_set = FlipFlopSequences(self.train_size, self.seq_len, self.p_ignore, seed=8 * self.seed)
        self.eval_sets = {
            name: FlipFlopSequences(self.eval_size, self.seq_len, p, seed=first_eval + i)
            for i, (name, p) in enumerate(self.eval_p.items())
        }
