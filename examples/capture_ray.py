"""Sharded teacher capture as a Ray job: one task per part (one GPU each, or several with vLLM tensor
parallelism), retried on failure (a retry resumes after the part's last complete shard), then the merge.

    ray job submit --working-dir . -- python examples/capture_ray.py \\
        --model Qwen/Qwen3-4B --dataset imdb --cache s3://my-bucket/kd/imdb --num-shards 8 -- --top-k 32 --backend vllm

Arguments after ``--`` go to every ``kdpipe cache-teacher``. The cache must be where every node can write:
object storage (s3://, gs://) or a shared filesystem. Needs ``pip install ray`` and kdpipe on every node.
"""

from __future__ import annotations

import argparse
import subprocess

import ray


def part_command(args: argparse.Namespace, index: int) -> list[str]:
    cmd = ["kdpipe", "cache-teacher", "--model", args.model, "--dataset", args.dataset,
           "--cache", f"{args.cache}.parts/part-{index}", "--num-shards", str(args.num_shards), "--shard-index", str(index)]
    if args.gpus_per_part > 1:
        cmd += ["--backend", "vllm", "--vllm-tensor-parallel-size", str(args.gpus_per_part)]
    return cmd + args.extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--cache", required=True, help="merged cache: s3://bucket/prefix or a shared folder")
    parser.add_argument("--num-shards", type=int, default=8)
    parser.add_argument("--gpus-per-part", type=int, default=1, help=">1: vLLM tensor parallelism across them")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then options for kdpipe cache-teacher")
    args = parser.parse_args()
    args.extra = [a for a in args.extra if a != "--"]

    ray.init()

    @ray.remote(num_gpus=args.gpus_per_part, max_retries=3, retry_exceptions=True)
    def capture(index: int) -> str:
        subprocess.run(part_command(args, index), check=True)
        return f"{args.cache}.parts/part-{index}"

    parts = ray.get([capture.remote(i) for i in range(args.num_shards)])
    subprocess.run(["kdpipe", "cache", "merge", *parts, "--output", args.cache], check=True)
    subprocess.run(["kdpipe", "cache", "verify", args.cache], check=True)


if __name__ == "__main__":
    main()
