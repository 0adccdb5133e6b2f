"""Start-up of the `kdpipe` command (issue 18): `kdpipe --help` and an option error, before and after,
measured side by side in one run.

  before:   main's checkout (default /work/main/.venv/bin/kdpipe, or --before PATH), whose CLI imports
            every stage module and with them torch and transformers
  after:    this checkout's `python -m kdpipe.cli` (the interpreter running this script)
  baseline: `python -c "import torch, transformers"`, what any command that imports them pays at least

The commands are alternated (A B C A B C ...) so that a change of machine load hits all of them alike;
each cell is the median of --repeat runs, wall time and CPU time (user + system of the child).

With --train-steps N (default 300; 0 skips it), also a train-student run of N steps on the demo's shapes
(a Qwen3 teacher of hidden 128 x 4 layers and a student of hidden 64 x 2 layers over a 300-id BPE trained
on kdpipe:arithmetic, 2,700 training examples cached at top-16), before and after alternated, each
version on a cache it wrote itself. Reported: the process's wall time, the training loop
(Trainer's `train_runtime`) and the difference, the time outside the loop (imports, model load,
cache verification, dataset setup, saving). The first run of each version is unmeasured (page cache;
for `after` it also writes the cache's verification record, as a user's first run does).

  python bench/bench_startup.py [--repeat 5] [--before /work/wt-old/.venv/bin/kdpipe] [--train-steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(command: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one run of `command` (its output discarded)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command (the median is shown)")
    parser.add_argument(
        "--before",
        default="/work/wt-old/.venv/bin/kdpipe",
        help="the `kdpipe` executable of the version to compare with",
    )
    parser.add_argument("--train-steps", type=int, default=300, help="train-student steps (0: skip)")
    parser.add_argument("--train-repeat", type=int, default=2, help="measured train-student runs of each")
    parser.add_argument("--work", default=None, help="folder for the models and caches (default: a temp one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    after = [sys.executable, "-m", "kdpipe.cli"]
    before = [args.before] if Path(args.before).exists() or shutil.which(args.before) else None
    cases = {"baseline: import torch, transformers": [sys.executable, "-c", "import torch, transformers"]}
    for words in (["--help"], ["train-student", "--no-such-option"]):
        if before:
            cases[f"before: kdpipe {' '.join(words)}"] = [*before, *words]
        cases[f"after:  kdpipe {' '.join(words)}"] = [*after, *words]
    if not before:
        print(f"note: no `before` executable at {args.before}; showing after and baseline only")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for command in cases.values():  # warm the page cache once, unmeasured
        timed(command)
    for _ in range(args.repeat):
        for name, command in cases.items():
            times[name].append(timed(command))
    width = max(map(len, cases))
    print(f"{'command':<{width}}  {'wall s':>7}  {'CPU s':>7}   (median of {args.repeat}, alternated)")
    for name in cases:
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        print(f"{name:<{width}}  {wall:7.2f}  {cpu:7.2f}")
    if args.train_steps and before:
        train_outside(before, after, args)
    print(
        f"machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} (shared machines: "
        "compare rows of one run, not runs)"
    )


def demo_models(root: Path) -> tuple[Path, Path]:
    """The demo's teacher and student shapes, random weights (the loop's cost, not its result, matters)."""
    from kdpipe import tiny
    from kdpipe.data import arithmetic
    from kdpipe.data.templates import ARITHMETIC

    texts = [
        ARITHMETIC.format(instruction=r["instruction"]) + " " + r["output"]
        for r in arithmetic.generate("train")
    ]
    tokenizer = tiny.train_tokenizer(texts, vocab_size=300)
    teacher, student = root / "teacher", root / "student"
    if not teacher.exists():
        tiny.init_model(teacher, tokenizer, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
        tiny.init_model(student, tokenizer, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, seed=1)
    return teacher, student


def quiet(words: list[str]) -> None:
    """Run a kdpipe command to completion, its output (and progress bars) discarded."""
    env = {**os.environ, "KDPIPE_NO_PROGRESS": "1"}
    subprocess.run(words, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def train_outside(before: list[str], after: list[str], args: argparse.Namespace) -> None:
    import tempfile

    root = Path(args.work or tempfile.mkdtemp(prefix="kdpipe-startup-"))
    teacher, student = demo_models(root)
    versions = {"before": before, "after": after}
    for name, command in versions.items():  # each version caches with its own writer
        cache = root / f"cache-{name}"
        if not (cache / "manifest.json").exists():
            quiet([*command, "cache-teacher", "--model", str(teacher), "--dataset", "kdpipe:arithmetic",
                   "--split", "train", "--top-k", "16", "--dtype", "fp32", "--device", "cpu",
                   "--cache", str(cache)])
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in versions}
    for i in range(args.train_repeat + 1):
        for name, command in versions.items():
            out = root / f"run-{name}-{i}"
            start = time.perf_counter()
            quiet([*command, "train-student", "--cache", str(root / f"cache-{name}"), "--model", str(student),
                   "--output", str(out), "--full", "--max-steps", str(args.train_steps), "--batch-size", "32",
                   "--save-steps", str(10 * args.train_steps), "--logging-steps", "50",
                   "--precision", "fp32"])
            wall = time.perf_counter() - start
            history = json.loads((out / "kdpipe_run.json").read_text())["log_history"]
            loop = next(h["train_runtime"] for h in reversed(history) if "train_runtime" in h)
            shutil.rmtree(out)
            if i:  # the first of each: unmeasured
                rows[name].append((wall, loop))
    print(
        f"\ntrain-student, {args.train_steps} steps on the demo's shapes (median of {args.train_repeat}, "
        "alternated)"
    )
    print(f"{'version':<8}  {'process s':>9}  {'loop s':>7}  {'outside s':>9}")
    for name, values in rows.items():
        wall = statistics.median(v[0] for v in values)
        loop = statistics.median(v[1] for v in values)
        outside = statistics.median(v[0] - v[1] for v in values)
        print(f"{name:<8}  {wall:9.2f}  {loop:7.2f}  {outside:9.2f}")


if __name__ == "__main__":
    main()
