"""Capture throughput against its real limit and a bare teacher forward, in one run; bytes per token.

    python bench/bench_capture.py [--vocab 32768 --hidden 512 --layers 8 --examples 256 --top-k 8,32,64]
                                  [--modes completions,every]

Timings, interleaved and repeated (the median is kept), on the same length-sorted batches:
  forward  the bare teacher forward, `model(input_ids, attention_mask).logits`: full-vocabulary logits at
           every position, which no cache needs (so ratios against it flatter kdpipe)
  limit    the real limit: the decoder forward plus the LM head on the target rows only (in the same
           chunks as kdpipe), no top-k, nothing stored
  score    kdpipe's scoring of those batches (decoder + LM head on target positions + top-k/tail), per k
  cache    the whole `kdpipe cache-teacher` stage with the teacher already loaded (tokenizing, scoring,
           encoding, zstd Parquet, manifest), per k
and the ratios limit/score and limit/cache (capture / limit as throughput; goal >= 0.95: caching costs
under 5% on top of the work that cannot be avoided) and forward/cache, for completions-only
distillation and for every token distilled (`--modes`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kdpipe import tiny
from kdpipe.cache.manifest import read_manifest
from kdpipe.data.sources import load_examples
from kdpipe.data.templates import get_template
from kdpipe.data.tokenize import tokenize_examples
from kdpipe.models import load_model, load_tokenizer
from kdpipe.stages import cache_teacher
from kdpipe.teacher.hf import HFTeacher, make_batches, pad_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32768, help="model vocabulary (embedding rows; the tokenizer has 512)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--top-k", default="8,32,64", help="comma-separated k values")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="completions,every", help="completions (prompt not distilled), every (--distill-prompt)")
    args = p.parse_args()
    ks = [int(k) for k in args.top_k.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "teacher"
        base = cache_teacher.CacheTeacherConfig(model=str(model_dir), dataset="kdpipe:arithmetic", limit=args.examples)
        texts = [f"{e.fields['instruction']} {e.fields['output']}" for e in load_examples(base).examples]
        tok = tiny.train_tokenizer(texts + ["Write as a sum of two positive numbers. Answer:"] * 10, 512)
        tiny.init_model(model_dir, tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2,
                        head_dim=64, vocab_size=args.vocab)
        model, tokenizer = load_model(str(model_dir), "fp32", "cpu"), load_tokenizer(str(model_dir))
        print(f"model: Qwen3 {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; {args.examples} examples; "
              f"median of {args.repeats}; torch threads {torch.get_num_threads()}")
        print(f"{'mode':12}{'k':>4}{'forward s':>10}{'limit s':>9}{'score s':>9}{'cache s':>9}"
              f"{'limit/score':>12}{'limit/cache':>12}{'fwd/cache':>10}{'B/target':>9}")
        for mode in args.modes.split(","):
            distill_prompt = {"completions": False, "every": True}[mode]
            cfgs = {k: cache_teacher.CacheTeacherConfig(
                model=str(model_dir), dataset="kdpipe:arithmetic", limit=args.examples, top_k=k, batch_size=args.batch_size,
                dtype="fp32", distill_prompt=distill_prompt, cache=str(Path(tmp) / f"cache-{mode}-{k}"), overwrite=True)
                for k in ks}
            cfg = cfgs[ks[0]]
            examples, _ = tokenize_examples(load_examples(cfg).examples, get_template(cfg.resolved_template()), tokenizer, cfg)
            batches = [[examples[i] for i in b] for b in make_batches(examples, cfg.max_batch_tokens, cfg.batch_size)]
            teachers = {k: HFTeacher(model, k, cfg.chunk_size) for k in ks}
            device, head = teachers[ks[0]].device, model.get_output_embeddings()

            @torch.inference_mode()
            def forward() -> None:
                for batch in batches:
                    ids, mask = pad_batch(batch, 0, device)
                    model(input_ids=ids, attention_mask=mask, use_cache=False)

            @torch.inference_mode()
            def limit() -> None:
                for batch in batches:
                    ids, mask = pad_batch(batch, 0, device)
                    rows = torch.cat([torch.full((len(e.positions),), i) for i, e in enumerate(batch)])
                    cols = torch.from_numpy(np.concatenate([e.positions for e in batch]).astype(np.int64))
                    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                    selected = hidden[rows, cols]
                    for start in range(0, len(selected), cfg.chunk_size):
                        head(selected[start:start + cfg.chunk_size])

            def score(k: int) -> Callable[[], None]:
                return lambda: [teachers[k].score(batch) for batch in batches]

            def cache(k: int) -> Callable[[], None]:
                return lambda: cache_teacher.run(cfgs[k], teacher=teachers[k])

            runs = {"forward": forward, "limit": limit, **{f"score{k}": score(k) for k in ks},
                    **{f"cache{k}": cache(k) for k in ks}}
            forward(), limit()  # warm-up
            times: dict[str, list[float]] = {name: [] for name in runs}
            for r in range(args.repeats):
                names = list(runs)
                for name in names[r % len(names):] + names[: r % len(names)]:  # rotated: same machine load for all
                    start = time.perf_counter()
                    runs[name]()
                    times[name].append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in times.items()}
            for k in ks:
                per_target = read_manifest(cfgs[k].cache)["totals"]["bytes_per_target_token"]
                print(f"{mode:12}{k:>4}{med['forward']:10.3f}{med['limit']:9.3f}{med[f'score{k}']:9.3f}"
                      f"{med[f'cache{k}']:9.3f}{med['limit'] / med[f'score{k}']:12.3f}"
                      f"{med['limit'] / med[f'cache{k}']:12.3f}{med['forward'] / med[f'cache{k}']:10.3f}{per_target:9.1f}")
            targets = sum(len(e.positions) for e in examples)
            print(f"  ({mode}: {sum(len(e.input_ids) for e in examples):,} tokens, {targets:,} target tokens, "
                  f"{len(batches)} batches)")


if __name__ == "__main__":
    main()
