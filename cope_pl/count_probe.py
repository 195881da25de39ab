"""What a Counting run's CoPE heads count (paper Table 3): `cope-pl count-probe RUN`.

A program's answer is the printed variable's increments since its last set. At the scored query (the printed
variable, whose next token is the answer) a head that counts them opens its gates on that variable's increment
tokens (`++;`, or `++`) and not on the other variables', so its position p on the first token of the last set
follows the answer. For each layer and head this reads, over the run's test programs and the keys from that set
to the query, the mean gate at the query per kind of key (token-weighted): the printed letter, the other letters,
the printed variable's increments, the other variables', no-ops (`pass;`, or `pass`) and the rest (`=`, `0`,
`;`, `print`); the selectivity (printed increments' gate minus the others'); and how well p at the set follows
the answer (R² of a least-squares line), its mean and the share of those p at the clamp. A gate that tells the
printed variable's `++;` from the others' needs the letter before it carried into that token's key, which a
first layer cannot have done (no position encoding enters the embeddings of a CoPE model).

Writes count_probe.csv and count_probe.md (one row per layer and head) in <run>/count_probe/ or --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from cope_pl.bench.table_files import write
from cope_pl.data.counting import LETTERS, TOKEN_ID, CountingDataModule
from cope_pl.runs import build_datamodule, load_config, resolve_run, run_label

KINDS = ("printed_letter", "other_letters", "printed_increments", "other_increments", "no_ops", "rest")
OUT_DIR = "count_probe"


def program_facts(words: list[str]) -> dict:
    """For one program's whitespace tokens (ending `print x` and the answer): the query index, the key index of
    x's last set, the answer (x's increments between them) and each input token's kind relative to x."""
    query, var = len(words) - 2, words[-2]
    key = max(j for j in range(query) if words[j] == var and words[j + 1] == "=")
    increment = [w in ("++;", "++") for w in words[: query + 1]]
    answer = sum(words[t] == var and increment[t + 1] for t in range(key, query))
    if answer != int(words[-1]):
        raise ValueError(f"count-probe: program's answer {words[-1]} is not its increments of {var} ({answer})")

    def kind(t: int) -> str:
        w = words[t]
        if increment[t]:
            return "printed_increments" if words[t - 1] == var else "other_increments"
        if w == var:
            return "printed_letter"
        if w in LETTERS:
            return "other_letters"
        return "no_ops" if w in ("pass;", "pass") else "rest"

    return dict(query=query, key=key, answer=answer, kinds=[kind(t) for t in range(query + 1)])


def r_squared(x: torch.Tensor, y: torch.Tensor) -> float:
    """R² of the least-squares line y ~ a + b x (0 where x or y is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x * x).sum() * (y * y).sum()
    return float((x * y).sum() ** 2 / denom) if denom > 0 else 0.0


def probe(model, programs: list[tuple[str, ...]], batch_size: int = 8) -> pd.DataFrame:
    """One row per (layer, head): the mean gate at the query per kind of key from the last set on, the selectivity,
    and R² of p at the last set against the answer, its mean and the share at the clamp. A batch records every
    layer's (B, H, T, T) maps, hence the small batches."""
    facts = [program_facts(list(p)) for p in programs]
    positions, gate_sums, gate_counts, npos_max = {}, {}, {}, None
    for start in range(0, len(programs), batch_size):
        chunk = facts[start : start + batch_size]
        words = [programs[start + b][:-1] for b in range(len(chunk))]
        length = max(len(w) for w in words)
        ids = torch.full((len(chunk), length), TOKEN_ID["<pad>"])
        for b, w in enumerate(words):
            ids[b, : len(w)] = torch.tensor([TOKEN_ID[t] for t in w])
        with torch.no_grad():
            records = model.record_attention(ids)
        for layer, rec in enumerate(records):
            if rec["positions"] is None:
                raise ValueError("count-probe reads CoPE gates: this run's attention has no CoPE term to probe")
            npos_max = rec["npos_max"]
            for b, f in enumerate(chunk):
                p = rec["positions"][b, :, f["query"], f["key"]]  # (H,)
                positions.setdefault(layer, []).append(p)
                g = rec["gates"][b, :, f["query"], f["key"] : f["query"] + 1]  # (H, keys the count spans)
                kinds = f["kinds"][f["key"] : f["query"] + 1]
                for kind in KINDS:
                    cols = [j for j, k in enumerate(kinds) if k == kind]
                    gate_sums[layer, kind] = gate_sums.get((layer, kind), 0) + g[:, cols].double().sum(-1)
                    gate_counts[layer, kind] = gate_counts.get((layer, kind), 0) + len(cols)
    answers = torch.tensor([f["answer"] for f in facts], dtype=torch.float64)
    rows = []
    for layer, ps in positions.items():
        p = torch.stack(ps).double()  # (N, H)
        for head in range(p.size(1)):
            row = dict(layer=layer, head=head)
            for kind in KINDS:
                n = gate_counts[layer, kind]
                row[f"gate_{kind}"] = float(gate_sums[layer, kind][head] / n) if n else float("nan")
            row["selectivity"] = row["gate_printed_increments"] - row["gate_other_increments"]
            row.update(
                r2_answer=r_squared(answers, p[:, head]),
                mean_position=float(p[:, head].mean()),
                clamped=float((p[:, head] >= npos_max - 1).double().mean()),
            )
            rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    from cope_pl.resume import load_trained

    parser = argparse.ArgumentParser(prog="cope-pl count-probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory or checkpoint file of a Counting run with CoPE")
    parser.add_argument("--set", default="in_dist", help="test set to read: in_dist (default) or ood_long")
    parser.add_argument("--programs", type=int, default=256, help="programs to read from that set")
    parser.add_argument("--out", type=Path, default=None, help=f"default: <run>/{OUT_DIR}/")
    args = parser.parse_args(argv)
    run, ckpt = resolve_run(args.run)
    dm = build_datamodule(load_config(run))
    if not isinstance(dm, CountingDataModule):
        raise SystemExit(f"count-probe: {run} is not a Counting run (its data is {type(dm).__name__})")
    dm.setup("test")
    if args.set not in dm.eval_sets:
        raise SystemExit(f"count-probe: --set must be one of {list(dm.eval_sets)}, got {args.set!r}")
    model = load_trained(ckpt)
    programs = list(dm.eval_sets[args.set].programs[: args.programs])
    try:
        table = probe(getattr(model, "model", model), programs)
    except ValueError as err:
        raise SystemExit(f"{err} ({run})") from None
    out = args.out or run / OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    title = f"{run_label(run)}: what each CoPE head counts"
    note = (
        f"{args.set}, {len(programs)} programs: mean gates at the scored query over the keys from the printed "
        "variable's last set on, by kind of key; selectivity = printed increments' gate - the others'."
    )
    write(table.round(3), out / "count_probe", title, note)
    print((out / "count_probe.md").read_text())
    print(f"wrote {out}/count_probe.csv and count_probe.md")


if __name__ == "__main__":
    main()
