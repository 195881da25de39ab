"""Real LM data: WikiText and code corpora as token arrays, their cache, windows and word-level perplexity.

Most tests use small WikiText-format files and code trees they write themselves; the shared WikiText-2
validation file (../shared beside the checkout) is used where present.
"""

import importlib.util
import json
import math
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from cope_pl.cli import main as cli_main
from cope_pl.data import IGNORE_INDEX, CodeDataModule, WikiTextDataModule
from cope_pl.data.code import split_of
from cope_pl.data.prepare import SPLITS
from cope_pl.data.token_array import TokenArray, read_meta, token_dtype, write_token_array
from cope_pl.data.tokenizer import END_OF_TEXT, load_tokenizer, save_tokenizer, tokenizer_hash, train_bpe
from cope_pl.data.wikitext import detokenize, read_wikitext, split_articles
from cope_pl.data.windows import EvalWindows, RandomWindows
from cope_pl.lm import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
SHARED_WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
needs_shared = pytest.mark.skipif(not SHARED_WIKITEXT.is_file(), reason=f"{SHARED_WIKITEXT} is not present")
WORDS = "the a of in river castle king army lobster species was is were built 1 2 3 , . ( )".split()


def wikitext_article(rng: random.Random, title: str) -> str:
    """One article in WikiText's layout: title, sections, paragraphs, blank lines, Moses-style markers."""
    lines = [" \n", f" = {title} = \n", " \n"]
    for section in range(2):
        if section:
            lines += [f" = = Section {section} = = \n", " \n"]
        words = [rng.choice(WORDS) for _ in range(60)] + ["1", "@,@", "200", "well", "@-@", "known", "3", "@.@", "5"]
        lines += [" " + " ".join(words) + " \n", " \n"]
    return "".join(lines)


def write_wikitext_dir(directory: Path, articles: dict[str, int] | None = None) -> Path:
    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (articles or {"train": 30, "valid": 4, "test": 4}).items():
        text = "".join(wikitext_article(rng, f"{split.title()} article {i}") for i in range(count))
        (directory / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return directory


def wikitext_module(data_dir, cache_dir, **kwargs) -> WikiTextDataModule:
    options = dict(vocab_size=400, seq_len=32, batch_size=8, show_progress=False)
    return WikiTextDataModule(data_dir=str(data_dir), cache_dir=str(cache_dir), **{**options, **kwargs})


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory):
    """A prepared WikiTextDataModule on a small corpus written by the test."""
    root = tmp_path_factory.mktemp("wikitext")
    dm = wikitext_module(write_wikitext_dir(root / "wt"), root / "cache")
    dm.prepare_data()
    dm.setup("fit")
    return dm


# Reading the WikiText format


def test_wikitext_reader_keeps_every_line_in_order(tmp_path):
    path = write_wikitext_dir(tmp_path, {"valid": 3}) / "wiki.valid.tokens"
    assert "".join(read_wikitext(path)) == path.read_text(encoding="utf-8")


def test_articles_start_at_top_level_titles_only(tmp_path):
    path = write_wikitext_dir(tmp_path, {"valid": 3}) / "wiki.valid.tokens"
    articles = split_articles(list(read_wikitext(path)))
    titles = [next(line for line in a if line.strip()) for a in articles]
    assert titles == [f" = Valid article {i} = \n" for i in range(3)]
    assert all(sum(line.startswith(" = = ") for line in a) == 1 for a in articles[:3])  # sections stay inside


def test_detokenize_undoes_moses_markers():
    assert detokenize(" 1 @,@ 200 well @-@ known 3 @.@ 5 ") == " 1,200 well-known 3.5 "


@needs_shared
def test_shared_wikitext_file_reads_as_wikitext():
    lines = list(read_wikitext(SHARED_WIKITEXT))
    assert len(lines) == 3760 and sum(len(line.split()) for line in lines) == 213_886  # its README's counts
    assert len(split_articles(lines)) > 50


# Tokenizer


def test_tokenizer_train_save_load_round_trip(tmp_path):
    text = (ROOT / "README.md").read_text()
    tokenizer = train_bpe(text.splitlines(keepends=True), vocab_size=500, show_progress=False)
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.get_vocab_size() <= 500 and loaded.token_to_id(END_OF_TEXT) is not None
    assert loaded.encode(text).ids == tokenizer.encode(text).ids
    assert loaded.decode(loaded.encode(text).ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert tokenizer_hash(load_tokenizer(tmp_path / "tokenizer.json")) == tokenizer_hash(loaded)


def test_token_dtype_widens_past_uint16():
    assert token_dtype(50257) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


# Token arrays and their counts


def test_token_arrays_decode_back_to_the_text(wikitext):
    tokenizer = load_tokenizer(wikitext.directory / "tokenizer.json")
    for split in SPLITS:
        meta = read_meta(wikitext.directory, split)
        tokens = TokenArray(wikitext.directory / f"{split}.bin", meta["dtype"], meta["num_tokens"]).tokens
        text = Path(wikitext.data_dir, f"wiki.{split}.tokens").read_text(encoding="utf-8")
        assert tokenizer.decode(tokens.tolist()) == text


def test_word_counts_equal_the_whitespace_count(wikitext):
    for split in SPLITS:
        text = Path(wikitext.data_dir, f"wiki.{split}.tokens").read_text(encoding="utf-8")
        assert read_meta(wikitext.directory, split)["words"] == len(text.split())


def test_detokenized_arrays_keep_the_original_word_count(wikitext, tmp_path):
    dm = wikitext_module(wikitext.data_dir, tmp_path, detokenize=True)
    dm.prepare_data()
    tokenizer = load_tokenizer(dm.directory / "tokenizer.json")
    meta = read_meta(dm.directory, "valid")
    text = Path(wikitext.data_dir, "wiki.valid.tokens").read_text(encoding="utf-8")
    tokens = TokenArray(dm.directory / "valid.bin", meta["dtype"], meta["num_tokens"]).tokens
    assert tokenizer.decode(tokens.tolist()) == detokenize(text) and "@-@" not in detokenize(text)
    assert meta["words"] == len(text.split())


# Windows


@pytest.mark.parametrize("seq_len", [7, 16, 50])
def test_eval_windows_score_every_token_exactly_once(tmp_path, seq_len):
    write_token_array(tmp_path, "valid", [np.arange(100) % 97], 100, {})
    windows = EvalWindows(TokenArray(tmp_path / "valid.bin", "uint16", 100), seq_len)
    positions = []
    for k in range(len(windows)):
        item = windows[k]
        assert item["input_ids"].shape == item["labels"].shape == (seq_len,)
        scored = (item["labels"] != IGNORE_INDEX).nonzero().flatten()
        positions += (k * seq_len + 1 + scored).tolist()  # label t of window k is token k*seq_len + t + 1
        assert item["labels"][scored].tolist() == [(k * seq_len + 1 + int(t)) % 97 for t in scored]
    assert sorted(positions) == list(range(1, 100))


def test_random_windows_are_fixed_by_index_and_stay_inside(tmp_path):
    write_token_array(tmp_path, "train", [np.arange(1000)], 1000, {})
    windows = RandomWindows(TokenArray(tmp_path / "train.bin", "uint16", 1000), 32, num_samples=50, seed=1)
    starts = [int(windows[i]["input_ids"][0]) for i in range(50)]
    assert starts == [int(windows[i]["input_ids"][0]) for i in range(50)]  # same index, same window
    assert len(set(starts)) > 40 and all(0 <= s <= 1000 - 33 for s in starts)
    item = windows[3]
    assert item["labels"].tolist() == (item["input_ids"] + 1).tolist()  # contiguous next tokens


def test_eval_sets_are_named_by_context_length(wikitext):
    dm = wikitext_module(wikitext.data_dir, wikitext.cache_dir, eval_seq_lens=[64, 32, 64])
    dm.setup("fit")
    assert dm.eval_names == ["", "64"]
    assert len(dm.test_sets["64"]) == math.ceil((read_meta(dm.directory, "test")["num_tokens"] - 1) / 64)
    assert dm.tokens_per_word["val"][""] == dm.tokens_per_word["val"]["64"] != dm.tokens_per_word["test"][""]


def test_token_stream_is_the_whole_split_the_windows_read(wikitext):
    dm = wikitext_module(wikitext.data_dir, wikitext.cache_dir)
    dm.setup("test")
    stream = dm.token_stream("test")
    assert len(stream) == read_meta(dm.directory, "test")["num_tokens"] and stream.dtype == np.int64
    first = dm.test_sets[""][0]
    assert first["input_ids"].tolist() == stream[: dm.seq_len].tolist()


# Cache


def test_another_seq_len_reuses_the_prepared_arrays(wikitext):
    longer = read_meta(wikitext.directory, "train")["num_tokens"] + 1  # longer than any training window
    dm = wikitext_module(wikitext.data_dir, wikitext.cache_dir, seq_len=longer)
    stats = dm.prepare_data()
    assert stats.built == [] and dm.directory == wikitext.directory
    dm.setup("test")  # evaluation alone needs no training windows
    assert dm.test_dataloader()[0].dataset.seq_len == longer


def test_changed_tokenizer_is_refused_by_setup_then_rebuilt_by_prepare(wikitext, tmp_path):
    dm = wikitext_module(wikitext.data_dir, tmp_path)
    assert dm.prepare_data().built == list(SPLITS)
    retrained = train_bpe(["something else entirely " * 50], vocab_size=300, show_progress=False)
    save_tokenizer(retrained, dm.directory / "tokenizer.json")
    with pytest.raises(ValueError, match=r"train.json was written for another tokenizer_hash"):
        dm.setup("fit")
    assert dm.prepare_data().built == list(SPLITS)
    dm.setup("fit")


def test_changed_source_file_gets_its_own_cache(tmp_path):
    data = write_wikitext_dir(tmp_path / "wt")
    first = wikitext_module(data, tmp_path / "cache").prepare_data().directory
    with open(data / "wiki.test.tokens", "a", encoding="utf-8") as f:
        f.write(" one more paragraph \n")
    second = wikitext_module(data, tmp_path / "cache")
    assert second.directory != first and second.prepare_data().built == list(SPLITS)


def test_half_written_array_is_never_used(tmp_path):
    def failing_chunks():
        yield np.arange(10)
        raise KeyboardInterrupt

    write_token_array(tmp_path, "valid", [np.arange(10)], 100, {"tokenizer_hash": "old"})
    with pytest.raises(KeyboardInterrupt):
        write_token_array(tmp_path, "valid", failing_chunks(), 100, {"tokenizer_hash": "new"})
    assert read_meta(tmp_path, "valid") is None  # the old metadata went first, the new never came
    assert sorted(p.name for p in tmp_path.iterdir()) == ["valid.bin"]  # no temporary file left behind


# Bad input


def test_missing_directory_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.data_dir=.*nowhere does not exist; put wiki.train.tokens"):
        wikitext_module(tmp_path / "nowhere", tmp_path).prepare_data()


def test_empty_directory_names_the_expected_files(tmp_path):
    (tmp_path / "wt").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no train split: expected one of wiki.train.tokens"):
        wikitext_module(tmp_path / "wt", tmp_path).prepare_data()


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("just some text\nwithout headings\n", "does not look like WikiText"),
        (b"\xff\xfe\x00binary", "is not UTF-8 text"),
    ],
)
def test_file_in_the_wrong_format_is_named(tmp_path, content, message):
    data = write_wikitext_dir(tmp_path / "wt")
    path = data / "wiki.train.tokens"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=f"wiki.train.tokens {message}"):
        wikitext_module(data, tmp_path / "cache").prepare_data()


def test_supplied_tokenizer_file_is_used_and_sets_the_vocabulary(wikitext, tmp_path):
    supplied = wikitext.directory / "tokenizer.json"
    dm = wikitext_module(wikitext.data_dir, tmp_path, tokenizer_file=str(supplied), vocab_size=999)
    stats = dm.prepare_data()
    assert stats.directory.name.startswith("file-") and (stats.directory / "tokenizer.json").read_bytes() == (
        supplied.read_bytes()
    )
    assert dm.vocab_size == load_tokenizer(supplied).get_vocab_size() != 999
    assert stats.splits["valid"]["num_tokens"] == read_meta(wikitext.directory, "valid")["num_tokens"]


def test_missing_tokenizer_file_is_named(tmp_path):
    dm = wikitext_module(write_wikitext_dir(tmp_path / "wt"), tmp_path, tokenizer_file=str(tmp_path / "gpt2.json"))
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer_file=.*gpt2.json does not exist"):
        dm.prepare_data()


def test_tokenizer_file_in_the_wrong_format_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer.json is not a Hugging Face tokenizers file"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_unprepared_data_asks_to_prepare(tmp_path):
    dm = wikitext_module(write_wikitext_dir(tmp_path / "wt"), tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing; prepare the data first"):
        dm.setup("fit")


def test_vocabulary_larger_than_the_model_is_refused(wikitext):
    model = LanguageModel(vocab_size=300, n_layers=1, d_model=16, n_heads=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1)
    message = r"tokenizer.json has 3\d\d tokens but model.vocab_size=300; leave model.vocab_size unset"
    with pytest.raises(ValueError, match=message):
        trainer.validate(model, wikitext)


def test_hub_without_network_explains_the_offline_route(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"Without network, run data_prep/prepare_wikitext.py .* data.data_dir"):
        WikiTextDataModule(cache_dir=str(tmp_path), vocab_size=300, show_progress=False).prepare_data()


# Code


def write_code_tree(root: Path, files: int = 60) -> Path:
    for i in range(files):
        path = root / f"pkg{i % 3}" / f"module_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def function_{i}(x):\n    return x * {i} + len(str(x))\n\n\nprint(function_{i}(3))\n")
    (root / "notes.txt").write_text("not python")
    return root


def test_code_files_split_by_a_stable_path_hash():
    splits = [split_of(f"pkg/module_{i}.py", 0.1, 0.1) for i in range(2000)]
    assert splits == [split_of(f"pkg/module_{i}.py", 0.1, 0.1) for i in range(2000)]
    assert 150 < splits.count("valid") < 250 and 150 < splits.count("test") < 250
    assert split_of("pkg/module_7.py", 0.1, 0.1) == "train"  # fixed across processes and machines (sha256)


def test_code_arrays_decode_to_the_files_joined_by_end_of_text(tmp_path):
    tree = write_code_tree(tmp_path / "src")
    dm = CodeDataModule(source="paths", paths=[str(tree)], vocab_size=300, cache_dir=str(tmp_path / "c"))
    dm.prepare_data()
    tokenizer = load_tokenizer(dm.directory / "tokenizer.json")
    for split in SPLITS:
        files = [p for k, p in dm.source.files.items() if split_of(k, 0.05, 0.05) == split]
        meta = read_meta(dm.directory, split)
        tokens = TokenArray(dm.directory / f"{split}.bin", meta["dtype"], meta["num_tokens"]).tokens
        expected = "".join(p.read_text() + END_OF_TEXT for p in files)
        assert tokenizer.decode(tokens.tolist(), skip_special_tokens=False) == expected
        assert meta["words"] == len(expected.replace(END_OF_TEXT, " ").split())
    assert all(p.suffix == ".py" for p in dm.source.files.values())


def test_stdlib_code_corpus_builds(tmp_path):
    dm = CodeDataModule(max_files=60, vocab_size=512, seq_len=64, cache_dir=str(tmp_path), show_progress=False)
    stats = dm.prepare_data()
    assert all(stats.splits[s]["num_tokens"] > 64 for s in SPLITS)
    assert any(key.startswith("python3") and key.endswith(".py") for key in dm.source.files)
    dm.setup("fit")
    assert len(dm.val_dataloader()[0]) >= 1


def test_bad_code_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.paths entry .*nothing\*.py' is not a directory"):
        CodeDataModule(source="paths", paths=[str(tmp_path / "nothing*.py")], cache_dir=str(tmp_path)).prepare_data()
    with pytest.raises(ValueError, match="data.source must be one of"):
        CodeDataModule(source="github").prepare_data()


# Training and word-level perplexity


def fit(dm, steps: int = 25) -> tuple[float, float, L.Trainer]:
    """Validation loss of an untrained and of a briefly trained tiny model on the same batches."""
    L.seed_everything(0)
    model = LanguageModel(vocab_size=dm.vocab_size, n_layers=1, d_model=32, n_heads=2, max_seq_len=64, lr=3e-3)
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(
        max_steps=steps,
        limit_val_batches=2,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        **options,
    )
    before = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, dm)
    return before, float(trainer.callback_metrics["val/loss"]), trainer


@needs_shared
def test_smoke_fit_on_shared_wikitext_lowers_loss_and_logs_word_ppl(tmp_path):
    dm = WikiTextDataModule(
        data_dir=str(SHARED_WIKITEXT), vocab_size=512, seq_len=64, batch_size=16, cache_dir=str(tmp_path)
    )
    before, after, trainer = fit(dm)
    assert after < before - 0.5, (before, after)
    ratio = dm.tokens_per_word["val"][""]
    assert 1.0 < ratio < 3.0  # a 512-token BPE splits a word into a few tokens
    word_ppl = trainer.callback_metrics["val/word_ppl"].item()
    torch.testing.assert_close(word_ppl, math.exp(after * ratio), rtol=1e-4, atol=0)  # exp(NLL sum / words)


def test_smoke_fit_on_stdlib_code_lowers_loss(tmp_path):
    dm = CodeDataModule(max_files=60, vocab_size=512, seq_len=64, batch_size=16, cache_dir=str(tmp_path))
    before, after, _ = fit(dm)
    assert after < before - 0.5, (before, after)


def test_cli_code_smoke_config_trains_and_reports_perplexity(tmp_path):
    args = ["fit", "--config", str(ROOT / "configs/trainer/smoke.yaml"), "--config"]
    args += [str(ROOT / "configs/data/code_smoke.yaml"), "--config", str(ROOT / "configs/model/tiny.yaml")]
    args += ["--data.init_args.max_files=60", f"--data.init_args.cache_dir={tmp_path / 'cache'}"]
    args += ["--data.init_args.eval_seq_lens=[256]", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    cli_main(args)
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["model"]["vocab_size"] == 2048  # linked from data.vocab_size
    assert {"val/ppl", "val/ppl@256"} <= set(results["metrics"])
    assert not any("word_ppl" in key for key in results["metrics"])  # code: token perplexity only, unless asked


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data_prep" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_prep_script_prepares_what_the_data_module_reads(tmp_path, capsys):
    data = write_wikitext_dir(tmp_path / "wt")
    script = load_script("prepare_wikitext")
    script.main(["--data-dir", str(data), "--vocab-size", "400", "--cache-dir", str(tmp_path / "cache")])
    assert "tokens/s" in capsys.readouterr().out
    assert wikitext_module(data, tmp_path / "cache").prepare_data().built == []  # reused, nothing rebuilt


@pytest.mark.parametrize("word_count", [None, "merity"], ids=["default", "asked"])
def test_code_runs_report_token_perplexity_only_unless_asked(tmp_path, word_count):
    import lightning as L

    from cope_pl.lm import LanguageModel

    options = {} if word_count is None else {"word_count": word_count}
    tree = write_code_tree(tmp_path / "src")
    dm = CodeDataModule(
        source="paths", paths=[str(tree)], vocab_size=300, seq_len=32, batch_size=2, cache_dir=str(tmp_path / "c"),
        show_progress=False, **options,
    )  # fmt: skip
    summary = dm.prepare_data().summary()
    model = LanguageModel(vocab_size=dm.vocab_size, n_layers=1, d_model=16, n_heads=2, position="rope")
    trainer = L.Trainer(accelerator="cpu", logger=False, limit_val_batches=1, enable_progress_bar=False)
    (metrics,) = trainer.validate(model, dm, verbose=False)
    assert "val/ppl" in metrics
    assert ("val/word_ppl" in metrics) == (word_count is not None)
    assert ("W (none)" in summary) == (word_count is None)
