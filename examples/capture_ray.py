"""Sharded teacher capture as a Ray job: one Ray task per part (one GPU each, several with vLLM tensor
parallelism, or none on CPU), retried by Ray when it fails (a retry resumes after the part's last complete
shard), then the merge and its verification.

    ray job submit --working-dir . -- python examples/capture_ray.py \\
        --model Qwen/Qwen3-4B --dataset imdb --cache s3://my-bucket/kd/imdb --num-shards 8 -- --top-k 32 --backend vllm

    python examples/capture_ray.py --num-cpus 2 --gpus-per-part 0 \\
        --model MODEL --dataset kdpipe:arithmetic --cache cache/arith --num-shards 2 -- --limit 40   # local, CPU

Arguments after ``--`` go to every ``kdpipe cache-teacher``. The cache must be where every node can write:
object storage (s3://, gs://) or a shared filesystem. Needs ``pip install ray`` and kdpipe on every node
(``KDPIPE`` overrides the command, e.g. ``"python -m kdpipe.cli"``).

Why tasks and not Ray Data's ``map_batches`` with the teacher as a stateful actor: each part is a whole
``kdpipe cache-teacher`` run, so it keeps kdpipe's own shard writer (deterministic shard contents, sha256 in
the manifest, resume after the last complete shard) and ``kdpipe cache merge`` joins the parts into a cache
byte-identical to a single-process one. Ray Data would stream rows to the actors and write its own blocks,
with neither the manifest nor the resume; a retried part here recomputes at most one shard.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess

import ray


def part_command(args: argparse.Namespace, index: int) -> list[str]:
    cmd = [*shlex.split(os.environ.get("KDPIPE", "kdpipe")), "cache-teacher", "--model", args.model,
           "--dataset", args.dataset, "--cache", f"{args.cache}.parts/part-{index}",
           "--num-shards", str(args.num_shards), "--shard-index", str(index)]
    if args.gpus_per_part == 0:
        cmd += ["--device", "cpu"]
    if args.gpus_per_part > 1:
        cmd += ["--backend", "vllm", "--vllm-tensor-parallel-size", str(args.gpus_per_part)]
    return cmd + args.extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--cache", required=True, help="merged cache: s3://bucket/prefix or a shared folder")
    parser.add_argument("--num-shards", type=int, default=8, help="parts: one Ray task each")
    parser.add_argument("--gpus-per-part", type=int, default=1,
                        help="0: CPU (one CPU per part); >1: vLLM tensor parallelism across them")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="start a local Ray with this many CPUs (default: join the job's cluster)")
    parser.add_argument("--max-retries", type=int, default=3, help="Ray retries of a failed part")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then options for kdpipe cache-teacher")
    args = parser.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    if args.gpus_per_part < 0:
        parser.error("--gpus-per-part must be 0 or more")

    if args.num_cpus:  # a local Ray of its own: no dashboard (processes a one-off capture does not need)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    else:
        ray.init()
    kdpipe = shlex.split(os.environ.get("KDPIPE", "kdpipe"))

    # retry_exceptions: a part whose process dies (killed, out of memory, a lost node's disk) raises here,
    # and Ray runs it again; kdpipe then skips the shards the manifest already records as complete
    @ray.remote(num_gpus=args.gpus_per_part, num_cpus=1, max_retries=args.max_retries, retry_exceptions=True)
    def capture(index: int) -> str:
        subprocess.run(part_command(args, index), check=True)
        return f"{args.cache}.parts/part-{index}"

    parts = ray.get([capture.remote(i) for i in range(args.num_shards)])
    subprocess.run([*kdpipe, "cache", "merge", *parts, "--output", args.cache], check=True)
    subprocess.run([*kdpipe, "cache", "verify", args.cache], check=True)


if __name__ == "__main__":
    main()
