"""The DataModule shared by the real-text corpora: a tokenizer and three token arrays prepared once, windows.

`prepare_data` (one process per node) reads the source, trains or copies the tokenizer and writes the token
arrays; `setup` (every process) only opens them, after checking they were written for this source and
tokenizer. Subclasses only say where the text comes from (`make_source`).

Evaluation sets are named by context length: "" is data.seq_len, and each of `eval_seq_lens` adds a set
named by its length, so metrics read `val/ppl` and `val/ppl@2048`. `tokens_per_word[stage][set name]` is the
split's ratio of BPE tokens to its word count W (`word_count`, see cope_pl/data/prepare.py), which the LM
uses for word-level ppl.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from cope_pl.data.base import LMDataModule
from cope_pl.data.prepare import (
    SPLITS,
    PrepareStats,
    TextSource,
    check_word_count,
    corpus_dir,
    prepare_corpus,
    tokenizer_tag,
    word_total,
)
from cope_pl.data.token_array import TokenArray, array_paths, mismatch, read_meta
from cope_pl.data.tokenizer import load_tokenizer, tokenizer_hash
from cope_pl.data.windows import EvalWindows, RandomWindows

STAGE_SPLITS = {"val": "valid", "test": "test"}


class TokenArrayDataModule(LMDataModule):
    """Base for token-array corpora.

    Args:
        vocab_size: size of the byte-level BPE trained on the training split; ignored when tokenizer_file is
            given (the file's own size is used). The CLI passes it on to model.vocab_size.
        tokenizer_file: a tokenizer.json to use instead of training one (e.g. GPT-2's).
        cache_dir: where prepared tokenizers and token arrays live (see cope_pl/data/prepare.py).
        eval_seq_lens: extra validation/test context lengths, each its own evaluation set.
        train_windows: training windows per epoch; default: training tokens // seq_len.
        word_count: the W of word-level perplexity: "merity" (default, the WikiText convention: whitespace
            words plus one end-of-line per line), "whitespace" (whitespace words alone) or "none" (no
            word-level perplexity).
        show_progress: progress bars while preparing.
    """

    def __init__(
        self,
        seq_len: int = 1024,
        batch_size: int = 8,
        vocab_size: int = 16384,
        tokenizer_file: str | None = None,
        cache_dir: str = "data_cache",
        eval_seq_lens: list[int] | None = None,
        train_windows: int | None = None,
        word_count: str = "merity",
        num_workers: int = 0,
        seed: int = 0,
        show_progress: bool = True,
    ):
        super().__init__(seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, seed=seed)
        if any(n < 1 for n in eval_seq_lens or []):
            raise ValueError(f"data.eval_seq_lens must hold lengths >= 1, got {eval_seq_lens}")
        check_word_count(word_count)
        self.word_count = word_count
        self.tokenizer_file = tokenizer_file
        self.bpe_vocab_size = vocab_size
        self.cache_dir = cache_dir
        self.eval_seq_lens = [n for n in dict.fromkeys(eval_seq_lens or []) if n != seq_len]
        self.train_windows = train_windows
        self.show_progress = show_progress
        self.test_sets: dict[str, Dataset] = {}
        self.tokens_per_word: dict[str, dict[str, float]] = {}
        self.arrays: dict[str, TokenArray] = {}
        self._source: TextSource | None = None

    @abstractmethod
    def make_source(self) -> TextSource:
        """The corpus this module reads."""

    @property
    def source(self) -> TextSource:
        if self._source is None:
            self._source = self.make_source()
        return self._source

    @property
    def vocab_size(self) -> int:
        if self.tokenizer_file is not None:
            return load_tokenizer(self.tokenizer_file).get_vocab_size()
        return self.bpe_vocab_size

    def text_codec(self):
        from cope_pl.data.codec import TokenizerCodec

        return TokenizerCodec(self.directory / "tokenizer.json")  # prepare_data copies a given tokenizer_file here

    @property
    def directory(self) -> Path:
        """Where this corpus's tokenizer.json and token arrays are (independent of seq_len)."""
        return corpus_dir(self.cache_dir, self.source) / tokenizer_tag(self.bpe_vocab_size, self.tokenizer_file)

    def prepare_data(self) -> PrepareStats:
        return prepare_corpus(
            self.source,
            self.cache_dir,
            self.bpe_vocab_size,
            self.tokenizer_file,
            show_progress=self.show_progress,
            word_count=self.word_count,
        )

    def _open(self, split: str, expected: dict[str, str]) -> tuple[TokenArray, dict]:
        bin_path, meta_path = array_paths(self.directory, split)
        meta = read_meta(self.directory, split)
        if meta is None:
            raise FileNotFoundError(
                f"{bin_path} is missing or incomplete; prepare the data first (cope-pl fit does it, "
                "or run the data_prep/ script with the same options)"
            )
        key = mismatch(meta, expected)
        if key is not None:
            raise ValueError(
                f"{meta_path} was written for another {key} than the current source and tokenizer; "
                f"prepare the data again (cope-pl fit or data_prep/) or delete {self.directory}"
            )
        return TokenArray(bin_path, meta["dtype"], meta["num_tokens"]), meta

    def _check_model_vocab(self, vocab_size: int) -> None:
        model = self.trainer.lightning_module if self.trainer is not None else None
        model_vocab = getattr(model, "hparams", {}).get("vocab_size") if model is not None else None
        if model_vocab is not None and model_vocab < vocab_size:
            raise ValueError(
                f"tokenizer {self.directory / 'tokenizer.json'} has {vocab_size} tokens but model.vocab_size="
                f"{model_vocab}; leave model.vocab_size unset so the CLI links it from the data"
            )

    def setup(self, stage: str | None = None) -> None:
        tokenizer_path = self.directory / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"{tokenizer_path} is missing; prepare the data first (cope-pl fit or data_prep/)")
        tokenizer = load_tokenizer(tokenizer_path)
        self._check_model_vocab(tokenizer.get_vocab_size())
        expected = {"source_id": self.source.source_id(), "tokenizer_hash": tokenizer_hash(tokenizer)}
        arrays = {split: self._open(split, expected) for split in SPLITS}
        self.arrays = {split: array for split, (array, _) in arrays.items()}
        if stage in (None, "fit"):  # evaluation alone (e.g. at a longer seq_len) never needs training windows
            train, _ = arrays["train"]
            num_windows = self.train_windows or max(len(train) // self.seq_len, 1)
            self.train_set = RandomWindows(train, self.seq_len, num_windows, seed=self.seed)
        lengths = {"": self.seq_len, **{str(n): n for n in self.eval_seq_lens}}
        valid, valid_meta = arrays["valid"]
        test, test_meta = arrays["test"]
        self.eval_sets = {name: EvalWindows(valid, n) for name, n in lengths.items()}
        self.test_sets = {name: EvalWindows(test, n) for name, n in lengths.items()}
        self.tokens_per_word = {
            stage_name: {name: meta["num_tokens"] / max(word_total(meta, self.word_count), 1) for name in lengths}
            for stage_name, meta in (("val", valid_meta), ("test", test_meta))
            if self.word_count != "none"
        }

    def token_stream(self, split: str) -> np.ndarray:
        """The whole split as one token array (for sliding-window evaluation); split: train, valid or test."""
        return self.arrays[split].tokens.astype(np.int64)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_sets)
