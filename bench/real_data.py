"""Real English text available offline, for the real-teacher benches (bench_real_cache.py, bench_real_teacher.py).

- `docstrings`: docstrings of public members of a fixed list of standard-library modules (this Python's).
- `sentiment_rows`: a sentiment set of templated sentences whose opinion words come from the VADER
  lexicon (PyPI `vaderSentiment`, MIT: 7,520 English words rated -4..4 by ten people each). A word is
  used when it looks like an adjective (`ADJECTIVE`), its mean rating is at least 1.8 away from 0 and
  its raters agree (std <= 1.0); its sign is the label. Templates add a negation ("was not W": the label
  flips) and a turn ("W1 at first, but in the end W2": W2's label). Train and test use disjoint words, so
  the test asks what a word means, which the teacher knows and the training labels alone do not say.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
import inspect
import random
import re

MODULES = ("json", "textwrap", "string", "collections", "functools", "itertools", "pathlib", "statistics",
           "datetime", "shutil", "argparse", "csv", "logging", "random", "heapq", "bisect", "difflib",
           "fractions", "decimal", "calendar", "subprocess", "tempfile", "zipfile", "unittest", "inspect")
ADJECTIVE = re.compile(r"^(?!.*ment$)[a-z]{4,}(ful|ous|ive|able|ible|ic|less|ant|ent|ish|ed)$")
THINGS = ("film", "plot", "service", "meal", "hotel room", "staff", "book", "concert", "trip", "app", "game",
          "museum", "lecture", "coffee", "show")
TEMPLATES = (  # (text, which word decides, does the label flip)
    ("The {thing} was {w1}.", 1, False),
    ("Honestly, I found the {thing} {w1}.", 1, False),
    ("The {thing} was not {w1}.", 1, True),
    ("I would never call the {thing} {w1}.", 1, True),
    ("The {thing} seemed {w1} at first, but in the end it was {w2}.", 2, False),
    ("Everyone said the {thing} was {w1}; to me it felt {w2}.", 2, False),
)


def docstrings(n: int, min_chars: int) -> list[str]:
    """Up to `n` distinct docstrings of public module members, spread over `MODULES` (at most n/len + 1 each)."""
    per_module, out, seen = n // len(MODULES) + 1, [], set()
    for name in MODULES:
        module, taken = importlib.import_module(name), 0
        for attr in sorted(vars(module)):
            obj = vars(module)[attr]
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and doc not in seen and taken < per_module:
                seen.add(doc)
                out.append(doc)
                taken += 1
    return out[:n]


def lexicon() -> dict[str, int]:
    """VADER's clear, agreed adjectives: word -> 1 (positive) or 0 (negative)."""
    text = (importlib.resources.files("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8")
    words = {}
    for line in text.splitlines():
        word, mean, std = line.split("\t")[:3]
        if ADJECTIVE.match(word) and abs(float(mean)) >= 1.8 and float(std) <= 1.0:
            words[word] = int(float(mean) > 0)
    return words


def sentiment_rows(train: int, test: int, seed: int = 0, plain: bool = False) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) of {"id", "text", "label"}, balanced labels, words of the two parts disjoint
    (a word is a test word when its sha256 says so: 1 in 4). plain: only the templates without a
    negation or a turn (the word's own sentiment is the label)."""
    templates = [t for t in TEMPLATES if not plain or (t[1] == 1 and not t[2])]
    words = lexicon()
    part = {w: "test" if hashlib.sha256(w.encode()).digest()[0] < 64 else "train" for w in words}
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {"train": [], "test": []}
    for name, n in (("train", train), ("test", test)):
        pool = {label: [w for w, y in sorted(words.items()) if part[w] == name and y == label] for label in (0, 1)}
        while len(out[name]) < n:
            label = len(out[name]) % 2
            text, decides, flips = rng.choice(templates)
            decisive = label if not flips else 1 - label
            other = rng.choice(pool[rng.randint(0, 1)])
            word = rng.choice(pool[decisive])
            w1, w2 = (word, other) if decides == 1 else (other, word)
            row = {"id": f"{name}-{len(out[name])}", "label": label,
                   "text": text.format(thing=rng.choice(THINGS), w1=w1, w2=w2)}
            out[name].append(row)
    return out["train"], out["test"]
