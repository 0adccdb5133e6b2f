"""The built-in offline task: write a number as a sum of two numbers (``2631`` -> ``2164 + 467``).

Available to every command as the dataset ``kdpipe:arithmetic`` (splits ``train`` and ``test``), so
the demo and the tests need no download. `check` is the exact-match checker the evaluation uses.
"""

from __future__ import annotations

import random
import re

TRAIN_SIZE, TEST_SIZE = 2700, 290
_ANSWER = re.compile(r"^\s*(\d+) \+ (\d+)\s*$")


def generate(split: str, seed: int = 1234) -> list[dict[str, str]]:
    """Rows with `id`, `instruction` (the number) and `output` (two addends), deterministic per seed.

    The two splits never share a number.
    """
    if split not in ("train", "test"):
        raise ValueError(f"kdpipe:arithmetic has splits 'train' and 'test', not {split!r}")
    rng = random.Random(seed)
    numbers = rng.sample(range(100, 10000), TRAIN_SIZE + TEST_SIZE)
    chosen = numbers[:TRAIN_SIZE] if split == "train" else numbers[TRAIN_SIZE:]
    rows = []
    for i, n in enumerate(chosen):
        a = rng.randint(1, n - 1)
        rows.append({"id": f"arith-{split}-{i:05d}", "instruction": str(n), "output": f"{a} + {n - a}"})
    return rows


def check(instruction: str, answer: str) -> bool:
    """True when `answer` is ``a + b`` with positive integers that add up to `instruction`."""
    match = _ANSWER.match(answer)
    return bool(match) and all(int(x) > 0 for x in match.groups()) and sum(map(int, match.groups())) == int(instruction)
