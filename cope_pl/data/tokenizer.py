"""Byte-level BPE tokenizers: train one on a corpus's training split, save it as tokenizer.json, load it again.

Byte-level BPE can encode any text and decodes it back exactly, so token arrays can be checked against the
text they came from. A tokenizer is identified by the hash of its serialisation: cached token arrays record
that hash and are rebuilt (or refused) when it changes. As in GPT-2, the text `<|endoftext|>` inside a
document is read as the end-of-text token itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cope_pl.atomic import atomic_path

END_OF_TEXT = "<|endoftext|>"  # separates documents (code files); also GPT-2's end-of-text token
MIN_VOCAB = 257  # 256 bytes + the end-of-text token


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """A byte-level BPE with at most `vocab_size` tokens (fewer if the text runs out of merges)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"data.vocab_size={vocab_size} is too small for a byte-level BPE; use >= {MIN_VOCAB}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    with atomic_path(path) as tmp:  # a half-written tokenizer.json is never read
        tokenizer.save(str(tmp))


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist; give the path of a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(
            f"{path} is not a Hugging Face tokenizers file ({err}); give a tokenizer.json such as GPT-2's"
        ) from err


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def end_of_text_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(END_OF_TEXT)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} token to separate documents; train one or use GPT-2's")
    return token_id
