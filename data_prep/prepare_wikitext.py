"""Prepare WikiText-103 once, before training (e.g. on a login node that has network):

    .venv/bin/python data_prep/prepare_wikitext.py --config configs/data/wikitext103.yaml
    .venv/bin/python data_prep/prepare_wikitext.py --data-dir /data/wikitext-103 --vocab-size 32768

Reads the text (hub or local directory), trains the tokenizer and writes the token arrays into the cache,
with the same code as WikiTextDataModule.prepare_data; a training job with the same options reuses them.
Options given here override the config file's.
"""

from __future__ import annotations

import argparse

from cope_pl.data.prepare import WORD_COUNTS, prepare_from_cli
from cope_pl.data.wikitext import WikiTextDataModule


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a configs/data/*.yaml file whose data options to use")
    parser.add_argument("--data-dir", help="directory with wiki.{train,valid,test}.tokens/.raw (default: the hub)")
    parser.add_argument("--hf-name", help="hub data set (default Salesforce/wikitext)")
    parser.add_argument("--hf-config", help="wikitext-103-raw-v1 (default) or wikitext-103-v1")
    parser.add_argument("--detokenize", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--vocab-size", type=int, help="BPE vocabulary size to train")
    parser.add_argument("--tokenizer-file", help="use this tokenizer.json (e.g. GPT-2's) instead of training one")
    parser.add_argument("--word-count", choices=WORD_COUNTS, help="W of word ppl: merity (default) or whitespace")
    parser.add_argument("--cache-dir", help="cache directory (default data_cache)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    prepare_from_cli(WikiTextDataModule, vars(parse_args(argv)))


if __name__ == "__main__":
    main()
