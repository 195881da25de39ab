"""Counting (CoPE paper Table 3): read a program of sets, increments and no-ops, then print a variable's value.

Statements are drawn with the weights of the paper's generator: `a = 0 ;` (set) 1, `pass ;` 50, `a ++ ;`
(increment) 7. A set picks any of the first `num_vars` letters; an increment picks a variable already set and
may not take it past MAX_VALUE (a statement that cannot be generated is drawn again). A program has between
min_steps and max_steps statements (uniform) and ends with `print x` and the answer, the value of x (a set
variable). Whitespace tokenisation; only the answer is scored. The out-of-distribution set (`ood_long`) has
longer programs than training: max_steps + 1 to ood_max_steps statements.

`tokens` chooses how statements become tokens. `separate` (default): every symbol is a token, `pass ;` two,
`a ++ ;` three, `a = 0 ;` four (about 2.2 tokens per statement at the generator's weights). `official`: the
text of the official generator (facebookresearch/RAM, projects/cope) split on whitespace, where `pass;` is one
token and `a ++;` two (about 1.17 per statement), so a program of the same statements is about half as long.

Programs are generated once per split in `setup` (10k train, 1k valid, 1k test in the paper) from
(seed, split, index): training from `seed`, evaluation from `eval_seed`, so every training seed is scored on
the same programs; training programs that also occur in the validation or test in-distribution set are drawn
again. Each split is
right-padded to its longest sequence with PAD, whose labels are not scored; padding after the answer is
never attended by the scored position (causal attention), so it does not change the answer's prediction.
"""

from __future__ import annotations

import itertools
import random

import torch
from torch.utils.data import Dataset

from cope_pl.data.base import IGNORE_INDEX, LMDataModule
from cope_pl.seeding import derived_seed

MAX_VALUE = 10
SET, PASS, INCREMENT = "set", "pass", "increment"
WEIGHTS = {SET: 1, PASS: 50, INCREMENT: 7}
OPS, CUM_WEIGHTS = list(WEIGHTS), list(itertools.accumulate(WEIGHTS.values()))
LETTERS = "abcde"
VOCAB = ["<pad>", "=", ";", "pass", "++", "print"] + [str(v) for v in range(MAX_VALUE + 1)] + list(LETTERS)
# The official generator writes `pass;` and `a ++;`: after whitespace splitting, two more words (ids appended,
# so `separate` runs keep their vocabulary and checkpoints).
OFFICIAL_VOCAB = VOCAB + ["pass;", "++;"]
TOKEN_ID = {t: i for i, t in enumerate(OFFICIAL_VOCAB)}
PAD = TOKEN_ID["<pad>"]
TOKENIZATIONS = ("separate", "official")


class GenerationFailed(Exception):
    """The drawn statement or program is impossible in the current state; draw again."""


def draw_statement(rng: random.Random, names: str, values: dict[str, int], official: bool = False) -> list[str]:
    op = rng.choices(OPS, cum_weights=CUM_WEIGHTS)[0]
    if op == PASS:
        return ["pass;"] if official else ["pass", ";"]
    if op == SET:
        var = rng.choice(names)
        values[var] = 0
        return [var, "=", "0", ";"]
    if not values:
        raise GenerationFailed
    var = rng.choice(sorted(values))
    if values[var] + 1 > MAX_VALUE:
        raise GenerationFailed
    values[var] += 1
    return [var, "++;"] if official else [var, "++", ";"]


def draw_program(
    rng: random.Random, num_vars: int, min_steps: int, max_steps: int, official: bool = False
) -> list[str]:
    """Whitespace tokens of one program, ending with `print x` and x's value."""
    names = LETTERS[:num_vars]
    while True:
        values: dict[str, int] = {}
        words: list[str] = []
        for _ in range(rng.randint(min_steps, max_steps)):
            for _ in range(100):
                try:
                    words += draw_statement(rng, names, values, official)
                    break
                except GenerationFailed:
                    continue
        if values:  # at least one variable was set, so there is something to print
            var = rng.choice(sorted(values))
            return words + ["print", var, str(values[var])]


class CountingPrograms(Dataset):
    """`num_programs` programs of min_steps..max_steps statements, right-padded to the longest."""

    def __init__(
        self,
        num_programs: int,
        num_vars: int,
        min_steps: int,
        max_steps: int,
        seed: int,
        exclude: frozenset[tuple[str, ...]] = frozenset(),
        official: bool = False,
    ):
        self.programs: list[tuple[str, ...]] = []
        for index in range(num_programs):
            rng = random.Random(derived_seed(seed, index))
            program = tuple(draw_program(rng, num_vars, min_steps, max_steps, official))
            while program in exclude:
                program = tuple(draw_program(rng, num_vars, min_steps, max_steps, official))
            self.programs.append(program)
        self.length = max(len(p) for p in self.programs) - 1  # input tokens per padded sequence

    def __len__(self) -> int:
        return len(self.programs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor([TOKEN_ID[w] for w in self.programs[index]])  # (n,)
        input_ids = torch.full((self.length,), PAD)
        labels = torch.full((self.length,), IGNORE_INDEX)
        input_ids[: len(ids) - 1] = ids[:-1]
        labels[len(ids) - 2] = ids[-1]  # the answer, predicted from the printed variable
        return {"input_ids": input_ids, "labels": labels}


class CountingDataModule(LMDataModule):
    """Counting with 1, 3 or 5 variables; sets in_dist (min..max_steps) and ood_long (max_steps+1..ood_max_steps).

    Args:
        num_vars: variables a.. (the paper's 1, 3 and 5).
        min_steps, max_steps: statements per training and in-distribution program (3 and 512 in the paper).
        ood_max_steps: the longest out-of-distribution program.
        train_size, eval_size: programs in the training split and in each evaluation split (10k and 1k).
        tokens: `separate` (every symbol a token) or `official` (the official generator's text split on
            whitespace: `pass;` and `++;` are single tokens).
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_vars: int = 1,
        min_steps: int = 3,
        max_steps: int = 512,
        ood_max_steps: int = 1024,
        train_size: int = 10_000,
        eval_size: int = 1000,
        tokens: str = "separate",
        num_workers: int = 0,
        seed: int = 0,
        eval_seed: int = 0,
    ):
        if tokens not in TOKENIZATIONS:
            raise ValueError(f"data.tokens must be one of {list(TOKENIZATIONS)}, got {tokens!r}")
        self.official = tokens == "official"
        # Longest possible input: every statement a set (4 tokens) plus `print x`.
        super().__init__(
            seq_len=4 * ood_max_steps + 2,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            eval_seed=eval_seed,
        )
        if not 1 <= num_vars <= len(LETTERS):
            raise ValueError(f"data.num_vars must be between 1 and {len(LETTERS)}, got {num_vars}")
        if not 1 <= min_steps <= max_steps < ood_max_steps:
            raise ValueError(
                f"data needs 1 <= min_steps <= max_steps < ood_max_steps, got {min_steps}, {max_steps}, {ood_max_steps}"
            )
        self.num_vars = num_vars
        self.min_steps = min_steps
        self.max_steps = max_steps
        self.ood_max_steps = ood_max_steps
        self.train_size = train_size
        self.eval_size = eval_size

    @property
    def vocab_size(self) -> int:
        return len(OFFICIAL_VOCAB if self.official else VOCAB)

    def text_codec(self):
        from cope_pl.data.codec import VocabularyCodec

        return VocabularyCodec(OFFICIAL_VOCAB if self.official else VOCAB, separator=" ")

    def setup(self, stage: str | None = None) -> None:
        # Seeds per split: 8 * seed train; 8 * eval_seed + 1-2 valid, + 3-4 test (the paper's separate valid and
        # test sets). The evaluation sets depend on eval_seed alone; training avoids both in-distribution sets.
        official = self.official
        steps = (self.min_steps, self.max_steps)
        in_dist = {
            split: CountingPrograms(
                self.eval_size, self.num_vars, *steps, 8 * self.eval_seed + first, official=official
            )
            for split, first in (("val", 1), ("test", 3))
        }
        held_out = frozenset(in_dist["val"].programs) | frozenset(in_dist["test"].programs)
        self.train_set = CountingPrograms(
            self.train_size, self.num_vars, *steps, seed=8 * self.seed, exclude=held_out, official=official
        )
        first_eval = 8 * self.eval_seed + (3 if stage == "test" else 1)
        self.eval_sets = {
            "in_dist": in_dist["test" if stage == "test" else "val"],
            "ood_long": CountingPrograms(
                self.eval_size, self.num_vars, self.max_steps + 1, self.ood_max_steps, first_eval + 1, official=official
            ),
        }
