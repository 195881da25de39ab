"""Prepare the code corpus once, before training (e.g. on a login node that has network):

    .venv/bin/python data_prep/prepare_code.py --config configs/data/code.yaml
    .venv/bin/python data_prep/prepare_code.py --source paths --paths ~/src/project "~/lib/**/*.py"
    .venv/bin/python data_prep/prepare_code.py --source hub --hf-name codeparrot/codeparrot-clean --max-files 200000

Reads the files (standard library, paths or hub), trains the tokenizer and writes the token arrays into the
cache, with the same code as CodeDataModule.prepare_data; a training job with the same options reuses them.
Options given here override the config file's.
"""

from __future__ import annotations

import argparse

from cope_pl.data.code import SOURCES, CodeDataModule
from cope_pl.data.prepare import WORD_COUNTS, prepare_from_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a configs/data/*.yaml file whose data options to use")
    parser.add_argument("--source", choices=SOURCES, help="stdlib (default, offline), paths or hub")
    parser.add_argument("--paths", nargs="+", help="directories, files or glob patterns (source=paths)")
    parser.add_argument("--extensions", nargs="+", help="file endings read from directories (default .py)")
    parser.add_argument("--hf-name", help="hub data set (default codeparrot/codeparrot-clean)")
    parser.add_argument("--hf-column", help="its text column (default content)")
    parser.add_argument("--max-files", type=int, help="read at most this many files (a stable subset)")
    parser.add_argument("--vocab-size", type=int, help="BPE vocabulary size to train")
    parser.add_argument("--tokenizer-file", help="use this tokenizer.json instead of training one")
    parser.add_argument("--word-count", choices=WORD_COUNTS, help="W of word ppl: merity (default) or whitespace")
    parser.add_argument("--cache-dir", help="cache directory (default data_cache)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    prepare_from_cli(CodeDataModule, vars(parse_args(argv)))


if __name__ == "__main__":
    main()
