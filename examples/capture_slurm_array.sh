#!/bin/bash
# Sharded teacher capture as a Slurm job array: array task i caches part i of N on one GPU.
#
#   export MODEL=Qwen/Qwen3-4B DATASET=imdb CACHE=/shared/cache/imdb      # or CACHE=s3://bucket/kd/imdb
#   jid=$(sbatch --parsable --array=0-7 examples/capture_slurm_array.sh --top-k 32 --backend vllm)
#   sbatch --dependency=afterok:$jid --wrap "examples/merge_parts.sh $CACHE 8"
#
# The array size is the number of parts (SLURM_ARRAY_TASK_COUNT). A failed or preempted task is simply
# resubmitted (`sbatch --array=3 ...` or --requeue): it resumes after its last complete shard. CACHE must be
# on a filesystem every node sees, or on object storage. Teachers larger than one GPU: ask for more GPUs
# per task (--gres=gpu:2) and pass `--backend vllm --vllm-tensor-parallel-size 2`.
#SBATCH --job-name=kdpipe-capture
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --output=capture-%A_%a.log
set -euo pipefail

: "${MODEL:?export MODEL}" "${DATASET:?export DATASET}" "${CACHE:?export CACHE}"
i=${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=0-N}
n=${SLURM_ARRAY_TASK_COUNT:?submit with sbatch --array=0-N}
exec ${KDPIPE:-kdpipe} cache-teacher --model "$MODEL" --dataset "$DATASET" --cache "${CACHE}.parts/part-${i}" \
  --num-shards "$n" --shard-index "$i" "$@"
