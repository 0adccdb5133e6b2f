"""Step time and peak memory of one training step: train-student (cached sparse KD) vs student-only SFT vs online KD.

    /work/venv/bin/python bench/bench_train.py [--rounds 3] [--batch 8] [--length 256] [--vocab 32000]
                                               [--modes sft,kd-bucket,kd-renorm,online] [--no-memory]

Modes, all on exactly the same batches and the same student:
  sft         the student alone, the model's own causal-LM loss (HF `labels=`, -100 on the prompt:
              full logits + cross-entropy)
  kd-bucket   train-student's loss, `kdpipe.train.trainer.student_distill_loss` as DistillTrainer calls it,
              on cached teacher targets (top-k 32 + tail): fkl, alpha 0.5, T 1, bucket tail
  kd-renorm   the same with the renormalised tail
  kd-*-ckpt   (not in the default set) the same with ``fused=False``: the checkpointed generic path
  sft-fused   (not in the default set) cross-entropy only (alpha 0) through the same fused loss: what
              KD costs over an SFT step that also never builds the [N, V] logits
  online      the teacher in memory too: each step a teacher forward (no grad) makes the same sparse
              targets, then the kd-bucket loss
Models are random Qwen3s built from configs (student 4 layers x 256, teacher 8 layers x 512; vocab 32000),
fp32 on CPU, AdamW, one optimizer step per batch.

Step time: ONE process builds every model and batch once, runs `--warmup` untimed rounds, then
`--rounds` timed rounds; each round runs every mode once (one step each), in a rotated order, so
all modes see the same machine load. Reported: median and min over rounds, and the ratio of the
medians (and of the mins) to SFT. The modes share one student and optimizer (weights drift, which
does not change the work a step does).

Peak memory (skip with --no-memory): one fresh subprocess per mode (same batches, saved to a temp
file) runs one warm-up step and then one measured step while a thread samples the process RSS
(/proc/self/statm) every millisecond; "peak +MB" is the highest RSS seen minus the RSS just before
the measured step (models, batches, optimizer state and, for online, the teacher already there):
what a step adds (activations, gradients, loss scratch). Separate processes, because the allocator
keeps freed memory around and one mode's peak would hide the next's. "resident MB" is the RSS
before the measured step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")
NAMES = {
    "sft": "student-only SFT (HF loss)",
    "kd-bucket": "train-student, bucket tail",
    "kd-renorm": "train-student, renorm tail",
    "sft-fused": "SFT, kdpipe's fused CE (alpha 0)",
    "kd-bucket-ckpt": "  same, checkpointed path",
    "kd-renorm-ckpt": "  same, checkpointed path",
    "online": "online KD (teacher in memory)",
}


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
    from kdpipe.teacher.hf import sparse_targets

    with torch.no_grad():
        hidden = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = teacher.lm_head(hidden[batch["target_rows"], batch["target_cols"]])
        ids, logprobs, _, tail = sparse_targets(logits, batch["labels"], k)
    return {**batch, "topk_ids": ids.long(), "topk_logprobs": logprobs, "tail_mass": tail}


def make_batches(n: int, batch: int, length: int, vocab: int, prompt: int, k: int, teacher) -> list[dict]:
    """Random token batches, the last `length - prompt` next tokens trained, with teacher targets and SFT labels."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (batch, length), generator=g)
        rows = torch.arange(batch).repeat_interleave(length - 1 - prompt)
        cols = torch.arange(prompt, length - 1).repeat(batch)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_rows": rows, "target_cols": cols,
             "labels": ids[rows, cols + 1]}
        sft = torch.full_like(ids, -100)
        sft[rows, cols + 1] = b["labels"]  # HF shifts: position c predicts token c + 1
        b["sft_labels"] = sft
        out.append(teacher_targets(teacher, b, k))
    return out


class Runner:
    """One student + optimizer; `step(mode, batch)` runs one optimizer step of that mode."""

    def __init__(self, modes: list[str], vocab: int, k: int, teacher=None):
        from kdpipe.losses import DistillLossConfig

        self.student = build("student", vocab).train()
        self.teacher = teacher if "online" in modes else None
        if self.teacher is None and "online" in modes:
            self.teacher = build("teacher", vocab).eval()
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-4)
        self.k = k
        cfg = {tail: DistillLossConfig("fkl", alpha=0.5, temperature=1.0, tail=tail) for tail in ("bucket", "renorm")}
        self.cfgs = {"kd-bucket": cfg["bucket"], "kd-renorm": cfg["renorm"], "online": cfg["bucket"],
                     "sft-fused": DistillLossConfig("fkl", alpha=0.0, temperature=1.0),
                     "kd-bucket-ckpt": DistillLossConfig("fkl", 0.5, 1.0, tail="bucket", fused=False),
                     "kd-renorm-ckpt": DistillLossConfig("fkl", 0.5, 1.0, tail="renorm", fused=False)}

    def step(self, mode: str, batch: dict) -> float:
        from kdpipe.train.trainer import student_distill_loss

        if mode == "sft":
            loss = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["sft_labels"]).loss
        else:
            if mode == "online":
                batch = teacher_targets(self.teacher, batch, self.k)
            loss = student_distill_loss(self.student, batch, self.cfgs[mode])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def time_modes(modes: list[str], batches: list[dict], runner: Runner, warmup: int, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(warmup + rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate: no mode always follows the same one
        for mode in order:
            batch = batches[r % len(batches)]
            start = time.perf_counter()
            runner.step(mode, batch)
            if r >= warmup:
                times[mode].append(time.perf_counter() - start)
        if r >= warmup:
            print(f"  round {r - warmup + 1}/{rounds}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in modes),
                  file=sys.stderr, flush=True)
    return times


def child_memory(mode: str, data: Path, vocab: int, k: int) -> dict:
    """Peak RSS added by one step of `mode`, after one warm-up step, in this fresh process."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    batches = torch.load(data)
    runner = Runner([mode], vocab, k)
    runner.step(mode, batches[0])
    base = rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    runner.step(mode, batches[1 % len(batches)])
    stop.set()
    sampler.join()
    return {"mode": mode, "peak_delta_mb": (peak[0] - base) / 2**20, "resident_mb": base / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every mode once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32, help="untrained prompt tokens per row")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--modes", default="sft,kd-bucket,kd-renorm,online", help=f"comma-separated, of {', '.join(NAMES)}")
    p.add_argument("--no-memory", action="store_true", help="skip the per-mode memory subprocesses")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child_memory(a.child, Path(a.data), a.vocab, a.k)))
        return
    modes = a.modes.split(",")
    if "sft" not in modes or any(m not in NAMES for m in modes):
        p.error(f"--modes must include sft and be among {', '.join(NAMES)}")
    teacher = build("teacher", a.vocab).eval()
    batches = make_batches(2, a.batch, a.length, a.vocab, a.prompt, a.k, teacher)
    runner = Runner(modes, a.vocab, a.k, teacher)
    times = time_modes(modes, batches, runner, a.warmup, a.rounds)
    del runner
    memory = {}
    if not a.no_memory:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "batches.pt"
            torch.save(batches, data)
            for mode in modes:
                cmd = [sys.executable, __file__, "--child", mode, "--data", str(data), "--vocab", str(a.vocab), "--k", str(a.k)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                memory[mode] = json.loads(out.strip().splitlines()[-1])

    n = a.batch * (a.length - 1 - a.prompt)
    print(f"batch {a.batch} x {a.length} tokens ({n} trained positions), vocab {a.vocab}, top-k {a.k}, fp32, "
          f"{torch.get_num_threads()} threads; step time: {a.rounds} rounds after {a.warmup} warm-up, modes alternated "
          f"in one process; memory: one subprocess per mode")
    print(f"{'mode':<32}{'median s':>9}{'min s':>8}{'x sft':>7}{'(min)':>7}{'peak +MB':>10}{'x sft':>7}{'resident MB':>13}")
    med = {m: statistics.median(t) for m, t in times.items()}
    low = {m: min(t) for m, t in times.items()}
    for mode in modes:
        row = (f"{NAMES[mode]:<32}{med[mode]:>9.2f}{low[mode]:>8.2f}{med[mode] / med['sft']:>7.2f}"
               f"{low[mode] / low['sft']:>7.2f}")
        if memory:
            m, s = memory[mode], memory["sft"]
            row += f"{m['peak_delta_mb']:>10.0f}{m['peak_delta_mb'] / s['peak_delta_mb']:>7.2f}{m['resident_mb']:>13.0f}"
        print(row)
    for tail in ("bucket", "renorm"):
        mode = f"kd-{tail}"
        if mode in modes:
            line = f"train-student/SFT, {tail} tail: step time {med[mode] / med['sft']:.2f}x (median), {low[mode] / low['sft']:.2f}x (min)"
            if memory:
                line += f", peak +MB {memory[mode]['peak_delta_mb'] / memory['sft']['peak_delta_mb']:.2f}x"
            print(line + "   [goal <= 1.15x]")
            # the two steps of one round ran back to back: their ratio sees one machine load; its spread
            # over the rounds is how much a single pair of timings (two runs one after the other) can mislead
            pairs = sorted(k / s for k, s in zip(times[mode], times["sft"]))
            print(f"  per round ({len(pairs)} rounds): {pairs[0]:.2f}x to {pairs[-1]:.2f}x, "
                  f"median {statistics.median(pairs):.2f}x  [" + ", ".join(f"{r:.2f}" for r in pairs) + "]")
    if "sft-fused" in modes and "kd-bucket" in modes:
        line = f"train-student (bucket) / SFT with the same fused CE: step time {med['kd-bucket'] / med['sft-fused']:.2f}x (median)"
        if memory:
            line += f", peak +MB {memory['kd-bucket']['peak_delta_mb'] / memory['sft-fused']['peak_delta_mb']:.2f}x"
        print(line)
    if "online" in modes and "kd-bucket" in modes:
        print(f"online KD / train-student (bucket): step time {med['online'] / med['kd-bucket']:.2f}x (median)")


if __name__ == "__main__":
    main()
