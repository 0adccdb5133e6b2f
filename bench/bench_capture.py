"""Capture throughput against a bare teacher forward over the same batches, in one run; bytes per token.

    python bench/bench_capture.py [--vocab 32768 --hidden 256 --layers 4 --examples 512 --top-k 32]

Three timings, interleaved and repeated (the median is kept), on the same length-sorted batches:
  forward  the bare teacher forward, `model(input_ids, attention_mask).logits` (what any caching costs at least)
  score    kdpipe's scoring of those batches (decoder + LM head on target positions + top-k/tail)
  cache    the whole `kdpipe cache-teacher` stage with the teacher already loaded (tokenizing, scoring,
           encoding, zstd Parquet, manifest)
and the ratio forward/score and forward/cache (goal >= 0.95: caching costs under 5% on top of the forward).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdpipe import tiny
from kdpipe.cache.format import read_manifest
from kdpipe.data import load_examples
from kdpipe.models import load_model, load_tokenizer
from kdpipe.stages import cache_teacher
from kdpipe.teacher import HFTeacher, make_batches, pad_batch
from kdpipe.templates import get_template
from kdpipe.tokenize import tokenize_examples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32768, help="model vocabulary (embedding rows; the tokenizer has 512)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--distill-prompt", action="store_true", help="distill every token (default: completions only)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "teacher"
        cfg = cache_teacher.CacheTeacherConfig(
            model=str(model_dir), dataset="kdpipe:arithmetic", limit=args.examples, top_k=args.top_k,
            batch_size=args.batch_size, dtype="fp32", distill_prompt=args.distill_prompt, cache=str(Path(tmp) / "cache"),
        )
        texts = [f"{e.fields['instruction']} {e.fields['output']}" for e in load_examples(cfg).examples]
        tok = tiny.train_tokenizer(texts + ["Write as a sum of two positive numbers. Answer:"] * 10, 512)
        tiny.init_model(model_dir, tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2,
                        head_dim=64, vocab_size=args.vocab)
        model, tokenizer = load_model(str(model_dir), "fp32", "cpu"), load_tokenizer(str(model_dir))
        examples, _ = tokenize_examples(load_examples(cfg).examples, get_template(cfg.resolved_template()), tokenizer, cfg)
        batches = [[examples[i] for i in b] for b in make_batches(examples, cfg.max_batch_tokens, cfg.batch_size)]
        teacher = HFTeacher(model, args.top_k, cfg.chunk_size)
        tokens = sum(len(e.input_ids) for e in examples)
        targets = sum(len(e.positions) for e in examples)

        @torch.inference_mode()
        def forward() -> None:
            for batch in batches:
                ids, mask = pad_batch(batch, 0, teacher.device)
                model(input_ids=ids, attention_mask=mask, use_cache=False).logits

        def score() -> None:
            for batch in batches:
                teacher.score(batch)

        def cache() -> None:
            cfg.overwrite = True
            cache_teacher.run(cfg, teacher=teacher)

        forward(), score()  # warm-up
        times: dict[str, list[float]] = {"forward": [], "score": [], "cache": []}
        for _ in range(args.repeats):
            for name, fn in (("forward", forward), ("score", score), ("cache", cache)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        manifest = read_manifest(cfg.cache)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: Qwen3 {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
          f"{len(examples)} examples, {tokens:,} tokens, {targets:,} target tokens, k={args.top_k}, {len(batches)} batches")
    print(f"{'':10}{'seconds':>9}{'tokens/s':>12}{'forward / this':>16}")
    for name in ("forward", "score", "cache"):
        print(f"{name:10}{med[name]:9.3f}{tokens / med[name]:12,.0f}{med['forward'] / med[name]:16.3f}")
    print(f"bytes on disk per target token: {manifest['totals']['bytes_per_target_token']} "
          f"(raw payload: {args.top_k * 6 + 8} bytes: int32 ids + fp16 log-probs + target log-prob + tail mass)")


if __name__ == "__main__":
    main()
