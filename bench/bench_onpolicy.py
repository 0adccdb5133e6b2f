"""SFT vs off-policy KD vs sequence-level KD on teacher generations, at equal student steps, several seeds.

    .venv/bin/python bench/bench_onpolicy.py [--task kdpipe:arithmetic-long] [--workdir /tmp/kdpipe-onpolicy]
        [--teacher-steps 600] [--steps 300] [--seeds 0,1,2] [--gen-temperature 0]

With the real commands, in-process (one Python start-up):
  1. init-model a teacher (the demo's: 4 layers x 128, BPE tokenizer of 300 trained on the task) and
     `kdpipe finetune` it from scratch on the task's train split;
  2. cache-teacher it on the train split (top-16) and on the test split (held-out fidelity);
  3. `kdpipe generate` with the teacher on the train prompts (greedy by default: Kim & Rush's
     sequence-level KD takes the teacher's mode), then cache-teacher on that file;
  4. per seed, a student (the demo's: 2 layers x 64, same tokenizer), trained four ways with the same
     steps, batch and learning rate: (a) SFT on the references (`finetune`), (b) off-policy KD on the
     reference cache, (c) sequence-level KD on the generations' cache, (c+b) both caches mixed
     (`train-student --cache A --cache B`); then `kdpipe evaluate`: exact match on the test split and
     the true KL to the teacher on the test cache (top-16 + tail bucket);
  5. (d) on-policy rounds, the steps of `kdpipe run`'s `rounds:` (stages/rounds.py) by hand: off-policy KD
     on the reference cache for a 1/(R+1) share of the steps, then R rounds of the same share each: the
     current student completes a seeded fraction λ of the train prompts (`generate --fraction λ
     --fraction-seed seed*100+r`, sampling at --round-temperature), the teacher caches them, and
     `train-student` starts from the previous student on the reference cache + the round's cache. The
     total student steps are the other arms' (each round has its own optimizer and LR schedule, as in
     `kdpipe run`).
Every step is skipped when its output is already complete, so the bench can be run in several short
pieces (`--stop-after SECONDS` ends it cleanly after the step that passes that time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KDPIPE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is faster than two that wait for each other on a shared CPU (10x on a busy one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

VARIANTS = {"a": "SFT (references)", "b": "KD off-policy (reference cache)",
            "c": "seq-KD (teacher generations' cache)", "c+b": "seq-KD + off-policy (both caches)",
            "d": "on-policy rounds (λ = 0.5)"}
START = time.time()


def kdpipe(*args: object) -> None:
    from kdpipe.cli import main

    words = [str(a) for a in args]
    print("$ kdpipe " + " ".join(words), flush=True)
    t = time.time()
    try:
        main.main(words, standalone_mode=False)
    except SystemExit as e:
        if e.code:
            sys.exit(f"failed: kdpipe {' '.join(words)}")
    print(f"  ({time.time() - t:.0f} s)", flush=True)


def cache(*args: object) -> None:
    """cache-teacher, unless its --cache is already complete (saves loading the teacher)."""
    manifest = Path(str(args[args.index("--cache") + 1])) / "manifest.json"
    if not (manifest.is_file() and json.loads(manifest.read_text()).get("complete")):
        kdpipe(*args)


def done_run(folder: Path) -> bool:
    record = folder / "kdpipe_run.json"
    return record.is_file() and json.loads(record.read_text()).get("status") == "complete"


def check_time(a: argparse.Namespace) -> None:
    if a.stop_after and time.time() - START > a.stop_after:
        print(f"stopping after {time.time() - START:.0f} s (--stop-after); rerun to continue", flush=True)
        sys.exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="kdpipe:arithmetic-long")
    p.add_argument("--workdir", default="/tmp/kdpipe-onpolicy")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--teacher-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", default="3e-3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, default=None, help="Train examples used (default: all 2,700).")
    p.add_argument("--gen-temperature", type=float, default=0.0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="Arms to run, e.g. a,b,c,d.")
    p.add_argument("--rounds", type=int, default=2, help="On-policy rounds of arm d.")
    p.add_argument("--fraction", type=float, default=0.5, help="λ: share of prompts the student completes.")
    p.add_argument("--round-temperature", type=float, default=1.0, help="Student sampling in the rounds.")
    p.add_argument("--stop-after", type=float, default=None, help="End cleanly after the step passing this many s.")
    a = p.parse_args()
    variants = {v: VARIANTS[v] for v in a.variants.split(",")}
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    w = Path(a.workdir) / a.task.replace(":", "-")
    w.mkdir(parents=True, exist_ok=True)
    task = ("--dataset", a.task)
    train_part = (*task, *(["--limit", a.limit] if a.limit else []))
    if not done_run(w / "teacher"):
        if not (w / "teacher-init" / "config.json").exists():
            kdpipe("init-model", "-o", w / "teacher-init", "--train-tokenizer-on", a.task, "--vocab-size", 300,
                   "--hidden-size", 128, "--layers", 4, "--heads", 4, "--kv-heads", 2)
        kdpipe("finetune", "--model", w / "teacher-init", *train_part, "--full", "--max-steps", a.teacher_steps,
               "--batch-size", a.teacher_batch, "--lr", "4e-3", "--warmup", 0.05, "--save-steps", 100000,
               "--output", w / "teacher")
    check_time(a)
    teacher = ("--model", w / "teacher", "--top-k", 16, "--dtype", "fp32", "--batch-size", 64, "--device", "cpu")
    cache("cache-teacher", *teacher, *train_part, "--cache", w / "cache-train")
    cache("cache-teacher", *teacher, *task, "--split", "test", "--cache", w / "cache-test", "--heldout")
    check_time(a)
    gen = w / "data" / f"teacher-gen-t{a.gen_temperature:g}.jsonl"
    kdpipe("generate", "--model", w / "teacher", *train_part, "--output", gen, "--temperature", a.gen_temperature,
           "--max-new-tokens", 24, "--batch-size", 128, "--device", "cpu")
    cache("cache-teacher", *teacher, "--dataset", gen, "--cache", w / f"cache-gen-t{a.gen_temperature:g}")
    check_time(a)
    caches = {"b": [w / "cache-train"], "c": [w / f"cache-gen-t{a.gen_temperature:g}"]}
    caches["c+b"] = caches["c"] + caches["b"]
    results = {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        student = w / f"student-init-{seed}"
        if not (student / "config.json").exists():
            kdpipe("init-model", "-o", student, "--tokenizer", w / "teacher", "--hidden-size", 64, "--layers", 2,
                   "--heads", 2, "--kv-heads", 1, "--seed", seed + 1)
        train = ("--model", student, "--full", "--max-steps", a.steps, "--batch-size", a.batch_size, "--lr", a.lr,
                 "--warmup", 0.05, "--save-steps", 100000, "--seed", seed, "--logging-steps", 50)
        runs = {v: w / f"seed{seed}" / v for v in variants}
        for v, out in runs.items():
            if done_run(out):
                continue
            if v == "d":
                on_policy_rounds(a, w, seed, student, train_part, teacher, out)
            elif v == "a":
                kdpipe("finetune", *train, *train_part, "--output", out)
            else:
                kdpipe("train-student", *train, *[x for c in caches[v] for x in ("--cache", c)], "--alpha", 0.5,
                       "--output", out)
            check_time(a)
        table = w / f"seed{seed}" / "eval" / "results.json"
        if not table.exists():
            kdpipe("evaluate", *[x for v in variants for x in ("--model", runs[v])], "--model", w / "teacher",
                   *task, "--split", "test", "--task", "exact-match", "--cache", w / "cache-test",
                   "--output", table.parent, "--no-plot", "--device", "cpu")
        models = json.loads(table.read_text())["models"]
        results[seed] = {v: models[i]["metrics"] for i, v in enumerate(variants)}
        results[seed]["teacher"] = models[len(variants)]["metrics"]
        check_time(a)
    report(a, w, results, variants)


def on_policy_rounds(a: argparse.Namespace, w: Path, seed: int, student: Path, train_part: tuple,
                     teacher: tuple, out: Path) -> None:
    """Arm d: KD on the reference cache, then a.rounds rounds; out/ is the last round's student."""
    shares = [a.steps // (a.rounds + 1)] * (a.rounds + 1)
    shares[-1] += a.steps - sum(shares)  # equal steps in all: the remainder goes to the last round
    base = ("--full", "--batch-size", a.batch_size, "--lr", a.lr, "--warmup", 0.05, "--save-steps", 100000,
            "--seed", seed, "--logging-steps", 50, "--alpha", 0.5)
    folder = out.parent / "d-rounds"
    previous = folder / "round-0"
    if not done_run(previous):
        kdpipe("train-student", "--model", student, *base, "--max-steps", shares[0],
               "--cache", w / "cache-train", "--output", previous)
    for r in range(1, a.rounds + 1):
        train_out = out if r == a.rounds else folder / f"round-{r}" / "train"
        if done_run(train_out):
            previous = train_out
            continue
        gen = folder / f"round-{r}" / "generated.jsonl"
        # generate resumes a partial file and skips a complete one; same --seed (held-out split) as the caches
        kdpipe("generate", "--model", previous, *train_part, "--output", gen, "--fraction", a.fraction,
               "--fraction-seed", seed * 100 + r, "--temperature", a.round_temperature,
               "--max-new-tokens", 24, "--batch-size", 128, "--device", "cpu")
        round_cache = folder / f"round-{r}" / "cache"
        cache("cache-teacher", *teacher, "--dataset", nonempty(gen), "--template", "arithmetic",
              "--cache", round_cache)
        kdpipe("train-student", "--model", previous, *base, "--max-steps", shares[r],
               "--cache", w / "cache-train", "--cache", round_cache, "--output", train_out)
        previous = train_out


def nonempty(gen: Path) -> Path:
    """The generations less the empty completions (a young student can emit EOS at once; the template
    refuses an empty output field), as a copy: its template must then be named (no generate record)."""
    out = gen.with_name("generated-nonempty.jsonl")
    rows = [json.loads(line) for line in gen.read_text().splitlines() if line.strip()]
    kept = [row for row in rows if str(row.get("output", "")).strip()]
    print(f"  {len(rows) - len(kept)} of {len(rows)} completions empty, left out", flush=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in kept))
    return out


def report(a: argparse.Namespace, w: Path, results: dict[int, dict[str, dict[str, float]]],
           variants: dict[str, str]) -> None:
    em, kl = "exact-match/exact_match", "fidelity/kl"
    print(f"\n{a.task}: students 2 x 64, {a.steps} steps x {a.batch_size}, seeds {a.seeds}; teacher 4 x 128, "
          f"{a.teacher_steps} steps; generations at temperature {a.gen_temperature:g}")
    print(f"{'':<40}{'exact match (test)':>22}{'held-out KL':>18}")
    rows = {}
    for v, name in {**variants, "teacher": "teacher"}.items():
        ems = [r[v].get(em, float("nan")) for r in results.values()]
        kls = [r[v].get(kl, float("nan")) for r in results.values()]
        rows[v] = {"name": name, "exact_match": ems, "kl": kls}
        spread = lambda xs: f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else ""  # noqa: E731
        print(f"{name:<40}{statistics.mean(ems):>14.3f}{spread(ems):>8}{statistics.mean(kls):>12.4f}{spread(kls):>6}")
    (w / "bench_onpolicy.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    print(f"-> {w / 'bench_onpolicy.json'}")


if __name__ == "__main__":
    main()
