"""The paper's synthetic tasks: generators are valid, deterministic and disjoint; only answers are scored."""

import importlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from cope_pl.cli import main
from cope_pl.data import IGNORE_INDEX, CountingDataModule, FlipFlopDataModule, SelectiveCopyDataModule
from cope_pl.data.counting import OFFICIAL_VOCAB, VOCAB
from cope_pl.data.flipflop import BOS, decode, flipflop_tokens
from cope_pl.data.selective_copy import BLANK, SEP
from cope_pl.lm import LanguageModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def flipflop_text(item) -> str:
    """The full flip-flop string back from an example (inputs plus the last label)."""
    return decode(torch.cat([item["input_ids"], item["labels"][-1:]]))


def reads_repeat_last_write(text: str) -> bool:
    last = None
    for instr, bit in zip(text[::2], text[1::2]):
        if instr == "w":
            last = bit
        elif instr == "r" and bit != last:
            return False
    return True


# Flip-Flop


def test_flipflop_reads_repeat_the_last_written_bit():
    dm = FlipFlopDataModule(seq_len=64, eval_size=50)
    dm.setup("fit")
    for dataset in [dm.train_set, *dm.eval_sets.values()]:
        for index in range(50):
            text = flipflop_text(dataset[index])
            assert len(text) == 64 and text[0] == "w" and text[-2] == "r"
            assert reads_repeat_last_write(text)


@pytest.mark.parametrize("p_ignore", [0.1, 0.8, 0.98])
def test_flipflop_instruction_mix_matches_p_ignore(p_ignore):
    tokens = flipflop_tokens(20_000, p_ignore, torch.Generator().manual_seed(0))
    instr = decode(tokens)[2:-2:2]  # the drawn instructions (first w and last r are fixed)
    assert instr.count("i") / len(instr) == pytest.approx(p_ignore, abs=0.01)
    assert instr.count("w") / len(instr) == pytest.approx((1 - p_ignore) / 2, abs=0.01)


def test_flipflop_scores_only_the_bits_after_r():
    dm = FlipFlopDataModule(seq_len=32)
    dm.setup("fit")
    item = dm.train_set[0]
    assert item["input_ids"][0] == BOS and len(item["input_ids"]) == 32
    scored = (item["labels"] != IGNORE_INDEX).nonzero().flatten()
    assert len(scored) == flipflop_text(item)[::2].count("r")
    assert all(decode(item["input_ids"][t : t + 1]) == "r" for t in scored.tolist())


def test_flipflop_is_deterministic_per_seed_and_splits_differ():
    a, b, c = (FlipFlopDataModule(seq_len=64, seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.train_set[5]["input_ids"], b.train_set[5]["input_ids"])
    assert not torch.equal(a.train_set[5]["input_ids"], c.train_set[5]["input_ids"])
    train = {flipflop_text(a.train_set[i]) for i in range(500)}
    in_dist = {flipflop_text(a.eval_sets["in_dist"][i]) for i in range(500)}
    assert not train & in_dist


def test_flipflop_test_stage_uses_other_sequences_than_validation():
    dm = FlipFlopDataModule(seq_len=64)
    dm.setup("fit")
    val = dm.eval_sets["in_dist"][0]["input_ids"]
    dm.setup("test")
    assert not torch.equal(val, dm.eval_sets["in_dist"][0]["input_ids"])


def test_flipflop_reads_synthseq_parquet_splits(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    texts = {
        "train": ["w1i0i1r1", "w0w1r1r1"],
        "val": ["w0i1r0r0"],
        "val_dense": ["w1w0w1r1"],
        "val_sparse": ["w1i1i0r1"],
    }
    for split, rows in texts.items():
        pd.DataFrame({"text": rows}).to_parquet(tmp_path / f"{split}.parquet")
    dm = FlipFlopDataModule(seq_len=8, source=str(tmp_path))
    dm.setup("fit")
    assert [flipflop_text(dm.train_set[i]) for i in range(2)] == texts["train"]
    assert flipflop_text(dm.eval_sets["ood_dense"][0]) == "w1w0w1r1"
    assert flipflop_text(dm.eval_sets["in_dist"][0]) == "w0i1r0r0"
    assert (dm.eval_sets["in_dist"][0]["labels"] != IGNORE_INDEX).sum() == 2  # the bits after the two r


def test_flipflop_source_without_splits_is_reported(tmp_path):
    dm = FlipFlopDataModule(seq_len=8, source=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train.parquet"):
        dm.setup("fit")


# Selective copy


def test_selective_copy_answer_is_the_non_blank_tokens_in_order():
    dm = SelectiveCopyDataModule(num_tokens=4, num_symbols=5, num_blanks=12, dense_blanks=6, sparse_blanks=20)
    dm.setup("fit")
    for name, blanks in {"in_dist": 12, "ood_dense": 6, "ood_sparse": 20}.items():
        item = dm.eval_sets[name][3]
        tokens = torch.cat([item["input_ids"], item["labels"][-1:]]).tolist()
        region, sep, answer = tokens[: 4 + blanks], tokens[4 + blanks], tokens[4 + blanks + 1 :]
        assert sep == SEP and region.count(BLANK) == blanks
        assert answer == [t for t in region if t != BLANK]
        assert item["labels"][: 4 + blanks].eq(IGNORE_INDEX).all()  # only the answer is scored
        assert item["labels"][4 + blanks :].tolist() == answer


def test_selective_copy_is_deterministic_and_train_differs_from_test():
    a, b = SelectiveCopyDataModule(num_tokens=4, num_blanks=16), SelectiveCopyDataModule(num_tokens=4, num_blanks=16)
    a.setup("fit"), b.setup("test")
    assert torch.equal(a.train_set[7]["input_ids"], b.train_set[7]["input_ids"])
    train = {tuple(a.train_set[i]["input_ids"].tolist()) for i in range(300)}
    test = {tuple(b.eval_sets["in_dist"][i]["input_ids"].tolist()) for i in range(300)}
    assert not train & test


# Counting


def interpret(words: list[str]) -> int:
    """An independent interpreter for counting programs: run the statements, return the printed value."""
    values: dict[str, int] = {}
    statements = " ".join(words).split(";")
    *body, last = statements
    for statement in body:
        match statement.split():
            case [var, "=", value]:
                values[var] = int(value)
            case [var, "++"]:
                values[var] += 1
            case ["pass"]:
                pass
            case other:
                raise AssertionError(f"unexpected statement {other}")
    _, var = last.split()
    return values[var]


def program_words(item) -> tuple[list[str], str]:
    ids = item["input_ids"][item["input_ids"] != 0].tolist()
    answer = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert len(answer) == 1
    return [VOCAB[i] for i in ids], VOCAB[answer[0]]


@pytest.mark.parametrize("num_vars", [1, 3, 5])
def test_counting_answers_match_an_independent_interpreter(num_vars):
    dm = CountingDataModule(num_vars=num_vars, max_steps=40, ood_max_steps=80, train_size=200, eval_size=50)
    dm.setup("fit")
    for dataset in [dm.train_set, *dm.eval_sets.values()]:
        for index in range(len(dataset)):
            words, answer = program_words(dataset[index])
            assert words[-2] == "print" and set(words) & set("abcde") <= set("abcde"[:num_vars])
            assert int(answer) == interpret(words) <= 10


def test_counting_ood_programs_are_longer_than_training():
    dm = CountingDataModule(max_steps=20, ood_max_steps=40, train_size=200, eval_size=50)
    dm.setup("fit")
    statements = [sum(VOCAB[i] == ";" for i in dm.eval_sets["ood_long"][k]["input_ids"]) for k in range(50)]
    train = [sum(VOCAB[i] == ";" for i in dm.train_set[k]["input_ids"]) for k in range(200)]
    assert min(statements) > 20 >= max(train) and max(statements) <= 40 and min(train) >= 3


def test_official_tokens_fuse_pass_and_increment_with_their_semicolon():
    separate = CountingDataModule(num_vars=3, max_steps=40, ood_max_steps=80, train_size=200, eval_size=20)
    official = CountingDataModule(
        num_vars=3, max_steps=40, ood_max_steps=80, train_size=200, eval_size=20, tokens="official"
    )
    separate.setup("fit"), official.setup("fit")
    assert official.vocab_size == len(VOCAB) + 2 and separate.vocab_size == len(VOCAB)
    statements = tokens = 0
    for a, b in zip(separate.train_set.programs, official.train_set.programs):
        spaced = " ".join(b).replace("pass;", "pass ;").replace("++;", "++ ;").split()
        assert spaced == list(a)  # the same program, only tokenised differently
        ids = official.train_set[0]["input_ids"]
        assert int(ids.max()) < official.vocab_size and OFFICIAL_VOCAB[int(ids[0])] in ("a", "b", "c", "pass;")
        statements += a.count(";")
        tokens += len(b) - 3  # without `print x answer`
    assert 1.1 < tokens / statements < 1.3  # the official text's ~1.17 tokens per statement (ours: ~2.2)


def test_counting_is_deterministic_and_test_programs_are_not_in_training():
    a = CountingDataModule(max_steps=10, ood_max_steps=20, train_size=300, eval_size=100)
    b = CountingDataModule(max_steps=10, ood_max_steps=20, train_size=300, eval_size=100)
    a.setup("fit"), b.setup("test")
    assert a.train_set.programs == b.train_set.programs
    assert not set(a.train_set.programs) & (set(a.eval_sets["in_dist"].programs) | set(b.eval_sets["in_dist"].programs))
    assert a.eval_sets["in_dist"].programs != b.eval_sets["in_dist"].programs


def test_counting_scores_only_the_answer_and_pads_after_it():
    dm = CountingDataModule(max_steps=30, ood_max_steps=60, train_size=50, eval_size=10)
    dm.setup("fit")
    batch = torch.stack([dm.train_set[i]["labels"] for i in range(50)])
    assert (batch != IGNORE_INDEX).sum(1).eq(1).all()
    item = dm.train_set[0]
    answer_at = int((item["labels"] != IGNORE_INDEX).nonzero())
    assert VOCAB[item["input_ids"][answer_at - 1]] == "print"
    assert item["input_ids"][answer_at + 1 :].eq(0).all()  # right padding, never seen by the answer


# Training


@pytest.mark.parametrize(
    "dm",
    [
        FlipFlopDataModule(seq_len=32, batch_size=32, eval_size=64),
        SelectiveCopyDataModule(
            batch_size=32, num_tokens=4, num_symbols=4, num_blanks=8, dense_blanks=4, sparse_blanks=16, eval_size=64
        ),
        CountingDataModule(batch_size=32, max_steps=12, ood_max_steps=24, train_size=2000, eval_size=64),
    ],
    ids=["flipflop", "selective_copy", "counting"],
)
def test_a_few_steps_lower_the_answer_loss(dm):
    L.seed_everything(0)
    model = LanguageModel(
        vocab_size=dm.vocab_size,
        n_layers=2,
        d_model=32,
        n_heads=2,
        max_seq_len=128,
        position="cope",
        lr=3e-3,
        warmup_steps=5,
    )
    trainer = L.Trainer(
        max_steps=60,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=2,
        val_check_interval=60,
        check_val_every_n_epoch=None,
    )
    before = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, dm)
    assert trainer.callback_metrics["val/loss"] < before - 0.1
    assert {f"val/error@{name}" for name in dm.eval_names} <= set(trainer.callback_metrics)


def test_cli_flipflop_run_writes_named_errors_to_results(tmp_path):
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "trainer/smoke.yaml"),
            "--config",
            str(CONFIGS / "data/flipflop_cpu.yaml"),
            "--config",
            str(CONFIGS / "model/tiny.yaml"),
            "--config",
            str(CONFIGS / "position/cope.yaml"),
            "--data.init_args.eval_size=32",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    results = json.loads((tmp_path / "flipflop-cope" / "version_0" / "results.json").read_text())
    for name in ("in_dist", "ood_dense", "ood_sparse"):
        assert 0 <= results["metrics"][f"val/error@{name}"] <= 1
    assert results["data"]["class"] == "FlipFlopDataModule"


def is_task_config(path: Path) -> bool:
    """A synthetic task's data config (the corpora's CPU configs read files and are tested in test_lm_data.py)."""
    class_path = yaml.safe_load(path.read_text())["data"]["class_path"]
    return class_path.rsplit(".", 1)[-1] not in ("WikiTextDataModule", "CodeDataModule")


CPU_CONFIGS = sorted(p for p in (CONFIGS / "data").glob("*_cpu.yaml") if is_task_config(p))
PAPER_CONFIGS = {"flipflop": "toy_task", "selective_copy": "toy_task"}
PAPER_CONFIGS |= {f"counting_{n}var": "counting" for n in (1, 3, 5)}


@pytest.mark.parametrize("config", CPU_CONFIGS, ids=lambda p: p.stem)
def test_every_cpu_task_config_trains_a_step(tmp_path, config):
    main(
        ["fit", "--config", str(config), "--config", str(CONFIGS / "model/task_cpu.yaml"), "--model.position=cope"]
        + ["--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
        + ["--data.init_args.batch_size=2", "--data.init_args.train_size=64", "--data.init_args.eval_size=2"]
        + ["--trainer.default_root_dir", str(tmp_path)]
    )


@pytest.mark.parametrize("data, model", PAPER_CONFIGS.items())
def test_paper_task_configs_fit_their_model(data, model):
    """Paper-scale sets are too long for a CPU test step; check that every set fits the model's max_seq_len."""
    data_config = yaml.safe_load((CONFIGS / "data" / f"{data}.yaml").read_text())["data"]
    max_seq_len = yaml.safe_load((CONFIGS / "model" / f"{model}.yaml").read_text())["model"]["max_seq_len"]
    module, name = data_config["class_path"].rsplit(".", 1)
    init_args = data_config["init_args"] | {"train_size": 16, "eval_size": 16}
    dm = getattr(importlib.import_module(module), name)(**init_args)
    dm.setup("fit")
    for dataset in [dm.train_set, *dm.eval_sets.values()]:
        assert len(dataset[0]["input_ids"]) <= max_seq_len


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: FlipFlopDataModule(seq_len=63), "even number >= 4 for flip-flop"),
        (lambda: FlipFlopDataModule(p_sparse=1.0), r"data.p_sparse must be in \[0, 1\)"),
        (lambda: SelectiveCopyDataModule(num_tokens=0), "data.num_tokens and data.num_symbols must be >= 1"),
        (lambda: CountingDataModule(num_vars=6), "data.num_vars must be between 1 and 5"),
        (lambda: CountingDataModule(tokens="words"), "data.tokens must be one of"),
        (lambda: CountingDataModule(max_steps=64, ood_max_steps=32), "max_steps < ood_max_steps"),
    ],
)
def test_bad_task_option_is_reported(make, message):
    with pytest.raises(ValueError, match=message):
        make()
