"""Source code as a language-modelling corpus: local source trees, a hub data set, or (offline default) the
Python standard library of the running interpreter, which is real code present on every machine.

Each file is one document, followed by the end-of-text token. Files go to train/valid/test by a stable hash
of their path (sha256, the same on every machine and run), and each split is read in path order.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from cope_pl.data.prepare import SPLITS, TextSource
from cope_pl.data.token_data import TokenArrayDataModule

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}
SOURCES = ("stdlib", "paths", "hub")


def unit_hash(salt: str, key: str) -> float:
    """A number in [0, 1) fixed by (salt, key): sha256, not Python's per-process hash()."""
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def split_of(key: str, valid_fraction: float, test_fraction: float) -> str:
    u = unit_hash("split", key)
    return "test" if u < test_fraction else "valid" if u < test_fraction + valid_fraction else "train"


def walk_files(root: Path, extensions: tuple[str, ...]) -> Iterator[Path]:
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)  # prune installed packages and caches
        yield from (Path(directory) / n for n in sorted(names) if n.endswith(extensions))


def list_files(paths: list[str], extensions: tuple[str, ...]) -> dict[str, Path]:
    """Keys (stable, machine-independent where possible) -> files, for directories and glob patterns."""
    files: dict[str, Path] = {}
    for entry in paths:
        root = Path(entry)
        if root.is_dir():
            files.update({f"{root.name}/{p.relative_to(root).as_posix()}": p for p in walk_files(root, extensions)})
        elif root.is_file():
            files[root.as_posix()] = root
        else:
            matches = [Path(m) for m in sorted(glob.glob(entry, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise FileNotFoundError(f"data.paths entry {entry!r} is not a directory, file or matching glob")
            files.update({m.as_posix(): m for m in matches})
    return files


def read_source_file(path: Path) -> str | None:
    """The file's text, or None for files that are empty or not UTF-8 (some stdlib tests are on purpose)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


class CodeSource(TextSource):
    corpus = "code"
    separate_documents = True

    def __init__(
        self,
        source: str,
        paths: list[str] | None,
        extensions: tuple[str, ...],
        hf_name: str,
        hf_column: str,
        hf_split: str,
        max_files: int | None,
        valid_fraction: float,
        test_fraction: float,
    ):
        if source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
        if source == "paths" and not paths:
            raise ValueError("data.source=paths needs data.paths: directories, files or glob patterns of code")
        if not (0 < valid_fraction and 0 < test_fraction and valid_fraction + test_fraction < 1):
            raise ValueError("data.valid_fraction and data.test_fraction must be > 0 with a sum below 1")
        self.source = source
        self.extensions = tuple(extensions)
        self.hf_name, self.hf_column, self.hf_split = hf_name, hf_column, hf_split
        self.max_files = max_files
        self.fractions = (valid_fraction, test_fraction)
        self.files: dict[str, Path] = {}
        if source == "stdlib":
            self.paths = [sysconfig.get_paths()["stdlib"]]
        else:
            self.paths = [str(Path(p).resolve()) if Path(p).exists() else p for p in paths or []]
        if source != "hub":
            self.files = self._select(list_files(self.paths, self.extensions))
            if not self.files:
                raise FileNotFoundError(f"no {'/'.join(self.extensions)} files under {self.paths}")

    def _select(self, files: dict[str, Path]) -> dict[str, Path]:
        """At most max_files files: a stable pseudo-random subset, so a small corpus still spans the tree."""
        if self.max_files is not None and len(files) > self.max_files:
            keep = sorted(files, key=lambda k: unit_hash("order", k))[: self.max_files]
            files = {k: files[k] for k in keep}
        return dict(sorted(files.items()))

    def describe(self) -> str:
        return f"hf:{self.hf_name}" if self.source == "hub" else f"{self.source}:{','.join(self.paths)}"

    def source_id(self) -> str:
        options = f"ext={self.extensions}|max_files={self.max_files}|fractions={self.fractions}"
        if self.source == "hub":
            return f"{self.describe()}|{self.hf_split}|{self.hf_column}|{options}"
        listing = hashlib.sha256()
        for key, path in self.files.items():
            stat = path.stat()
            listing.update(f"{key}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return f"{self.describe()}|{options}|files={listing.hexdigest()}"

    def documents(self, split: str) -> Iterator[str]:
        assert split in SPLITS
        if self.source == "hub":
            yield from self._hub_documents(split)
            return
        for key, path in self.files.items():
            if split_of(key, *self.fractions) == split:
                text = read_source_file(path)
                if text is not None:
                    yield text

    def _hub_documents(self, split: str) -> Iterator[str]:
        rows = load_hub_rows(self.hf_name, self.hf_split, streaming=self.max_files is not None)
        for index, row in enumerate(islice(rows, self.max_files)):
            if self.hf_column not in row:
                raise ValueError(f"{self.hf_name} has no column {self.hf_column!r}; set data.hf_column")
            key = f"{row.get('repo_name', '')}/{row.get('path', index)}"
            if split_of(key, *self.fractions) == split and row[self.hf_column].strip():
                yield row[self.hf_column]


def load_hub_rows(name: str, split: str, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as err:  # offline, unknown name: all end here
        raise ConnectionError(
            f"could not load {name} ({split}) from the Hugging Face hub: {err}. Without network, run "
            "data_prep/prepare_code.py where there is one (it fills the cache), or use data.source=stdlib|paths"
        ) from err


class CodeDataModule(TokenArrayDataModule):
    """Code as token arrays; see TokenArrayDataModule for the shared options.

    Args:
        source: "stdlib" (this interpreter's standard library, offline), "paths" or "hub".
        paths: directories (searched recursively), files or glob patterns, for source=paths.
        extensions: file name endings to read from directories.
        hf_name, hf_column, hf_split: the hub data set and its text column, for source=hub.
        max_files: read at most this many files (a stable subset); None reads all.
        valid_fraction, test_fraction: share of files (by path hash) in the validation and test splits.
    """

    def __init__(
        self,
        source: str = "stdlib",
        paths: list[str] | None = None,
        extensions: list[str] | None = None,
        hf_name: str = "codeparrot/codeparrot-clean",
        hf_column: str = "content",
        hf_split: str = "train",
        max_files: int | None = None,
        valid_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seq_len: int = 1024,
        batch_size: int = 8,
        vocab_size: int = 16384,
        tokenizer_file: str | None = None,
        cache_dir: str = "data_cache",
        eval_seq_lens: list[int] | None = None,
        train_windows: int | None = None,
        word_count: str = "none",
        num_workers: int = 0,
        seed: int = 0,
        show_progress: bool = True,
    ):
        super().__init__(
            seq_len=seq_len,
            batch_size=batch_size,
            vocab_size=vocab_size,
            tokenizer_file=tokenizer_file,
            cache_dir=cache_dir,
            eval_seq_lens=eval_seq_lens,
            train_windows=train_windows,
            word_count=word_count,
            num_workers=num_workers,
            seed=seed,
            show_progress=show_progress,
        )
        self.source_options = dict(
            source=source,
            paths=paths,
            extensions=tuple(extensions or [".py"]),
            hf_name=hf_name,
            hf_column=hf_column,
            hf_split=hf_split,
            max_files=max_files,
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
        )

    def make_source(self) -> TextSource:
        return CodeSource(**self.source_options)
