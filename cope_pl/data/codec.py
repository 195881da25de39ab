"""Text <-> token ids as a model trained on a data source reads them (prompts and output of `cope-pl generate`).

Each data module names its codec (`LMDataModule.text_codec`): the BPE tokenizer of a text corpus, the
vocabulary of a synthetic task (characters or words), or plain token ids for tasks whose symbols are numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class TokenIdCodec:
    """Prompts are space-separated token ids (tasks over numbered symbols: copy, selective copy)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            raise ValueError(f"this task reads prompts as space-separated token ids, got {text[:40]!r}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside this task's vocabulary 0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) for i in ids)


class VocabularyCodec:
    """A task's own vocabulary: single characters (separator "") or whitespace-separated words (separator " ").

    prefix: ids every sequence starts with (a BOS the task prepends); they are added to a prompt and not printed.
    """

    def __init__(self, vocabulary: Sequence[str], separator: str, prefix: Sequence[int] = ()):
        self.vocabulary = list(vocabulary)
        self.separator = separator
        self.prefix = list(prefix)
        self.ids = {token: i for i, token in enumerate(self.vocabulary)}

    def encode(self, text: str) -> list[int]:
        pieces = list(text.replace(" ", "")) if self.separator == "" else text.split()
        unknown = sorted({p for p in pieces if p not in self.ids})
        if unknown:
            allowed = "".join(self.vocabulary) if self.separator == "" else " ".join(self.vocabulary)
            raise ValueError(f"prompt has {unknown[:5]} outside this task's vocabulary; use only {allowed!r}")
        return self.prefix + [self.ids[p] for p in pieces]

    def decode(self, ids: Sequence[int]) -> str:
        words = [self.vocabulary[i] for i in ids if 0 <= i < len(self.vocabulary) and i not in self.prefix]
        return self.separator.join(words)


class TokenizerCodec:
    """A text corpus's byte-level BPE (the tokenizer.json the data module trained or was given)."""

    def __init__(self, path: Path):
        from cope_pl.data.tokenizer import load_tokenizer

        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{path} not found: the run's tokenizer is prepared with its data (data.cache_dir); "
                "run `cope-pl fit` or `make data-wikitext` there first, or point data.cache_dir at it"
            )
        self.tokenizer = load_tokenizer(path)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))
