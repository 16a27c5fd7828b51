#!/usr/bin/env bash
# DynTS on long reasoning traces: the commands behind bench/results/kv.json (bench/README.md,
# "Working memory under a KV budget"). Run from the repository root with memlm installed; each
# stage writes under runs/ (or bench/results/ for the reported ones) and can be run alone:
#   STAGES="sft predictors sweep bench transfer" bench/kv_long_mult.sh
# Budgets and the learned policy's settings were fixed before the test runs: the budgets are 25%,
# 40% and 60% of the mean full trace of the worked solutions (403 tokens on the test problems),
# window and ratio are chosen on validation problems (the sweep stage).
set -euo pipefail
cd "$(dirname "$0")/.."
MEMLM=${MEMLM:-memlm}
STAGES=${STAGES:-sft predictors sweep bench transfer}
MODEL=runs/sft-long-mult/adapter
PREDICTORS=runs/predictor-long-mult-answer,runs/predictor-long-mult-future_decay
WINDOW=${WINDOW:-8}
RATIO=${RATIO:-0.5}
DTYPE=q4_1  # the embedded GGUF's own blocks with fp32 activations: exact, ~7x faster than float32 here

for stage in $STAGES; do
  case $stage in
    sft)  # LoRA rank 16 on every linear, 600 steps x 8, one chain sum in five examples (~70 min, bf16)
      $MEMLM train sft --task long_mult:4,chain_sum:1 --out runs/sft-long-mult --steps 600 --save-every 50
      ;;
    predictors)  # one per label, on the SFT model's own traces (256 training, 64 validation problems)
      for label in answer future_decay; do
        $MEMLM train predictor --model $MODEL --task long_mult --label $label --dtype $DTYPE \
          --n-train 256 --n-val 64 --out runs/predictor-long-mult-$label
      done
      ;;
    sweep)  # the learned policy's window and ratio on 32 validation problems at the smallest budget
      for window in 8 16; do
        for ratio in 0.5 0.9; do
          $MEMLM bench kv --model $MODEL --task long_mult --split val --n 32 --probe-n 0 --budgets 100 \
            --policies learned --predictor $PREDICTORS --window $window --ratio $ratio --dtype $DTYPE \
            --json runs/kv-sweep/w$window-r$ratio.json
        done
      done
      ;;
    bench)  # every policy at 25%, 40% and 60% of the mean full trace, 64 test problems
      $MEMLM bench kv --model $MODEL --task long_mult --n 64 --budgets 100,160,240 \
        --predictor $PREDICTORS --window "$WINDOW" --ratio "$RATIO" --dtype $DTYPE \
        --json bench/results/kv.json --plot bench/results/kv.png
      ;;
    transfer)  # the same model and predictors on chain sums, a task the predictors never saw
      $MEMLM bench kv --model $MODEL --task chain_sum --n 64 --budgets 96,112,128,160 \
        --predictor $PREDICTORS --window "$WINDOW" --ratio "$RATIO" --dtype $DTYPE \
        --json bench/results/kv_transfer_chain_sum.json --plot bench/results/kv_transfer_chain_sum.png
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
