"""Target tokens/s and peak memory of train-student and finetune batched padded, length-grouped and packed.

    .venv/bin/python bench/bench_packing.py [--steps 50] [--batch 8] [--seed 0] [--cases imdb,demo]
                                            [--finetune-steps 10] [--threads N] [--layers 3] [--hidden 256]
                                            [--vocab 4096] [--stages train-student,finetune]

Cases (rows made in memory in the cache's decoded form, every position a target with top-32 targets;
the three batchings read the same rows, so reading the Parquet cache is left out):
  imdb   lengths from a lognormal with IMDB's mean (~300 tokens) and spread (sigma 0.7, median ~235),
         capped at 512 (as `--max-length 512` does), at least 16
  demo   the demo's short rows: the arithmetic task in its template, tokenized by a tiny BPE (19-26 tokens)

Per case, three students (a random Qwen3, default 3 layers x 256, vocab 4096, fp32, AdamW, the same init) are
trained side by side, one optimizer step each in turn (padded, grouped, packed, then the next step), so
machine load hits the three alike. Each gets its batches exactly as train-student makes them:
`BlockShuffleSampler` (window 4) + `DistillCollator`; grouped: the sampler with the rows' lengths;
packed: `DistillCollator(packed=True)` (rows as long as the batch's longest example). The loss is
train-student's (`student_distill_loss`, fkl, alpha 0.5, bucket tail). Finetune: the same for
`SFTCollator` + the fused cross-entropy (alpha 0), plus "hf-loss": the old path (padded, the model's
own full-vocabulary loss).

Reported per batching: target tokens/s (sum of targets / sum of step times), the ratio to padded,
tokens the model computes per step (padding included), and peak memory: the highest RSS a sampling
thread (1 ms) saw during the mode's steps, minus the RSS before the step (max over steps; one process,
so the allocator's reuse blurs it: a rough figure). The loss curves: padded and packed train on the same
batches, so their losses must agree to float tolerance at every step; grouped sees other batches (its
curve is compared by its mean only).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np
import torch

from kdpipe.cache.format import CachedExample, Targets
from kdpipe.losses import DistillLossConfig
from kdpipe.train.data import BlockShuffleSampler, DistillCollator, SFTCollator
from kdpipe.train.trainer import student_distill_loss

PAGE = os.sysconf("SC_PAGE_SIZE")
K = 32
MODES = ("padded", "grouped", "packed")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def lengths_of(case: str, n: int, seed: int) -> np.ndarray:
    if case == "imdb":
        rng = np.random.default_rng(seed)
        return np.clip(rng.lognormal(np.log(300) - 0.7**2 / 2, 0.7, n).astype(int), 16, 512)
    from kdpipe import tiny
    from kdpipe.data import arithmetic
    from kdpipe.data.templates import ARITHMETIC

    rows = arithmetic.generate("train")[:n]
    texts = [ARITHMETIC.format(instruction=r["instruction"]) + " " + r["output"] for r in rows]
    tok = tiny.train_tokenizer(texts, vocab_size=300)
    return np.array([len(tok(t)["input_ids"]) for t in texts])


def make_rows(lengths: np.ndarray, seed: int, vocab: int) -> list[CachedExample]:
    rng = np.random.default_rng(seed + 1)
    rows = []
    for i, n in enumerate(lengths):
        ids = rng.integers(2, vocab, n).astype(np.int32)
        p = n - 1
        top = rng.integers(0, vocab, (p, K)).astype(np.int32)
        lp = np.sort(np.log(rng.dirichlet(np.ones(K + 1), p)[:, :K]).astype(np.float32), -1)[:, ::-1].copy()
        tail = (1 - np.exp(lp).sum(-1)).astype(np.float32)
        rows.append(CachedExample(f"r{i}", ids, np.arange(p, dtype=np.int32), Targets(top, lp, lp[:, 0], tail)))
    return rows


def student(args: argparse.Namespace):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(args.seed)
    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
                      max_position_embeddings=1024, attn_implementation="sdpa")
    return Qwen3ForCausalLM(cfg).train()


class Peak:
    """The highest RSS seen while inside the `with` block, minus the RSS at its start."""

    def __enter__(self) -> Peak:
        self.start, self.peak, self.done = rss(), 0, False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self.done = True
        self.thread.join()
        self.added = max(self.peak, rss()) - self.start


def batches(rows, lengths, mode: str, batch: int, seed: int, steps: int, sft: bool, vocab: int) -> list[dict]:
    sampler = BlockShuffleSampler([256] * (len(rows) // 256), seed, window=4, stripe=batch,
                                  lengths=lengths if mode == "grouped" else None)
    order = sampler.order(0)
    collate = (SFTCollator(0, packed=mode == "packed") if sft else
               DistillCollator(0, vocab, K, packed=mode == "packed"))
    return [collate([rows[i] for i in order[s * batch : (s + 1) * batch]]) for s in range(steps)]


def hf_loss(model, b: dict) -> torch.Tensor:
    """finetune's old loss: transformers' own (full-vocabulary logits at every position), padded rows."""
    labels = torch.full_like(b["input_ids"], -100)
    labels[b["target_rows"], b["target_cols"] + 1] = b["labels"]
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss


def run(case: str, args: argparse.Namespace, sft: bool) -> None:
    steps = args.finetune_steps if sft else args.steps
    n = max(1024, -(-steps * args.batch // 256) * 256)
    lengths = lengths_of(case, n, args.seed)
    rows = make_rows(lengths, args.seed, args.vocab)
    modes = MODES + (("hf-loss",) if sft else ())
    data = {m: batches(rows, lengths, "padded" if m == "hf-loss" else m, args.batch, args.seed, steps + 1, sft,
                       args.vocab) for m in modes}
    cfg = DistillLossConfig(alpha=0.0) if sft else DistillLossConfig("fkl", 0.5, 1.0, tail="bucket")
    models = {m: student(args) for m in modes}
    opts = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-3) for m in modes}
    secs, peak, losses = {m: 0.0 for m in modes}, {m: 0 for m in modes}, {m: [] for m in modes}
    for s in range(steps + 1):  # step 0: warm-up, not timed
        for m in modes[s % len(modes):] + modes[: s % len(modes)]:  # rotated: no mode always runs first
            b = data[m][s]
            with Peak() as mem:
                t = time.perf_counter()
                loss = hf_loss(models[m], b) if m == "hf-loss" else student_distill_loss(models[m], b, cfg)
                loss.backward()
                opts[m].step()
                opts[m].zero_grad(set_to_none=True)
                took = time.perf_counter() - t
            if s:
                secs[m] += took
                peak[m] = max(peak[m], mem.added)
                losses[m].append(float(loss.detach()))
        if s % 10 == 0:
            print(f"  {case} {'finetune' if sft else 'train-student'}: step {s}/{steps}", file=sys.stderr, flush=True)
    stage = "finetune" if sft else "train-student"
    print(f"\n{stage}, {case}: {steps} steps of {args.batch} rows, lengths mean {lengths.mean():.0f} "
          f"median {np.median(lengths):.0f} max {lengths.max()}")
    print(f"{'batching':<10}{'target tok/s':>14}{'x padded':>10}{'tokens/step':>13}{'rows/step':>11}"
          f"{'peak +MB':>10}{'mean loss':>11}")
    data = {m: data[m][1:] for m in modes}
    targets = {m: sum(len(b["labels"]) for b in data[m]) for m in modes}
    speed = {m: targets[m] / secs[m] for m in modes}
    for m in modes:
        computed = np.mean([b["input_ids"].numel() for b in data[m]])
        rows_per = np.mean([b["input_ids"].shape[0] for b in data[m]])
        print(f"{m:<10}{speed[m]:>14.0f}{speed[m] / speed['padded']:>10.2f}{computed:>13.0f}{rows_per:>11.1f}"
              f"{peak[m] / 2**20:>10.0f}{np.mean(losses[m]):>11.4f}")
    diff = np.abs(np.array(losses["packed"]) - np.array(losses["padded"])) / np.abs(losses["padded"])
    print(f"packed vs padded loss, steps 1-{steps}: max relative difference {diff.max():.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--finetune-steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default="imdb,demo")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--stages", default="train-student,finetune")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()}-core CPU (shared, noisy), torch {torch.__version__}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f} at start; student Qwen3 {args.layers} x {args.hidden}, vocab "
          f"{args.vocab}, fp32, sdpa, AdamW; step 0 of each is a warm-up (not counted)", flush=True)
    for case in args.cases.split(","):
        for stage in args.stages.split(","):
            run(case, args, sft=stage == "finetune")


if __name__ == "__main__":
    main()
