"""Prepare a corpus once (one process): train or copy its tokenizer, then write each split as a token array.

A corpus is a `TextSource`: three splits of documents in order. Everything lands in

    <cache_dir>/<corpus>/<source slug>-<hash of source id>/<tokenizer tag>/
        tokenizer.json  train.bin train.json  valid.bin valid.json  test.bin test.json

where the tokenizer tag is `bpe<vocab size>` for a tokenizer trained here and `file-<hash>` for a supplied
one. The directory does not depend on the context length, so every seq_len reuses the same arrays. Arrays
whose metadata matches (source id, tokenizer hash) are reused; any other is rebuilt.

Each split's metadata counts its whitespace-separated `words` and its `lines` (end-of-lines, a last line
without a newline included). Word-level perplexity divides by W = words + lines by default, the WikiText
convention (Merity et al. 2016: one `<eos>` per line, so W = 245,569 on WikiText-103's test split), or by the
whitespace words alone with word_count="whitespace"; word_count="none" (the code corpus's default) reports no
word-level perplexity at all.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from cope_pl.atomic import atomic_path
from cope_pl.data.token_array import mismatch, read_meta, write_token_array
from cope_pl.data.tokenizer import end_of_text_id, load_tokenizer, save_tokenizer, tokenizer_hash, train_bpe

SPLITS = ("train", "valid", "test")
# W = words + lines (the WikiText convention), words alone, or no word-level perplexity (code: no standard W)
WORD_COUNTS = ("merity", "whitespace", "none")
ENCODE_BATCH = 1024  # documents per encode_batch call


class TextSource(ABC):
    """A corpus as three splits (train/valid/test) of documents, each split read in its original order."""

    corpus: str  # cache subdirectory, e.g. "wikitext103": a cache key, not a description of the data
    separate_documents: bool = False  # append the end-of-text token after every document

    @abstractmethod
    def describe(self) -> str:
        """Where the text comes from, for people: 'dir:/data/wikitext-103', 'hf:Salesforce/wikitext/...'."""

    @property
    def label(self) -> str:
        """A short name for progress bars: the last component of describe() ('valid.txt', 'wikitext-103-v1')."""
        return Path(self.describe().split(":", 1)[-1].split(",")[0]).name or self.describe()

    @abstractmethod
    def source_id(self) -> str:
        """Cache key: describe() plus everything that changes the text (file sizes and times, options)."""

    @abstractmethod
    def documents(self, split: str) -> Iterator[str]:
        """The split's documents in order, as original text (word counts are taken on this text)."""

    def model_text(self, document: str) -> str:
        """The text the tokenizer sees (WikiText may detokenise ' @-@ ' here)."""
        return document


def sha(text: str, n: int = 10) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def corpus_dir(cache_dir: str | Path, source: TextSource) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source.describe().split(":", 1)[-1]).strip("_")[-40:]
    return Path(cache_dir) / source.corpus / f"{slug}-{sha(source.source_id())}"


def tokenizer_tag(vocab_size: int, tokenizer_file: str | Path | None) -> str:
    if tokenizer_file is None:
        return f"bpe{vocab_size}"
    path = Path(tokenizer_file)
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer_file={path} does not exist; give the path of a tokenizer.json")
    return f"file-{hashlib.sha256(path.read_bytes()).hexdigest()[:10]}"


def end_of_lines(text: str) -> int:
    """Lines of a text, each counted by its end: newlines, plus one for a last line that lacks its newline."""
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def check_word_count(word_count: str) -> None:
    if word_count not in WORD_COUNTS:
        raise ValueError(
            f"data.word_count must be one of {', '.join(WORD_COUNTS)}, got {word_count!r}; "
            "merity counts one end-of-line per line as a word, as WikiText papers do; "
            "none logs no word-level perplexity"
        )


def word_total(meta: dict[str, Any], word_count: str = "merity") -> int | None:
    """W, the word count of a split that word-level perplexity divides by (see the module docstring); None for
    word_count="none"."""
    check_word_count(word_count)
    if word_count == "none":
        return None
    return meta["words"] + (meta["lines"] if word_count == "merity" else 0)


@dataclass
class PrepareStats:
    directory: Path
    source: str = ""  # TextSource.describe()
    word_count: str = "merity"  # which W the table shows
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> metadata
    built: list[str] = field(default_factory=list)  # splits (re)written this time
    tokenizer_seconds: float = 0.0  # time spent training (or loading) the tokenizer
    encode_seconds: float = 0.0  # time spent reading + tokenizing + writing the built splits

    @property
    def tokens_per_second(self) -> float:
        tokens = sum(self.splits[s]["num_tokens"] for s in self.built)
        return tokens / self.encode_seconds if self.encode_seconds > 0 else float("nan")

    def summary(self) -> str:
        w = f"W ({self.word_count})"
        lines = [
            f"source: {self.source}",
            f"cache:  {self.directory}",
            f"{'split':6} {'tokens':>12} {'words':>12} {'lines':>9} {w:>14} {'tokens/W':>9}  status",
        ]
        for split, meta in self.splits.items():
            status = "written" if split in self.built else "reused"
            total = word_total(meta, self.word_count)
            ratio = None if total is None else meta["num_tokens"] / max(total, 1)
            w_cells = f"{'-':>14} {'-':>9}" if total is None else f"{total:14,d} {ratio:9.4f}"
            lines.append(
                f"{split:6} {meta['num_tokens']:12,d} {meta['words']:12,d} {meta['lines']:9,d} {w_cells}  {status}"
            )
        lines.append(f"tokenizer: {self.tokenizer_seconds:.1f} s")
        if self.built:
            lines.append(
                f"read + tokenize + write: {self.encode_seconds:.1f} s, {self.tokens_per_second:,.0f} tokens/s"
            )
        return "\n".join(lines)


def data_config_args(path: str | Path | None) -> dict[str, Any]:
    """init_args of the data section of a cope-pl YAML config (so data_prep uses a run's own settings)."""
    if path is None:
        return {}
    config = yaml.safe_load(Path(path).read_text()) or {}
    data = config.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("init_args", {}), dict):
        raise ValueError(f"{path} has no data: class_path/init_args section; give a configs/data/*.yaml file")
    return dict(data.get("init_args") or {})


def obtain_tokenizer(
    source: TextSource, directory: Path, vocab_size: int, tokenizer_file: str | Path | None, show_progress: bool
) -> Tokenizer:
    """tokenizer.json in `directory`: reused if there, else copied from tokenizer_file or trained on train."""
    path = directory / "tokenizer.json"
    if path.is_file():
        return load_tokenizer(path)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_file is not None:
        tokenizer = load_tokenizer(tokenizer_file)
        with atomic_path(path) as tmp:
            shutil.copyfile(tokenizer_file, tmp)
        return tokenizer
    texts = (source.model_text(d) for d in source.documents("train"))
    tokenizer = train_bpe(texts, vocab_size, show_progress=show_progress)
    save_tokenizer(tokenizer, path)
    return load_tokenizer(path)  # the saved form is what every later process hashes


def encode_split(
    source: TextSource, split: str, tokenizer: Tokenizer, counts: dict[str, Any], show_progress: bool
) -> Iterator[np.ndarray]:
    """Token chunks of one split, in order; sets counts["words"] (whitespace-separated), ["lines"] and
    ["documents"]."""
    eot = end_of_text_id(tokenizer) if source.separate_documents else None
    counts.update(words=0, lines=0, documents=0)
    bar = tqdm(desc=f"{source.label} {split}", unit=" docs", disable=not show_progress, mininterval=1.0)

    def encode(batch: list[str]) -> np.ndarray:
        encodings = tokenizer.encode_batch([source.model_text(d) for d in batch], add_special_tokens=False)
        ids = [e.ids + [eot] if eot is not None else e.ids for e in encodings]
        counts["words"] += sum(len(d.split()) for d in batch)
        counts["lines"] += sum(end_of_lines(d) for d in batch)
        counts["documents"] += len(batch)
        bar.update(len(batch))
        return np.fromiter((t for doc in ids for t in doc), dtype=np.int64)

    batch: list[str] = []
    for document in source.documents(split):
        batch.append(document)
        if len(batch) == ENCODE_BATCH:
            yield encode(batch)
            batch = []
    if batch:
        yield encode(batch)
    bar.close()


def prepare_corpus(
    source: TextSource,
    cache_dir: str | Path,
    vocab_size: int,
    tokenizer_file: str | Path | None = None,
    show_progress: bool = True,
    word_count: str = "merity",
) -> PrepareStats:
    """Make sure the tokenizer and all three token arrays exist and match; build what is missing."""
    directory = corpus_dir(cache_dir, source) / tokenizer_tag(vocab_size, tokenizer_file)
    start = time.perf_counter()
    tokenizer = obtain_tokenizer(source, directory, vocab_size, tokenizer_file, show_progress)
    expected = {"source_id": source.source_id(), "tokenizer_hash": tokenizer_hash(tokenizer)}
    stats = PrepareStats(directory, source.describe(), word_count, tokenizer_seconds=time.perf_counter() - start)
    for split in SPLITS:
        meta = read_meta(directory, split)
        if meta is not None and mismatch(meta, expected) is None:
            stats.splits[split] = meta
            continue
        start = time.perf_counter()
        info = {**expected, "source": source.describe(), "split": split, "vocab_size": tokenizer.get_vocab_size()}
        chunks = encode_split(source, split, tokenizer, info, show_progress)  # adds word, line, document counts
        meta = write_token_array(directory, split, chunks, tokenizer.get_vocab_size(), info)
        stats.encode_seconds += time.perf_counter() - start
        stats.splits[split] = meta
        stats.built.append(split)
    return stats


def prepare_from_cli(module_class: type, args: dict[str, Any]) -> None:
    """data_prep/ scripts: options from `--config` (a data YAML), overridden by the flags given, then prepare.

    Bad input (a missing, empty or non-text file, an unreadable config, no network for the hub) ends the
    script with one `error:` line on stderr and exit status 1, not a traceback.
    """
    try:
        options = data_config_args(args.pop("config"))
        options.update({k: v for k, v in args.items() if v is not None})
        summary = module_class(**options).prepare_data().summary()
    except (OSError, ValueError, yaml.YAMLError) as err:  # FileNotFoundError, ConnectionError, UnicodeError too
        sys.exit(f"error: {err}")
    print(summary)
