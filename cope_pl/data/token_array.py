"""A tokenized split on disk: a flat memory-mapped token array `<split>.bin` and its metadata `<split>.json`.

The array holds every token of the split in order (uint16 when the vocabulary fits, else uint32). The
metadata records where the tokens came from (source id, tokenizer hash) and how many tokens, original
words and lines the split has. Writes are atomic: the old metadata is removed first, the array is written under a
temporary name and renamed, and the metadata is written last, so a half-written cache is never used.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cope_pl.atomic import atomic_path, write_json_atomic

FORMAT_VERSION = 2  # 2: metadata counts lines too; arrays of an older format are rebuilt


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def array_paths(directory: Path, split: str) -> tuple[Path, Path]:
    return directory / f"{split}.bin", directory / f"{split}.json"


def write_token_array(
    directory: Path, split: str, chunks: Iterable[np.ndarray], vocab_size: int, meta: dict[str, Any]
) -> dict[str, Any]:
    """Stream token chunks into `<split>.bin`, then write `<split>.json` (meta plus dtype and num_tokens)."""
    bin_path, meta_path = array_paths(directory, split)
    meta_path.unlink(missing_ok=True)  # from here on the old array counts as absent
    dtype = token_dtype(vocab_size)
    num_tokens = 0
    with atomic_path(bin_path) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(np.asarray(chunk, dtype=dtype).tobytes())
            num_tokens += len(chunk)
        if num_tokens == 0:
            raise ValueError(f"the {split} split of {meta.get('source', directory)} is empty; check the source files")
    meta = {**meta, "format": FORMAT_VERSION, "dtype": dtype.name, "num_tokens": num_tokens}
    write_json_atomic(meta_path, meta)
    return meta


def read_meta(directory: Path, split: str) -> dict[str, Any] | None:
    """The metadata of a complete array, or None when the split was never written (or only half)."""
    bin_path, meta_path = array_paths(directory, split)
    if not meta_path.is_file() or not bin_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err}); delete it and prepare the data again") from err
    if meta.get("format") != FORMAT_VERSION:
        return None
    if bin_path.stat().st_size != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None
    return meta


def mismatch(meta: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Which cache key differs (e.g. 'tokenizer_hash'), or None when the array is the one expected."""
    for key, value in expected.items():
        if meta.get(key) != value:
            return key
    return None


class TokenArray:
    """A read-only view of `<split>.bin`, opened lazily so it can be sent to DataLoader workers cheaply."""

    def __init__(self, path: Path, dtype: str, num_tokens: int):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.num_tokens = num_tokens
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __len__(self) -> int:
        return self.num_tokens

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}  # workers reopen the file instead of copying it
