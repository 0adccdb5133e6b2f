#!/usr/bin/env bash
# A student with *another tokenizer* distilled from the offline demo's cache (run `make demo` first).
#
#   bash bench/bench_cross_tokenizer_demo.sh [WORKDIR] [VOCAB] [ULD_WEIGHTS] [SEEDS]
#   (defaults runs/demo-xtok, 270, "0 0.5", "0"; a seed other than 0 names its runs `...-s<seed>`)
#
# The demo's teacher has a 300-id byte-level BPE trained on kdpipe:arithmetic (42 merges: `Ġ7`, `00`,
# `Ġ+`, whole words). The new student gets a byte-level BPE trained on the same text with VOCAB ids
# (270: 12 merges, so answers are mostly one digit a token, `Ġ` and `+` apart; ~48 tokens a row
# against the teacher's ~24) and the demo student's architecture and seed. It is distilled from the
# demo's training cache with `--cross-tokenizer` (once per ULD weight), trained by SFT alone as its
# baseline, with the demo KD student's steps, batch, lr, warmup, loss and alpha; then one `kdpipe
# evaluate` puts the teacher, the demo's two same-tokenizer students and the new-tokenizer students
# side by side on the 290 test numbers, with fidelity against the demo's held-out cache (for the new
# tokenizer: on the aligned positions only, see the README's "A student with another tokenizer").
set -euo pipefail
W=${1:-runs/demo-xtok}
VOCAB=${2:-270}
ULD=${3:-0 0.5}
SEEDS=${4:-0}
T=runs/demo/teacher C=cache/demo H=cache/demo-heldout
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false KDPIPE_NO_PROGRESS=1
K=${KDPIPE:-kdpipe}
for p in "$T" "$C" "$H" runs/demo/student-kd-seed0 runs/demo/student-sft-seed0; do
  [ -e "$p" ] || { echo "run 'make demo' first (needs $p)"; exit 2; }
done
S=$W/student-init-v$VOCAB
# The demo's student_init architecture and seed; only the tokenizer differs.
[ -d "$S" ] || $K init-model --output "$S" --train-tokenizer-on kdpipe:arithmetic --vocab-size "$VOCAB" \
  --hidden-size 64 --layers 2 --heads 2 --kv-heads 1 --head-dim 32 --seed 1 | tail -1
# The demo's train section (alpha 0.5: the CE half also trains every student position).
train=(--full --max-steps 1000 --batch-size 32 --lr 0.003 --warmup 0.05 --save-steps 500 --logging-steps 250)
models=(--model "$T" --model runs/demo/student-kd-seed0 --model runs/demo/student-sft-seed0)
for seed in $SEEDS; do
  sfx=$([ "$seed" = 0 ] && echo "" || echo "-s$seed")
  for w in $ULD; do
    out=$W/xtok-kd-uld$w$sfx
    /usr/bin/time -f "  (%e s wall)" $K train-student --model "$S" --cache "$C" --output "$out" \
      --cross-tokenizer --uld-weight "$w" --loss fkl --alpha 0.5 --seed "$seed" "${train[@]}" 2>&1 \
      | grep -E "cross-tok|^trained|wall"
    models+=(--model "$out")
  done
  /usr/bin/time -f "  (%e s wall)" $K finetune --model "$S" --dataset kdpipe:arithmetic --split train \
    --output "$W/xtok-sft$sfx" --seed "$seed" "${train[@]}" 2>&1 | grep -E "^trained|wall"
  models+=(--model "$W/xtok-sft$sfx")
done
$K evaluate "${models[@]}" --dataset kdpipe:arithmetic --split test --task exact-match --cache "$H" \
  --output "$W/eval" --no-plot 2>&1 | grep -v -E "^Loading|Warning"
