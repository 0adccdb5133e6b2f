#!/usr/bin/env bash
# Sharded teacher capture with a plain loop: NUM_SHARDS parts, as many at once as this machine has GPUs
# (one GPU each), then one merge. Each part writes its own folder (or object-storage prefix); rerunning
# the script resumes every part after its last complete shard and skips the finished ones.
#
#   MODEL=Qwen/Qwen3-4B DATASET=imdb CACHE=cache/imdb NUM_SHARDS=8 examples/capture_loop.sh --top-k 32
#   CACHE=s3://my-bucket/kd/imdb examples/capture_loop.sh ...      # parts and the merged cache on S3
#
# Arguments after the script name go to every `kdpipe cache-teacher` (--top-k, --split, --backend vllm ...).
# The same parts can be run on several machines instead: give machine i `--num-shards N --shard-index i`.
set -euo pipefail

MODEL=${MODEL:?set MODEL (teacher: hub id or path)}
DATASET=${DATASET:?set DATASET (hub name or a local .jsonl/.csv/.parquet)}
CACHE=${CACHE:?set CACHE (the merged cache: a folder or s3://bucket/prefix)}
NUM_SHARDS=${NUM_SHARDS:-8}
KDPIPE=${KDPIPE:-kdpipe}
if [[ -z "${GPUS:-}" ]]; then GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true); fi
PARALLEL=$(( GPUS > 0 ? GPUS : 1 ))    # CPU only: one part at a time

pids=()
failed=0
for (( i = 0; i < NUM_SHARDS; i++ )); do
  part="${CACHE}.parts/part-${i}"
  if (( GPUS > 0 )); then export CUDA_VISIBLE_DEVICES=$(( i % GPUS )); fi
  $KDPIPE cache-teacher --model "$MODEL" --dataset "$DATASET" --cache "$part" \
    --num-shards "$NUM_SHARDS" --shard-index "$i" "$@" &
  pids+=($!)
  if (( ${#pids[@]} == PARALLEL )); then
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    pids=()
  fi
done
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
if (( failed )); then
  echo "some parts failed: rerun the same command to resume them" >&2
  exit 1
fi
KDPIPE=$KDPIPE "$(dirname "$0")/merge_parts.sh" "$CACHE" "$NUM_SHARDS"
