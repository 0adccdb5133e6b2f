"""Bytes per target token against student fidelity: fp16 top-k, compact top-k and sampled caches, side by side.

    python bench/bench_encoding.py [--vocab 151936 --examples 400 --steps 40]

One teacher, one data set, one run. The teacher is a tiny Qwen3 (2 layers x 64) over a 151,936-row
vocabulary (Qwen's), made peaked and heavy-tailed like a real LM's next-token distribution: its LM
head gets a Zipf log-prior bias (-zipf * log rank over a random permutation of the ids) on top of
random context-dependent logits (see --zipf/--scale; mean entropy and top-1 mass are printed). The
data is kdpipe:arithmetic tokenized with a 512-token BPE, every token distilled (--distill-prompt).

For each cache (fp16 = `--encoding plain` at k = 8/32/64, compact at the same k, sampled at N = 6/12/24):
  bytes/tok   shard bytes on disk / target tokens (everything: ids, positions, input ids, Parquet overhead)
  capture s   the whole cache-teacher stage with the teacher loaded
  step ms     median train step of a student (same init, same batches, AdamW) on that cache, fused loss;
              the students train in lockstep (one step each, in rotating order), so machine load hits all alike
  KL          held-out true KL(teacher || student) over the full vocabulary, nats per position
  top-1       held-out agreement of the student's argmax with the teacher's
  ECE         held-out ECE of the student's top-1 confidence against the actual next token (15 bins)
A last row trains on the fp16 k=32 cache in another batch order: the spread of training alone.
Plus: how the compact encoding's pieces were chosen (bytes/token of variants of the k = 32 targets),
and the change of a fixed student's loss between the fp16 and compact targets.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdpipe import tiny
from kdpipe.cache import open_cache
from kdpipe.cache.format import ENCODINGS
from kdpipe.cache.manifest import read_manifest
from kdpipe.data.sources import load_examples
from kdpipe.data.templates import get_template
from kdpipe.data.tokenize import tokenize_examples
from kdpipe.evaluation import metrics
from kdpipe.losses import DistillLossConfig
from kdpipe.models import load_tokenizer
from kdpipe.stages import cache_teacher
from kdpipe.teacher.hf import HFTeacher
from kdpipe.train.data import BlockShuffleSampler, CacheDataset, DistillCollator
from kdpipe.train.trainer import student_distill_loss

SEED_ROW = "fp16 k=32, data seed+1"  # the same cache in another batch order: the spread of training itself
CONFIGS = [("fp16 top-k", "plain", "topk", k) for k in (8, 32, 64)] + \
          [("compact top-k", "compact", "topk", k) for k in (8, 32, 64)] + \
          [("sampled", "compact", "sampled", n) for n in (6, 12, 24)]


def peaked_model(path: Path, tokenizer, vocab: int, seed: int, zipf: float, scale: float, hidden: int, layers: int):
    """A tiny Qwen3 whose LM head (with a bias) gives peaked, Zipf-tailed next-token distributions."""
    model = tiny.init_model(path, tokenizer, hidden_size=hidden, num_layers=layers, vocab_size=vocab, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen) * scale / hidden**0.5)
        rank = torch.randperm(vocab, generator=gen).double() + 1
        head.bias.copy_((-zipf * rank.log()).float())
    model.lm_head = head
    return model.eval()


def caches(cfg: cache_teacher.CacheTeacherConfig, model, root: Path) -> dict[str, dict]:
    """Each configuration's cache of the train part (timed) and, once, nothing else: fidelity uses the teacher."""
    out = {}
    for name, encoding, mode, k in CONFIGS:
        label = f"{name} {'N' if mode == 'sampled' else 'k'}={k}"
        cfg.encoding, cfg.sparse_mode, cfg.top_k, cfg.samples = encoding, mode, k, k
        cfg.cache = str(root / label.replace(" ", "_").replace("=", ""))
        teacher = HFTeacher(model, k, cfg.chunk_size, cache_teacher.sampling(cfg))
        start = time.perf_counter()
        cache_teacher.run(cfg, teacher=teacher)
        out[label] = {"path": cfg.cache, "capture_s": time.perf_counter() - start,
                      "bytes_per_token": read_manifest(cfg.cache)["totals"]["bytes_per_target_token"]}
    return out


class Trainee:
    """One student training on one cache with kdpipe's distillation loss (alpha 1, fused head) and AdamW."""

    def __init__(self, make_student, cache_path: str, batch: int, lr: float, seed: int):
        cache = open_cache(cache_path)
        self.model = make_student().train()
        self.data = CacheDataset(cache)
        self.order = BlockShuffleSampler(self.data.sizes, seed).order()
        self.collate = DistillCollator(0, self.model.config.vocab_size, cache.k)
        self.cfg = DistillLossConfig("fkl", alpha=1.0, sampled=cache.manifest.sampled)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.batch, self.times = batch, []

    def step(self, step: int) -> None:
        idx = [self.order[(step * self.batch + i) % len(self.order)] for i in range(self.batch)]
        inputs = self.collate([self.data[int(i)] for i in idx])
        start = time.perf_counter()
        student_distill_loss(self.model, inputs, self.cfg).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)


def train_all(trainees: dict[str, Trainee], steps: int) -> None:
    """Every student a step at a time, in a rotating order, so a busy machine slows all of them alike."""
    names = list(trainees)
    for step in range(steps):
        for name in names[step % len(names):] + names[: step % len(names)]:
            trainees[name].step(step)


@torch.no_grad()
def true_fidelity(student, teacher, examples) -> dict[str, float]:
    """Held-out true KL(teacher || student) over the full vocabulary, top-1 agreement, ECE (kdpipe.evaluation.metrics)."""
    kl, agree, conf, correct = [], [], [], []
    for e in examples:
        ids = torch.from_numpy(e.input_ids.astype(np.int64))[None]
        pos = torch.from_numpy(e.positions.astype(np.int64))
        t = teacher(input_ids=ids).logits[0, pos].double().log_softmax(-1)
        s = student(input_ids=ids).logits[0, pos].double().log_softmax(-1)
        kl.append(metrics.kl_atoms(t, s))
        agree.append(s.argmax(-1) == t.argmax(-1))
        conf.append(s.max(-1).values.exp())
        correct.append(s.argmax(-1) == ids[0, pos + 1])
    cat = lambda xs: torch.cat(xs).double().numpy()  # noqa: E731
    return {"kl": float(cat(kl).mean()), "top1": float(cat(agree).mean()), "ece": metrics.ece(cat(conf), cat(correct))}


def encoding_variants(cache_path: str, vocab: int) -> list[tuple[str, float, float]]:
    """Bytes per target token and write seconds of ways to store the same k = 32 targets (the compact design space)."""
    rows = [(e.id, e.input_ids, e.positions, e.targets) for e in open_cache(cache_path).iter_examples()]
    k = rows[0][3].topk_ids.shape[1]
    targets = sum(len(r[2]) for r in rows)
    plain = ENCODINGS["plain"].encode(rows, k, {"encoding": "plain"})
    compact = ENCODINGS["compact"].encode(rows, k, {"encoding": "compact", "vocab_size": vocab})
    compact16 = ENCODINGS["compact16"].encode(rows, k, {"encoding": "compact16", "vocab_size": vocab})
    opts = ENCODINGS["compact"].parquet_options
    variants = [
        ("plain: int32 ids, fp16 log-probs, zstd 3", plain, ENCODINGS["plain"].parquet_options(plain.schema)),
        ("uint32 ids + 8-bit codes, zstd 3, no BSS", compact, {"compression": "zstd", "compression_level": 3}),
        ("  + BYTE_STREAM_SPLIT, delta positions, zstd 3", compact, {**opts(compact.schema), "compression_level": 3}),
        ("  + zstd 9 (the compact encoding)", compact, opts(compact.schema)),
        ("  + zstd 19", compact, {**opts(compact.schema), "compression_level": 19}),
        ("  dictionaries instead of BSS, zstd 9", compact, {"compression": "zstd", "compression_level": 9, "use_dictionary": True}),
        ("16-bit codes (compact16), BSS, zstd 9", compact16, opts(compact16.schema)),
    ]
    out = []
    for name, table, kw in variants:
        start = time.perf_counter()
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=256, **kw)
        out.append((name, sink.getvalue().size / targets, time.perf_counter() - start))
    return out


def loss_change(student, plain_path: str, compact_path: str) -> float:
    """Relative change of a fixed student's distillation loss (fkl, bucket) between fp16 and compact targets."""
    values = []
    for path in (plain_path, compact_path):
        cache = open_cache(path)
        data = CacheDataset(cache)
        collate = DistillCollator(0, student.config.vocab_size, cache.k)
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(data), 32):
                inputs = collate([data[i] for i in range(start, min(start + 32, len(data)))])
                total += float(student_distill_loss(student, inputs, DistillLossConfig("fkl", alpha=1.0)))
        values.append(total)
    return abs(values[1] - values[0]) / abs(values[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--zipf", type=float, default=1.0, help="exponent of the LM head's Zipf log-prior")
    p.add_argument("--scale", type=float, default=6.0, help="std of the context-dependent logits")
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--heldout", type=int, default=40)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = cache_teacher.CacheTeacherConfig(model=str(root / "teacher"), dataset="kdpipe:arithmetic", part="train",
                                               limit=a.examples, distill_prompt=True, dtype="fp32", rows_per_shard=10**6)
        texts = [f"{e.fields['instruction']} {e.fields['output']}" for e in load_examples(cfg).examples]
        tok = tiny.train_tokenizer(texts + ["Write as a sum of two positive numbers. Answer:"] * 10, 512)
        teacher = peaked_model(root / "teacher", tok, a.vocab, a.seed, a.zipf, a.scale, a.hidden, a.layers)
        student0 = peaked_model(root / "student", tok, a.vocab, a.seed + 1, 0.0, 1.0, a.hidden, a.layers)  # no prior: learnt
        student_init = {k: v.clone() for k, v in student0.state_dict().items()}
        make_student = lambda: copy.deepcopy(student0)  # noqa: E731
        held_cfg = cache_teacher.CacheTeacherConfig(model=cfg.model, dataset="kdpipe:arithmetic", part="heldout",
                                                    limit=a.heldout, distill_prompt=True)
        tokenizer = load_tokenizer(cfg.model)
        heldout, _ = tokenize_examples(load_examples(held_cfg).examples, get_template(held_cfg.resolved_template()),
                                       tokenizer, held_cfg)
        shape = peakedness(teacher, heldout)
        built = caches(cfg, teacher, root)
        first = open_cache(built["fp16 top-k k=32"]["path"])
        runs = {label: (c["path"], a.seed) for label, c in built.items()}
        runs[SEED_ROW] = (built["fp16 top-k k=32"]["path"], a.seed + 1)
        trainees = {label: Trainee(make_student, path, a.batch_size, a.lr, seed) for label, (path, seed) in runs.items()}
        train_all(trainees, a.steps)
        rows = {}
        for label, t in trainees.items():
            rows[label] = {**built.get(label, {}), "step_ms": statistics.median(t.times) * 1000,
                           **true_fidelity(t.model.eval(), teacher, heldout)}
        change = loss_change(trainees["fp16 top-k k=32"].model, built["fp16 top-k k=32"]["path"],
                             built["compact top-k k=32"]["path"])
        variants = encoding_variants(built["fp16 top-k k=32"]["path"], a.vocab)
        untrained = make_student()
        untrained.load_state_dict(student_init)
        base = true_fidelity(untrained.eval(), teacher, heldout)
        targets = first.manifest.totals.target_tokens
    print(f"teacher: Qwen3 {a.layers} layers x {a.hidden}, vocab {a.vocab:,}, Zipf {a.zipf}, logit scale {a.scale}; "
          f"mean entropy {shape['entropy']:.2f} nats, mean top-1 prob {shape['top1']:.2f}, mean top-32 mass {shape['top32']:.3f}")
    print(f"data: kdpipe:arithmetic, {a.examples} train examples ({targets:,} target tokens, every token distilled), "
          f"{len(heldout)} held-out; students: same architecture, {a.steps} steps x {a.batch_size}, AdamW lr {a.lr}, fkl alpha 1")
    print(f"\n{'cache':<22}{'bytes/tok':>10}{'capture s':>11}{'step ms':>9}{'KL':>9}{'top-1':>8}{'ECE':>8}")
    print(f"{'(untrained student)':<22}{'':>10}{'':>11}{'':>9}{base['kl']:>9.4f}{base['top1']:>8.3f}{base['ece']:>8.3f}")
    for label, r in rows.items():
        size = f"{r['bytes_per_token']:>10.1f}{r['capture_s']:>11.2f}" if "capture_s" in r else f"{'':>10}{'':>11}"
        print(f"{label:<22}{size}{r['step_ms']:>9.1f}{r['kl']:>9.4f}{r['top1']:>8.3f}{r['ece']:>8.3f}")
    print("\nthe same k = 32 targets stored other ways (bytes per target token on disk, write seconds):")
    for name, size, secs in variants:
        print(f"  {name:<50}{size:>8.1f}{secs:>8.2f}")
    print(f"\nstudent trained on fp16 k=32: its distillation loss on compact vs fp16 targets differs by {change:.2e} (relative)")


@torch.no_grad()
def peakedness(model, examples) -> dict[str, float]:
    """Mean entropy, top-1 probability and top-32 mass of the teacher on the held-out positions."""
    ent, top1, top32 = [], [], []
    for e in examples:
        ids = torch.from_numpy(e.input_ids.astype(np.int64))[None]
        logp = model(input_ids=ids).logits[0, torch.from_numpy(e.positions.astype(np.int64))].double().log_softmax(-1)
        ent.append(-(logp.exp() * logp).sum(-1))
        top = logp.topk(32, -1).values.exp()
        top1.append(top[:, 0])
        top32.append(top.sum(-1))
    return {"entropy": float(torch.cat(ent).mean()), "top1": float(torch.cat(top1).mean()), "top32": float(torch.cat(top32).mean())}


if __name__ == "__main__":
    main()
