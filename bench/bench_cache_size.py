"""Bytes on disk per target token against k, for one teacher and one data set, in one run.

    python bench/bench_cache_size.py [--vocab 32768 --examples 1024 --ks 8,16,32,64 --distill-prompt]

The teacher is a random Qwen3 (hidden 256, 2 layers) over a `--vocab` vocabulary. Caveat: a random
teacher's distributions are nearly flat, so its top-k log-probs are nearly equal and compress far
better than a trained teacher's, while its ids are spread over the vocabulary (harder than a trained
teacher's Zipf-like ids): read the figures as the scaling with k, not as a trained teacher's size.
Prints, per k: the raw payload per target position (int32 ids + fp16 log-probs + fp32 target
log-prob + fp32 tail mass), the bytes on disk per target token (the whole cache: input_ids,
positions, targets, Parquet overhead) and the ratio to the raw payload.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kdpipe import tiny
from kdpipe.data.sources import load_examples
from kdpipe.stages import cache_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--examples", type=int, default=1024)
    p.add_argument("--ks", default="8,16,32,64")
    p.add_argument("--distill-prompt", action="store_true", help="distill every token (default: completions only)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "teacher"
        base = dict(model=str(model_dir), dataset="kdpipe:arithmetic", limit=args.examples, dtype="fp32",
                    distill_prompt=args.distill_prompt, device="cpu")
        texts = [f"{e.fields['instruction']} {e.fields['output']}"
                 for e in load_examples(cache_teacher.CacheTeacherConfig(**base)).examples]
        tok = tiny.train_tokenizer(texts + ["Write as a sum of two positive numbers. Answer:"] * 10, 512)
        tiny.init_model(model_dir, tok, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                        vocab_size=args.vocab)
        print(f"random Qwen3 teacher, vocab {args.vocab}; {args.examples} examples of kdpipe:arithmetic"
              f"{' (every token distilled)' if args.distill_prompt else ''}")
        print(f"{'k':>4}{'target tokens':>15}{'tokens':>9}{'raw B/target':>14}{'disk B/target':>15}{'disk/raw':>10}")
        for k in (int(x) for x in args.ks.split(",")):
            cfg = cache_teacher.CacheTeacherConfig(**base, top_k=k, cache=str(Path(tmp) / f"k{k}"))
            t = cache_teacher.run(cfg, "bench")["totals"]
            raw = k * 6 + 8
            disk = t["bytes"] / t["target_tokens"]
            print(f"{k:>4}{t['target_tokens']:>15,}{t['tokens']:>9,}{raw:>14}{disk:>15.1f}{disk / raw:>10.2f}")


if __name__ == "__main__":
    main()
