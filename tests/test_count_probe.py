"""`cope-pl count-probe`: what a Counting run's CoPE heads count."""

import pandas as pd
import pytest
import torch

from cope_pl.count_probe import KINDS, main, probe, program_facts
from cope_pl.data.counting import OFFICIAL_VOCAB, CountingPrograms
from tests.conftest import fitted_run, tiny_model

# a set twice, b set once; a incremented twice after its last set, b once; printed: a = 2
PROGRAM = "a = 0 ; a ++; a = 0 ; b = 0 ; a ++; pass; b ++; a ++; print a 2".split()
COUNTING = "cope_pl.data.CountingDataModule"
DATA = dict(
    batch_size=4, num_vars=3, tokens="official", min_steps=3, max_steps=8, ood_max_steps=12, train_size=32, eval_size=8
)


def test_program_facts_find_the_last_set_the_answer_and_each_tokens_kind():
    f = program_facts(PROGRAM)
    assert (f["query"], f["key"], f["answer"]) == (22, 6, 2)  # the `a` after print; the second `a = 0 ;`
    kinds = dict(enumerate(f["kinds"]))
    assert kinds[15] == "printed_increments" and kinds[14] == "printed_letter"
    assert kinds[18] == "other_increments" and kinds[17] == "other_letters"
    assert kinds[16] == "no_ops" and kinds[7] == "rest" and kinds[21] == "rest"  # `=`, `print`
    assert len(f["kinds"]) == 23


def test_a_program_whose_answer_is_not_its_count_is_refused():
    with pytest.raises(ValueError, match="answer 3 is not its increments of a"):
        program_facts(PROGRAM[:-1] + ["3"])


def test_probe_reads_every_head_and_the_first_layer_cannot_tell_the_variables_increments_apart():
    # Without a position encoding in the embeddings, a first-layer key of `++;` is the same token embedding
    # whichever letter precedes it, and so is the query of programs printing the same letter: its gate (and the
    # selectivity) is the same for every variable.
    torch.manual_seed(0)
    model = tiny_model("cope", vocab_size=len(OFFICIAL_VOCAB), max_seq_len=256).eval()
    programs = CountingPrograms(48, num_vars=3, min_steps=60, max_steps=120, seed=1, official=True).programs
    programs = [p for p in programs if p[-2] == "a"]
    assert len(programs) >= 8
    table = probe(model, programs, batch_size=5)
    assert list(table[["layer", "head"]].itertuples(index=False, name=None)) == [
        (l, h) for l in (0, 1) for h in range(4)
    ]
    gates = table[[f"gate_{k}" for k in KINDS]].to_numpy()
    assert ((gates >= 0) & (gates <= 1)).all()
    assert table.loc[table.layer == 0, "selectivity"].abs().max() < 1e-6
    assert table.loc[table.layer == 1, "selectivity"].abs().max() > 1e-4  # keys there have seen their letter
    assert ((table.r2_answer >= 0) & (table.r2_answer <= 1)).all()


def test_count_probe_writes_its_table_beside_the_run_and_refuses_runs_without_cope(tmp_path):
    run = fitted_run(tmp_path, "counting-cope", COUNTING, DATA, "cope")[0]
    main([str(run), "--programs", "6"])
    table = pd.read_csv(run / "count_probe" / "count_probe.csv")
    assert len(table) == 2 and (run / "count_probe" / "count_probe.md").read_text().startswith("# counting-cope")
    rel = fitted_run(tmp_path, "counting-relative", COUNTING, DATA, "relative")[0]
    with pytest.raises(SystemExit, match="no CoPE term"):
        main([str(rel)])
    with pytest.raises(SystemExit, match="--set must be one of"):
        main([str(run), "--set", "valid"])
    copy = fitted_run(tmp_path, "copy-cope", "cope_pl.data.CopyDataModule", dict(batch_size=4), "cope")[0]
    with pytest.raises(SystemExit, match="is not a Counting run"):
        main([str(copy)])
