"""Start-up of the `kdpipe` command (issue 18): `kdpipe --help` and an option error, before and after,
measured side by side in one run.

  before:   main's checkout (default /work/main/.venv/bin/kdpipe, or --before PATH), whose CLI imports
            every stage module and with them torch and transformers
  after:    this checkout's `python -m kdpipe.cli` (the interpreter running this script)
  baseline: `python -c "import torch, transformers"`, what any command that imports them pays at least

The commands are alternated (A B C A B C ...) so that a change of machine load hits all of them alike;
each cell is the median of --repeat runs, wall time and CPU time (user + system of the child).

  python bench/bench_startup.py [--repeat 5] [--before /work/main/.venv/bin/kdpipe]
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command (the median is shown)")
    parser.add_argument("--before", default="/work/main/.venv/bin/kdpipe",
                        help="the `kdpipe` executable of the version to compare with")
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
    for name, command in cases.items():  # warm the page cache once, unmeasured
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
    print(f"machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} (shared machines: "
          "compare rows of one run, not runs)")


if __name__ == "__main__":
    main()
