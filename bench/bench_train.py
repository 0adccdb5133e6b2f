"""Step time and peak memory of one training step: train-student (cached sparse KD) vs student-only SFT vs online KD.

    /work/venv/bin/python bench/bench_train.py [--steps 8] [--batch 8] [--length 256] [--vocab 32000]

Each mode runs in its own fresh subprocess over the same batches:
  sft     the student alone, the model's own causal-LM loss (HF `labels=`: full logits + cross-entropy)
  kd      train-student's loss: `kdpipe.training.student_distill_loss` on teacher targets read from disk
          (top-k 32 + tail, bucket fkl, alpha 0.5), as DistillTrainer computes it; no teacher in memory
  online  the teacher in memory too: each step a teacher forward (no grad) makes the same sparse
          targets, then the same student loss
Models are random Qwen3s built from configs (student 4 layers x 256, teacher 8 layers x 512; vocab 32000),
fp32 on CPU, AdamW, one optimizer step per batch, `--warmup` untimed steps first.

Memory: a thread samples the process RSS (/proc/self/statm) every millisecond during the timed
steps; "peak" is the highest RSS seen minus the RSS just before the first step (models, batches
and, for online, the teacher already loaded), i.e. what training adds (activations, gradients,
optimizer state, loss scratch). "resident" is the RSS before the first step (what is loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def build(kind: str, vocab: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    size = {"student": (256, 4, 4, 2), "teacher": (512, 8, 8, 4)}[kind]
    torch.manual_seed({"student": 0, "teacher": 1}[kind])
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=size[0], intermediate_size=4 * size[0], num_hidden_layers=size[1],
                      num_attention_heads=size[2], num_key_value_heads=size[3], head_dim=64, tie_word_embeddings=False,
                      max_position_embeddings=4096)
    return Qwen3ForCausalLM(cfg)


def teacher_targets(teacher, batch, k: int):
    from kdpipe.teacher import sparse_targets

    with torch.no_grad():
        hidden = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = teacher.lm_head(hidden[batch["target_rows"], batch["target_cols"]])
        ids, logprobs, _, tail = sparse_targets(logits, batch["labels"], k)
    return {**batch, "topk_ids": ids.long(), "topk_logprobs": logprobs, "tail_mass": tail}


def make_batches(n: int, batch: int, length: int, vocab: int, prompt: int, k: int) -> list[dict]:
    """Random token batches, the last `length - prompt` next tokens trained, with teacher targets."""
    g = torch.Generator().manual_seed(0)
    teacher = build("teacher", vocab).eval()
    out = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (batch, length), generator=g)
        rows = torch.arange(batch).repeat_interleave(length - 1 - prompt)
        cols = torch.arange(prompt, length - 1).repeat(batch)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_rows": rows, "target_cols": cols,
             "labels": ids[rows, cols + 1]}
        out.append(teacher_targets(teacher, b, k))
    return out


def child(mode: str, data: Path, steps: int, warmup: int, vocab: int, k: int) -> dict:
    from kdpipe.losses import DistillLossConfig
    from kdpipe.training import student_distill_loss

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    batches = torch.load(data)
    student = build("student", vocab).train()
    teacher = build("teacher", vocab).eval() if mode == "online" else None
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    cfg = DistillLossConfig("fkl", alpha=0.5, temperature=1.0, tail="bucket")

    def step(batch: dict) -> float:
        if mode == "sft":
            labels = torch.full_like(batch["input_ids"], -100)
            labels[batch["target_rows"], batch["target_cols"] + 1] = batch["labels"]
            loss = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        else:
            if teacher is not None:
                batch = teacher_targets(teacher, batch, k)
            loss = student_distill_loss(student, batch, cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for i in range(warmup):
        step(batches[i % len(batches)])
    base = rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    return {"mode": mode, "step_s": elapsed / steps, "peak_delta_mb": (peak[0] - base) / 2**20, "resident_mb": base / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32, help="untrained prompt tokens per row")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, Path(a.data), a.steps, a.warmup, a.vocab, a.k)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "batches.pt"
        torch.save(make_batches(min(a.steps + a.warmup, 4), a.batch, a.length, a.vocab, a.prompt, a.k), data)
        results = {}
        for mode in ("sft", "kd", "online"):
            cmd = [sys.executable, __file__, "--child", mode, "--data", str(data), "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--vocab", str(a.vocab), "--k", str(a.k)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    n = a.batch * (a.length - 1 - a.prompt)
    print(f"batch {a.batch} x {a.length} tokens ({n} trained positions), vocab {a.vocab}, top-k {a.k}, "
          f"{a.steps} timed steps after {a.warmup} warm-up, fp32, {torch.get_num_threads()} threads")
    print(f"{'mode':<32}{'step s':>9}{'x sft':>8}{'peak +MB':>10}{'x sft':>8}{'resident MB':>13}")
    names = {"sft": "student-only SFT (HF loss)", "kd": "train-student (cached KD)", "online": "online KD (teacher in memory)"}
    s = results["sft"]
    for mode, r in results.items():
        print(f"{names[mode]:<32}{r['step_s']:>9.3f}{r['step_s'] / s['step_s']:>8.2f}{r['peak_delta_mb']:>10.0f}"
              f"{r['peak_delta_mb'] / s['peak_delta_mb']:>8.2f}{r['resident_mb']:>13.0f}")
    kd, on = results["kd"], results["online"]
    print(f"online KD / train-student: step time {on['step_s'] / kd['step_s']:.2f}x, "
          f"peak+resident {(on['peak_delta_mb'] + on['resident_mb']) / (kd['peak_delta_mb'] + kd['resident_mb']):.2f}x")


if __name__ == "__main__":
    main()
