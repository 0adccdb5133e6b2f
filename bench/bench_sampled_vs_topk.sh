#!/usr/bin/env bash
# Sampled vs top-k caches on a *trained* teacher: the demo's (run `make demo` first).
#
#   bash bench/bench_sampled_vs_topk.sh [WORKDIR] [SEEDS]   (defaults /tmp/kdpipe-sampled-vs-topk, "0 1 2 3")
#
# Caches the demo teacher (runs/demo/teacher, vocabulary 300) on the 2,700 training numbers as top-k
# k = 8 and 64 (plain) and sampled N = 6, 12, 24 (compact), distils the same untrained student
# (runs/demo/student-init-seed0) from each with pure forward KL (alpha 1, T 1, bucket tail: the settings every
# mode supports), same steps, batches and seed, and evaluates all on the 290 test numbers against a
# held-out cache of the *full* teacher distribution (k = 300 = the vocabulary): KL there is the true KL.
# One table per training seed: the seed-to-seed spread is the noise floor of the comparison.
set -euo pipefail
W=${1:-/tmp/kdpipe-sampled-vs-topk}
SEEDS=${2:-0 1 2 3}
T=runs/demo/teacher S=runs/demo/student-init-seed0
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false KDPIPE_NO_PROGRESS=1 OMP_NUM_THREADS=1
[ -d "$T" ] && [ -d "$S" ] || { echo "run 'make demo' first (needs $T and $S)"; exit 2; }
common=(--model "$T" --dataset kdpipe:arithmetic --dtype fp32 --batch-size 64)
kdpipe cache-teacher "${common[@]}" --split test --top-k 300 --cache "$W/heldout-full" | tail -1
declare -A caches=([k8]="--top-k 8" [k64]="--top-k 64" [n6]="--sparse-mode sampled --samples 6 --encoding compact"
                   [n12]="--sparse-mode sampled --samples 12 --encoding compact" [n24]="--sparse-mode sampled --samples 24 --encoding compact")
for name in k8 k64 n6 n12 n24; do
  # shellcheck disable=SC2086
  kdpipe cache-teacher "${common[@]}" ${caches[$name]} --cache "$W/cache-$name" | tail -1
done
for seed in $SEEDS; do
  models=()
  for name in k8 k64 n6 n12 n24; do
    kdpipe train-student --model "$S" --cache "$W/cache-$name" --output "$W/seed$seed-$name" --full --loss fkl --alpha 1 \
      --max-steps 1000 --batch-size 32 --lr 0.003 --warmup 0.05 --save-steps 1000 --logging-steps 500 --seed "$seed" | tail -1
    models+=(--model "$W/seed$seed-$name")
  done
  echo "seed $seed:"
  kdpipe evaluate "${models[@]}" --dataset kdpipe:arithmetic --split test --task exact-match --cache "$W/heldout-full" \
    --output "$W/eval-seed$seed" --no-plot
done
