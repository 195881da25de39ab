"""The W of word-level perplexity, the prepare table, and the data_prep scripts on bad input.

W follows the WikiText convention by default: whitespace-separated words plus one end-of-line per line
(Merity et al. 2016); `word_count="whitespace"` leaves the end-of-lines out.
"""

import importlib.util
import subprocess
from pathlib import Path

import pytest

from cope_pl.data import WikiTextDataModule
from cope_pl.data.prepare import SPLITS, end_of_lines, word_total
from cope_pl.data.token_array import read_meta

ROOT = Path(__file__).resolve().parents[1]
SHARED_WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
needs_shared = pytest.mark.skipif(not SHARED_WIKITEXT.is_file(), reason=f"{SHARED_WIKITEXT} is not present")
ARTICLE = " \n = {title} = \n \n the castle @-@ king was built in 1 @,@ 200 . \n \n = = Army = = \n \n a river . \n"


def write_wikitext_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in {"train": 12, "valid": 3, "test": 2}.items():
        text = "".join(ARTICLE.format(title=f"{split} {i}") for i in range(count))
        (directory / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return directory


def module(data_dir: Path, cache_dir: Path, **kwargs) -> WikiTextDataModule:
    options = dict(vocab_size=300, seq_len=16, batch_size=4, show_progress=False)
    return WikiTextDataModule(data_dir=str(data_dir), cache_dir=str(cache_dir), **{**options, **kwargs})


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data_prep" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


# Counting


def test_every_line_ends_once_blank_lines_and_an_unterminated_last_line_included():
    assert [end_of_lines(t) for t in ("", " \n", "a b\n \n", "a\nb")] == [0, 1, 2, 2]


@needs_shared
def test_shared_wikitext2_valid_file_has_217646_words_by_default(tmp_path):
    dm = module(SHARED_WIKITEXT, tmp_path, vocab_size=512)  # one file: its articles split 80/10/10
    stats = dm.prepare_data()
    assert sum(word_total(stats.splits[s]) for s in SPLITS) == 217_646  # the figure of the WikiText paper
    assert sum(word_total(stats.splits[s], "whitespace") for s in SPLITS) == 213_886


def test_tokens_per_word_divide_by_words_plus_lines_unless_whitespace_is_asked(tmp_path):
    data = write_wikitext_dir(tmp_path / "wt")
    text = (data / "wiki.test.tokens").read_text(encoding="utf-8")
    merity = module(data, tmp_path / "cache")
    merity.prepare_data()
    merity.setup("test")
    tokens = read_meta(merity.directory, "test")["num_tokens"]
    assert merity.tokens_per_word["test"][""] == tokens / (len(text.split()) + text.count("\n"))
    whitespace = module(data, tmp_path / "cache", word_count="whitespace")
    assert whitespace.prepare_data().built == []  # the same arrays serve both counts
    whitespace.setup("test")
    assert whitespace.tokens_per_word["test"][""] == tokens / len(text.split())


def test_an_unknown_word_count_names_the_option():
    with pytest.raises(ValueError, match="data.word_count must be one of merity, whitespace, none, got 'lines'"):
        WikiTextDataModule(word_count="lines")


# The prepare table


def test_prepare_table_shows_w_per_split_and_names_the_source_not_wikitext103(tmp_path):
    data = write_wikitext_dir(tmp_path / "my-corpus")
    table = module(data, tmp_path / "cache").prepare_data().summary().splitlines()
    assert table[0] == f"source: dir:{data}"
    header = table[2].split()
    assert header[:6] == ["split", "tokens", "words", "lines", "W", "(merity)"]
    valid = next(line.split() for line in table if line.startswith("valid"))
    text = (data / "wiki.valid.tokens").read_text(encoding="utf-8")
    assert valid[2:5] == [
        f"{len(text.split()):,}",
        f"{text.count(chr(10)):,}",
        f"{len(text.split()) + text.count(chr(10)):,}",
    ]
    assert "wikitext103" not in table[0] + table[2]  # the label comes from the data, not the cache folder name


# data_prep scripts on bad input


@pytest.mark.parametrize(
    "script, contents, message",
    [
        ("prepare_wikitext", b"", "is empty"),
        ("prepare_wikitext", b"\xff\xfe\x00 binary", "is not UTF-8 text"),
        ("prepare_wikitext", b"no headings here\n", "does not look like WikiText"),
        ("prepare_code", b"", "is empty"),
    ],
)
def test_data_prep_scripts_end_bad_input_with_one_error_line(tmp_path, script, contents, message):
    bad = tmp_path / "bad.py"
    bad.write_bytes(contents)
    flag = ["--data-dir", str(bad)] if script == "prepare_wikitext" else ["--source", "paths", "--paths", str(bad)]
    with pytest.raises(SystemExit) as exit_:
        load_script(script).main([*flag, "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache")])
    error = str(exit_.value.code)
    assert error.startswith("error: ") and message in error and "\n" not in error


@pytest.mark.skipif(subprocess.run(["which", "make"], capture_output=True).returncode, reason="make is not installed")
@pytest.mark.parametrize(
    "target, script, config",
    [("data-wikitext", "prepare_wikitext", "wikitext103"), ("data-code", "prepare_code", "code")],
)
def test_make_data_targets_pass_args_to_the_script(target, script, config):
    dry = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", target, "ARGS=--cache-dir /tmp/elsewhere"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(line for line in dry.stdout.splitlines() if f"data_prep/{script}.py" in line)
    assert line.endswith(f"--config configs/data/{config}.yaml --cache-dir /tmp/elsewhere")
