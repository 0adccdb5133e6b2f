"""The built-in offline task: write a number as a sum of two numbers (``2631`` -> ``1420 + 1211``).

Available to every command as the dataset ``kdpipe:arithmetic`` (splits ``train`` and ``test``), so
the demo and the tests need no download; ``kdpipe:arithmetic-long`` is the same task on 6- to 8-digit
numbers, one the demo's student does not saturate. `check` is the exact-match checker the evaluation uses: any
two positive numbers that add up to the input count.

The reference answers are *carry-free* splits: the two addends have the number's width and their
digits add up column by column to the number's digits (1420 + 1211: 1+1, 4+2, 2+1, 0+1). Each
digit of the first addend is drawn uniformly from its valid range, so a position has several right
answers -- a teacher's distribution there is genuinely spread, which is what distillation transfers --
while the second addend follows digit by digit: a model of a million parameters learns the task in
minutes on a CPU (a random split needs borrow propagation, which it does not learn in that time).
"""

from __future__ import annotations

import random
import re

TRAIN_SIZE, TEST_SIZE = 2700, 290
_ANSWER = re.compile(r"^\s*(\d+) \+ (\d+)\s*$")


def generate(split: str, seed: int = 1234) -> list[dict[str, str]]:
    """Rows with `id`, `instruction` (the number) and `output` (two addends), deterministic per seed.

    Numbers have 3 or 4 digits and a leading digit of at least 2 (so both addends keep the width);
    the two splits never share a number.
    """
    if split not in ("train", "test"):
        raise ValueError(f"kdpipe:arithmetic has splits 'train' and 'test', not {split!r}")
    rng = random.Random(seed)
    pool = [n for n in range(200, 10000) if not 1000 <= n < 2000]
    numbers = rng.sample(pool, TRAIN_SIZE + TEST_SIZE)
    return _rows(numbers, split, f"arith-{split}", rng)


def _rows(numbers: list[int], split: str, prefix: str, rng: random.Random) -> list[dict[str, str]]:
    """The split's part of `numbers` as rows, each with a carry-free first addend (drawn in row order)."""
    chosen = numbers[:TRAIN_SIZE] if split == "train" else numbers[TRAIN_SIZE:]
    rows = []
    for i, n in enumerate(chosen):
        a = carry_free_addend(n, rng)
        rows.append({"id": f"{prefix}-{i:05d}", "instruction": str(n), "output": f"{a} + {n - a}"})
    return rows


LONG_WIDTHS = (6, 7, 8)


def generate_long(split: str, seed: int = 4321) -> list[dict[str, str]]:
    """``kdpipe:arithmetic-long``: the same task on numbers of 6 to 8 digits (leading digit >= 2).

    Harder for a small model: twice the digits to keep aligned per answer, and each one a chance to slip,
    so the demo student does not reach the ceiling in a short run (the short task it nearly does).
    """
    if split not in ("train", "test"):
        raise ValueError(f"kdpipe:arithmetic-long has splits 'train' and 'test', not {split!r}")
    rng = random.Random(seed)
    numbers: list[int] = []
    seen: set[int] = set()
    while len(numbers) < TRAIN_SIZE + TEST_SIZE:  # unique numbers: the splits never share one
        width = rng.choice(LONG_WIDTHS)
        n = rng.randint(2 * 10 ** (width - 1), 10**width - 1)
        if n not in seen:
            seen.add(n)
            numbers.append(n)
    return _rows(numbers, split, f"arith-long-{split}", rng)


BUILTIN = {"kdpipe:arithmetic": generate, "kdpipe:arithmetic-long": generate_long}  # built-in datasets


def carry_free_addend(n: int, rng: random.Random) -> int:
    """A random first addend of `n`'s width whose digits never exceed `n`'s (the second keeps the width
    too)."""
    digits = [int(d) for d in str(n)]
    first = [rng.randint(1, digits[0] - 1)] + [rng.randint(0, d) for d in digits[1:]]
    return int("".join(map(str, first)))


def check(instruction: str, answer: str) -> bool:
    """True when `answer` is ``a + b`` with positive integers that add up to `instruction`."""
    match = _ANSWER.match(answer)
    return (bool(match) and all(int(x) > 0 for x in match.groups())
            and sum(map(int, match.groups())) == int(instruction))
