"""eval-context: a tiny checkpoint scored at 1x and 2x its training context; what cannot be scored says why."""

import os
import signal

import pandas as pd
import pytest
import torch

from cope_pl.cli import main
from cope_pl.data import CopyDataModule
from cope_pl.data.windows import SlidingWindows
from cope_pl.eval_context import evaluate_context, parse_lengths
from cope_pl.lm import LanguageModel
from tests.conftest import fitted_run

DATA = {"seq_len": 8, "batch_size": 16, "num_symbols": 6, "eval_size": 32}


def tiny_run(tmp_path, position, max_seq_len=32, steps=2):
    data_class = "cope_pl.data.CopyDataModule"
    return fitted_run(tmp_path, f"copy-{position}", data_class, DATA, position, steps, max_seq_len=max_seq_len)


def test_scores_one_and_two_times_the_training_context(tmp_path):
    run, trainer, model, dm = tiny_run(tmp_path, "cope")
    rows = evaluate_context(run, ["1x", "2x"], device="cpu")
    assert [(r["seq_len"], r["status"]) for r in rows] == [(8, "ok"), (16, "ok")]
    assert [r["checkpoint_step"] for r in rows] == [2, 2]  # each row names the step of the scored weights
    assert rows[0]["tokens"] == 32 * 4 and rows[1]["tokens"] == 32 * 8  # the copied half is scored
    reference = trainer.test(model, dm, verbose=False)[0]  # at 1x eval-context equals `cope-pl test`
    assert rows[0]["loss"] == pytest.approx(reference["test/loss"], rel=1e-5)
    assert rows[0]["error"] == pytest.approx(reference["test/error"], rel=1e-5)
    assert rows[0]["word_ppl"] is None  # the copy task has no notion of words
    assert (run / "eval_context.json").is_file()


def test_learned_absolute_table_beyond_its_length_is_not_applicable(tmp_path):
    run, *_ = tiny_run(tmp_path, "absolute", max_seq_len=8)
    rows = evaluate_context(tmp_path / "copy-absolute" / "version_0" / "checkpoints" / "last.ckpt", ["8", "16"])
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "n/a" and "learned absolute position table" in rows[1]["reason"]
    assert "loss" not in rows[1]  # never scored with clipped positions


def test_word_perplexity_uses_the_data_tokens_per_word(tmp_path, monkeypatch):
    run, *_ = tiny_run(tmp_path, "rope")
    monkeypatch.setattr(CopyDataModule, "tokens_per_word", {"test": {"": 1.5}}, raising=False)
    row = evaluate_context(run, ["1x"])[0]
    assert row["word_ppl"] == pytest.approx(torch.tensor(row["loss"] * 1.5).exp().item(), rel=1e-6)


def test_stride_needs_a_token_stream(tmp_path):
    run, *_ = tiny_run(tmp_path, "rope")
    with pytest.raises(ValueError, match="token_stream"):
        evaluate_context(run, ["1x"], stride=4)


def test_sliding_windows_score_every_token_once():
    tokens = torch.arange(23)
    windows = SlidingWindows(tokens, seq_len=8, stride=3)
    scored = torch.cat([w["labels"][w["labels"] >= 0] for w in windows])
    assert scored.tolist() == list(range(1, 23))  # every target once, in order
    later = windows[2]["labels"]
    assert (later[:5] < 0).all() and (later[5:] >= 0).all()  # only the last `stride` targets are new


def test_lengths_are_tokens_or_multiples_of_the_training_length():
    assert parse_lengths(["1x", "1.5x", "2x", "100"], 64) == [64, 96, 128, 100]
    with pytest.raises(ValueError, match=">= 1"):
        parse_lengths(["0"], 64)
    with pytest.raises(ValueError, match=r"'0.5q' is neither a number of tokens .* nor a multiple"):
        parse_lengths(["0.5q"], 64)


def test_a_truncated_checkpoint_is_one_error_naming_the_intact_one_and_stays_in_place(tmp_path):
    run, *_ = tiny_run(tmp_path, "rope")
    checkpoints = run / "checkpoints"
    last, intact = checkpoints / "last.ckpt", checkpoints / "kept.ckpt"
    intact.write_bytes(last.read_bytes())
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated; the newest intact checkpoint beside it is kept.ckpt"):
        evaluate_context(run, ["1x"])
    assert last.stat().st_size == 1000  # evaluating moves nothing
    intact.unlink()
    with pytest.raises(ValueError, match="no intact checkpoint is left"):
        evaluate_context(last, ["1x"])


def test_batch_size_shrinks_to_fit_the_logit_memory_budget():
    from cope_pl.eval_context import LOGIT_BYTES_PER_PAIR, fitting_batch_size

    def model_with(position, **options):
        return LanguageModel(
            vocab_size=8, n_layers=1, d_model=16, n_heads=2, position=position, position_options=options
        )

    model = model_with("cope", impl="reference")  # explicit (B, H, T, T) logits
    per_sequence = LOGIT_BYTES_PER_PAIR * 2 * 64 * 64
    assert fitting_batch_size(model, 64, 32, torch.device("cpu"), budget=3.5 * per_sequence) == 3
    assert fitting_batch_size(model, 64, 32, torch.device("cpu"), budget=None) == 32  # no cap on CPU
    assert fitting_batch_size(model_with("alibi"), 64, 32, torch.device("cpu"), budget=3.5 * per_sequence) == 3
    for o_of_t in (model_with("rope"), model_with("cope"), model_with("relative_cope")):  # SDPA or the CoPE op
        assert fitting_batch_size(o_of_t, 64, 32, torch.device("cpu"), budget=1.0) == 32
    with pytest.raises(MemoryError, match="lower --lengths"):
        fitting_batch_size(model, 64, 32, torch.device("cpu"), budget=0.5 * per_sequence)


def test_an_out_of_memory_batch_is_split_and_sums_still_add_up():
    from cope_pl.eval_context import score_batch

    model = LanguageModel(vocab_size=8, n_layers=1, d_model=16, n_heads=2, position="cope").eval()
    batch = {"input_ids": torch.randint(0, 8, (4, 6)), "labels": torch.randint(0, 8, (4, 6))}
    with torch.no_grad():
        whole = score_batch(model, batch, -100)
        forward = model.forward
        model.forward = lambda x: (
            (_ for _ in ()).throw(RuntimeError("CUDA out of memory")) if len(x) > 1 else forward(x)
        )
        split = score_batch(model, batch, -100)
    assert split["tokens"] == whole["tokens"] == 24
    assert split["nll"] == pytest.approx(whole["nll"], rel=1e-5)


# Loss by token position: eval_context_positions.csv


def read_positions(run):
    import pandas as pd

    return pd.read_csv(run / "eval_context_positions.csv", keep_default_na=False, na_values=[""])


def test_loss_by_position_buckets_average_back_to_the_loss_of_each_length(tmp_path):
    run, *_ = tiny_run(tmp_path, "cope")
    rows = evaluate_context(run, ["1x", "2x"], bucket=3)
    positions = read_positions(run)
    assert list(positions.columns) == [
        "run", "position", "rope_scaling", "train_seq_len", "seq_len", "set", "stride", "bucket_start", "bucket_end",
        "tokens", "loss",
    ]  # fmt: skip
    for row in rows:
        buckets = positions[positions.seq_len == row["seq_len"]]
        assert buckets.bucket_start.tolist() == list(range(0, row["seq_len"], 3))  # [start, end): 0..seq_len
        assert buckets.bucket_end.tolist() == [min(s + 3, row["seq_len"]) for s in buckets.bucket_start]
        assert buckets.tokens.sum() == row["tokens"]
        scored = buckets[buckets.tokens > 0]
        assert (scored.loss * scored.tokens).sum() / scored.tokens.sum() == pytest.approx(row["loss"], abs=1e-5)
        assert buckets[buckets.tokens == 0].loss.isna().all()  # the copy prefix is not scored: no loss
    assert (positions.run == rows[0]["run"]).all() and (positions.position == "cope").all()


def test_re_evaluating_a_length_replaces_only_its_position_rows(tmp_path):
    run, *_ = tiny_run(tmp_path, "rope")
    evaluate_context(run, ["1x", "2x"], bucket=3)
    evaluate_context(run, ["2x"], bucket=4)
    positions = read_positions(run)
    assert positions[positions.seq_len == 8].bucket_start.tolist() == [0, 3, 6]  # kept from the first call
    assert positions[positions.seq_len == 16].bucket_start.tolist() == [0, 4, 8, 12]  # replaced, not appended


def test_a_length_the_encoding_cannot_represent_has_no_position_rows(tmp_path):
    run, *_ = tiny_run(tmp_path, "absolute", max_seq_len=8)
    evaluate_context(run, ["8", "16"], bucket=4)
    assert read_positions(run).seq_len.unique().tolist() == [8]


def test_progress_shows_a_line_per_length_on_stderr(tmp_path, capsys):
    run, *_ = tiny_run(tmp_path, "absolute", max_seq_len=8)
    evaluate_context(run, ["8", "16"])
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("[1/2] ") and "seq_len 8: scoring 1 set" in line for line in lines)
    assert any(line.startswith("[1/2] ") and "seq_len 8: done in" in line for line in lines)
    assert any(line.startswith("[2/2] ") and "seq_len 16: n/a" in line for line in lines)


def test_a_sliding_window_evaluation_keeps_its_own_position_rows(tmp_path):
    from cope_pl.eval_positions import save_position_rows

    def rows(stride, loss):
        base = {"run": "r", "position": "cope", "train_seq_len": 8, "seq_len": 16, "set": "", "stride": stride}
        return [{**base, "bucket_start": 0, "bucket_end": 16, "tokens": 10, "loss": loss}]

    save_position_rows(tmp_path, rows(None, 1.0))
    save_position_rows(tmp_path, rows(4, 2.0))
    save_position_rows(tmp_path, rows(None, 3.0))  # replaces the plain rows only
    saved = pd.read_csv(tmp_path / "eval_context_positions.csv")
    assert sorted(zip(saved.stride.fillna(0), saved.loss)) == [(0, 3.0), (4, 2.0)]


def wikitext_run(tmp_path):
    from tests.test_word_count import write_wikitext_dir

    data = {
        "data_dir": str(write_wikitext_dir(tmp_path / "wiki")),
        "cache_dir": str(tmp_path / "cache"),
        "vocab_size": 300,
        "seq_len": 8,
        "batch_size": 3,
        "show_progress": False,
    }
    return fitted_run(tmp_path, "wikitext-rope", "cope_pl.data.WikiTextDataModule", data, "rope", max_seq_len=64)


def test_every_length_scores_the_whole_split_or_the_same_first_tokens(tmp_path):
    run, trainer, model, dm = wikitext_run(tmp_path)
    targets = len(dm.token_stream("test")) - 1  # every token after the first
    rows = evaluate_context(run, ["1x", "2x", "3x"])
    assert [r["tokens"] for r in rows] == [targets] * 3  # each token scored once at every length
    limited = evaluate_context(run, ["1x", "2x", "3x"], limit_tokens=37)
    assert [r["tokens"] for r in limited] == [37] * 3
    assert limited[0]["loss"] != rows[0]["loss"]


@pytest.mark.parametrize("limit", [1, 37, 10_000])
def test_a_token_limit_keeps_the_same_first_targets_at_every_length_and_batch_size(tmp_path, limit):
    from cope_pl.data.windows import EvalWindows
    from cope_pl.eval_context import first_targets

    run, trainer, model, dm = wikitext_run(tmp_path)
    stream = torch.as_tensor(dm.token_stream("test"))
    expected = stream[1 : limit + 1].tolist()
    for seq_len, batch_size in [(8, 3), (16, 1), (24, 5), (40, 2)]:
        loaders = [
            torch.utils.data.DataLoader(EvalWindows(dm.arrays["test"], seq_len), batch_size=batch_size),
            torch.utils.data.DataLoader(SlidingWindows(stream, seq_len, seq_len // 2), batch_size=batch_size),
        ]
        for loader in loaders:
            batches = list(first_targets(loader, limit, -100))
            scored = torch.cat([b["labels"][b["labels"] >= 0] for b in batches])
            assert scored.tolist() == expected, (seq_len, batch_size)


def test_the_removed_batch_limit_names_the_token_limit(tmp_path):
    run, *_ = tiny_run(tmp_path, "rope")
    with pytest.raises(ValueError, match=r"--limit-batches was removed.*use --limit-tokens N") as err:
        main(["eval-context", str(run), "--limit-batches", "2"])
    assert "\n" not in str(err.value)


def test_scoring_goes_on_after_slurms_time_limit_warning(tmp_path):
    """SIGUSR1 (SLURM's warning 90 s before a sweep array task's limit) used to end eval-context and passkey, and
    the step was recorded as failed; the command now finishes its work."""
    run, *_ = tiny_run(tmp_path, "cope")
    before = signal.getsignal(signal.SIGUSR1)
    try:
        main(["eval-context", str(run), "--lengths", "1x"])
        os.kill(os.getpid(), signal.SIGUSR1)  # with the default action this would end the test process
        main(["eval-context", str(run), "--lengths", "2x"])
    finally:
        signal.signal(signal.SIGUSR1, before)
    rows = pd.read_json(run / "eval_context.json")
    assert sorted(rows["seq_len"]) == [8, 16]
