#!/usr/bin/env bash
# Join the N parts written by capture_slurm_array.sh / capture_ray.py into one cache and verify it.
#   examples/merge_parts.sh CACHE N        (parts are CACHE.parts/part-0 ... part-(N-1); CACHE may be s3://...)
set -euo pipefail
CACHE=${1:?usage: merge_parts.sh CACHE NUM_SHARDS}
N=${2:?usage: merge_parts.sh CACHE NUM_SHARDS}
parts=()
for (( i = 0; i < N; i++ )); do parts+=("${CACHE}.parts/part-${i}"); done
${KDPIPE:-kdpipe} cache merge "${parts[@]}" --output "$CACHE"
${KDPIPE:-kdpipe} cache verify "$CACHE"
