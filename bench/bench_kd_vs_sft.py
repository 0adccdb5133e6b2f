"""Does distillation from the cache beat plain SFT? Top-1 agreement with the teacher on held-out cached positions.

    /work/venv/bin/python bench/bench_kd_vs_sft.py [--workdir /tmp/kdvssft] [--teacher-steps 300] [--steps 300]

On the built-in task (kdpipe:arithmetic), with the real commands:
  1. init-model a tiny teacher (2 layers x 64, BPE tokenizer trained on the task) and `kdpipe finetune` it
     from scratch (full) on the task's train part, so that it is better than random;
  2. cache-teacher it on the train part and on the held-out part (top-k 16);
  3. init-model a smaller student (1 layer x 32, same tokenizer), then train two copies of it with the same
     data, batch size, learning rate and number of steps: `kdpipe train-student` (cached KD, alpha 0.5 and
     1.0) and `kdpipe finetune` (SFT only);
  4. on the held-out cache: top-1 agreement (student argmax == teacher argmax), the student's accuracy on
     the actual next token, and the forward KL to the teacher's top-k + tail (bucket).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

KDPIPE = [sys.executable, "-m", "kdpipe.cli"]


def sh(*args: object) -> None:
    cmd = [*KDPIPE, *map(str, args)]
    print("$ kdpipe", " ".join(map(str, args)), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "KDPIPE_NO_PROGRESS": "1"})
    if done.returncode:
        sys.exit(f"failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print("  " + (done.stdout.strip().splitlines() or [""])[-1], flush=True)


@torch.no_grad()
def fidelity(model_dir: Path, cache_dir: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from kdpipe.cache import open_cache
    from kdpipe.losses import DistillLossConfig, divergence, student_atoms, teacher_atoms

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    agree = correct = n = 0
    kl = 0.0
    for e in open_cache(cache_dir).iter_examples():
        logits = model(input_ids=torch.from_numpy(e.input_ids.astype(np.int64))[None]).logits[0, e.positions]
        top = torch.from_numpy(e.targets.topk_ids.astype(np.int64))
        lp = torch.from_numpy(e.targets.topk_logprobs)
        agree += int((logits.argmax(-1) == top[:, 0]).sum())
        correct += int((logits.argmax(-1) == torch.from_numpy(e.labels.astype(np.int64))).sum())
        s = student_atoms(logits, top, torch.ones_like(top, dtype=torch.bool), 1.0, "bucket")
        t = teacher_atoms(lp, torch.from_numpy(e.targets.tail_mass), 1.0, "bucket")
        kl += float(divergence(s, t, DistillLossConfig("fkl")).sum())
        n += len(e.positions)
    return {"agreement": agree / n, "accuracy": correct / n, "kl": kl / n, "positions": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/kdpipe-kd-vs-sft")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", default="3e-3")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    w = Path(a.workdir)
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    data = ("--dataset", "kdpipe:arithmetic", "--part", "train")
    sh("init-model", "-o", w / "teacher-init", "--train-tokenizer-on", "kdpipe:arithmetic", "--seed", a.seed)
    sh("finetune", "--model", w / "teacher-init", *data, "--full", "--max-steps", a.teacher_steps, "--batch-size", a.batch_size,
       "--lr", a.lr, "--warmup", 0.05, "--save-steps", 100000, "--seed", a.seed, "--output", w / "teacher")
    sh("cache-teacher", "--model", w / "teacher", *data, "--top-k", 16, "--cache", w / "cache-train")
    sh("cache-teacher", "--model", w / "teacher", "--dataset", "kdpipe:arithmetic", "--part", "heldout", "--top-k", 16,
       "--cache", w / "cache-heldout")
    sh("init-model", "-o", w / "student-init", "--tokenizer", w / "teacher", "--hidden-size", 32, "--layers", 1,
       "--heads", 2, "--kv-heads", 1, "--seed", a.seed + 1)
    train = ("--model", w / "student-init", "--full", "--max-steps", a.steps, "--batch-size", a.batch_size, "--lr", a.lr,
             "--warmup", 0.05, "--save-steps", 100000, "--seed", a.seed)
    runs = {"SFT only (finetune)": w / "sft", "KD alpha 0.5 (train-student)": w / "kd-0.5", "KD alpha 1.0 (train-student)": w / "kd-1.0"}
    sh("finetune", *train, *data, "--output", runs["SFT only (finetune)"])
    for alpha in ("0.5", "1.0"):
        sh("train-student", *train, "--cache", w / "cache-train", "--alpha", alpha, "--output", w / f"kd-{alpha}")
    rows = {"teacher": fidelity(w / "teacher", w / "cache-heldout"),
            "student, untrained": fidelity(w / "student-init", w / "cache-heldout")}
    rows.update({name: fidelity(path, w / "cache-heldout") for name, path in runs.items()})
    n = rows["teacher"]["positions"]
    print(f"\nheld-out part of kdpipe:arithmetic: {n} cached positions; students: 1 layer x 32, {a.steps} steps x {a.batch_size}")
    print(f"{'model':<32}{'top-1 agreement':>16}{'next-token acc':>16}{'KL(teacher||student)':>22}")
    for name, r in rows.items():
        print(f"{name:<32}{r['agreement']:>16.4f}{r['accuracy']:>16.4f}{r['kl']:>22.4f}")


if __name__ == "__main__":
    main()
