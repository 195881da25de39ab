"""WikiText-103 (Merity et al. 2016), from the Hugging Face hub or a local directory of the original files.

Lines are paragraphs, ` = Title = ` / ` = = Section = = ` headings and blank lines; each split is read in
order, line by line, so articles stay whole and in sequence. Word counts (for word-level perplexity) are
taken on the original text: whitespace-separated tokens, Moses-style `@-@` included, plus one end-of-line
per line, blank lines too (the WikiText convention; `word_count: whitespace` leaves the end-of-lines out).
With `detokenize` the tokenizer sees `-`, `,` and `.` in place of ` @-@ `, ` @,@ ` and ` @.@ `.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from cope_pl.data.prepare import SPLITS, TextSource
from cope_pl.data.token_data import TokenArrayDataModule

FILE_NAMES = ("wiki.{split}.tokens", "wiki.{split}.raw", "{split}.txt")  # original names, then plain ones
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
HEADING = re.compile(r"^ (=+) .+ \1 $")  # " = Title = ", " = = Section = = "
ARTICLE = re.compile(r"^ = [^=].* = $")  # a top-level title starts a new article
SMOKE_FRACTIONS = (0.8, 0.1, 0.1)  # a single file given as data_dir is split by articles like this
MOSES = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}
FORMAT_CHECK_LINES = 100


def detokenize(text: str) -> str:
    for marked, plain in MOSES.items():
        text = text.replace(marked, plain)
    return text


def read_wikitext(path: Path) -> Iterator[str]:
    """Lines of a WikiText file (each ending in a newline), after checking the file looks like WikiText."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty; it should hold WikiText paragraphs and ' = Title = ' headings")
    try:
        with open(path, encoding="utf-8") as f:
            head = [f.readline() for _ in range(FORMAT_CHECK_LINES)]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); give the original WikiText files") from err
    if not any(HEADING.match(line.rstrip("\n")) for line in head):
        raise ValueError(
            f"{path} does not look like WikiText (no ' = Title = ' heading in its first {FORMAT_CHECK_LINES} "
            "lines); give the original wiki.{train,valid,test}.tokens or .raw files"
        )
    with open(path, encoding="utf-8") as f:
        yield from f


def find_split_files(data_dir: str | Path) -> dict[str, Path]:
    """The split files of a directory in the original layout; a single file stands for all three splits."""
    directory = Path(data_dir)
    if directory.is_file():
        return dict.fromkeys(SPLITS, directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"data.data_dir={directory} does not exist; put wiki.train.tokens, wiki.valid.tokens and "
            "wiki.test.tokens (or .raw) there, or leave data_dir unset to load WikiText-103 from the hub"
        )
    files = {}
    for split in SPLITS:
        candidates = [directory / name.format(split=split) for name in FILE_NAMES]
        found = [c for c in candidates if c.is_file()]
        if not found:
            names = ", ".join(c.name for c in candidates)
            raise FileNotFoundError(f"{directory} holds no {split} split: expected one of {names}")
        files[split] = found[0]
    return files


def split_articles(lines: list[str]) -> list[list[str]]:
    """Lines grouped into articles, each starting at its top-level ' = Title = ' line."""
    articles: list[list[str]] = [[]]
    for line in lines:
        if ARTICLE.match(line.rstrip("\n")) and any(x.strip() for x in articles[-1]):
            articles.append([])
        articles[-1].append(line)  # blank lines before the first title stay with it
    return [a for a in articles if a]


def split_by_articles(lines: list[str], fractions=SMOKE_FRACTIONS) -> dict[str, list[str]]:
    """One WikiText file cut into train/valid/test lines by whole articles, in order (for smoke runs)."""
    articles = split_articles(lines)
    if len(articles) < 3:
        raise ValueError(f"a single WikiText file needs at least 3 articles to split, this one has {len(articles)}")
    n_train = max(1, round(fractions[0] * len(articles)))
    n_valid = max(1, min(round(fractions[1] * len(articles)), len(articles) - n_train - 1))
    parts = {"train": articles[:n_train], "valid": articles[n_train : n_train + n_valid]}
    parts["test"] = articles[n_train + n_valid :]
    return {split: [line for article in part for line in article] for split, part in parts.items()}


class WikiTextSource(TextSource):
    corpus = "wikitext103"

    def __init__(self, data_dir: str | None, hf_name: str, hf_config: str, detokenize: bool):
        self.data_dir = None if data_dir is None else Path(data_dir).resolve()
        self.files = find_split_files(self.data_dir) if self.data_dir is not None else None
        self.hf_name = hf_name
        self.hf_config = hf_config
        self.detokenize = detokenize

    def describe(self) -> str:
        return f"dir:{self.data_dir}" if self.data_dir is not None else f"hf:{self.hf_name}/{self.hf_config}"

    @property
    def single_file(self) -> bool:
        return self.data_dir is not None and self.data_dir.is_file()

    def source_id(self) -> str:
        parts = [self.describe(), f"detokenize={self.detokenize}"]
        if self.single_file:
            parts.append(f"articles split {SMOKE_FRACTIONS}")
        for split, path in (self.files or {}).items():
            stat = path.stat()
            parts.append(f"{split}={path.name}:{stat.st_size}:{stat.st_mtime_ns}")
        return "|".join(parts)

    def documents(self, split: str) -> Iterator[str]:
        if self.single_file:
            yield from split_by_articles(list(read_wikitext(self.data_dir)))[split]
            return
        if self.files is not None:
            yield from read_wikitext(self.files[split])
            return
        for row in load_hub_split(self.hf_name, self.hf_config, HUB_SPLITS[split]):
            line = row["text"]
            yield line if line.endswith("\n") else line + "\n"

    def model_text(self, document: str) -> str:
        return detokenize(document) if self.detokenize else document


def load_hub_split(name: str, config: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name or config: all end here
        raise ConnectionError(
            f"could not load {name} ({config}, {split}) from the Hugging Face hub: {err}. Without network, "
            "run data_prep/prepare_wikitext.py where there is one (it fills the cache), or download the "
            "original files and set data.data_dir"
        ) from err


class WikiTextDataModule(TokenArrayDataModule):
    """WikiText-103 as token arrays; see TokenArrayDataModule for the shared options.

    Args:
        data_dir: a directory with wiki.{train,valid,test}.tokens (or .raw, or {split}.txt); unset: the hub.
            A single WikiText file is split by whole articles, 80/10/10, for smoke runs.
        hf_name, hf_config: the hub data set (wikitext-103-raw-v1 or wikitext-103-v1).
        detokenize: turn ` @-@ `, ` @,@ `, ` @.@ ` into `-`, `,`, `.` before tokenizing.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        hf_name: str = "Salesforce/wikitext",
        hf_config: str = "wikitext-103-raw-v1",
        detokenize: bool = False,
        seq_len: int = 1024,
        batch_size: int = 8,
        vocab_size: int = 32768,
        tokenizer_file: str | None = None,
        cache_dir: str = "data_cache",
        eval_seq_lens: list[int] | None = None,
        train_windows: int | None = None,
        word_count: str = "merity",
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
        self.data_dir = data_dir
        self.hf_name = hf_name
        self.hf_config = hf_config
        self.detokenize = detokenize

    def make_source(self) -> TextSource:
        return WikiTextSource(self.data_dir, self.hf_name, self.hf_config, self.detokenize)
