#!/usr/bin/env bash
# DynTS on long reasoning traces: the commands behind bench/results/kv.json (bench/README.md,
# "Working memory under a KV budget"). Run from the repository root with memlm installed; each
# stage writes under runs/ (or bench/results/ for the reported ones) and can be run alone:
#   STAGES="sft predictors sweep choose labels transfer rescore rescore_test prompt evict bench" bench/kv_long_mult.sh
# The stages in the order they were run: `labels` is the first test run (the labels side by side,
# bench/results/kv_long_mult_labels.json); `prompt` and `evict` train the predictor on prompt
# tokens too and choose the policy that may evict them; `bench` is the current kv.json.
# Budgets and the learned policy's settings were fixed before the test runs: the budgets are 25%,
# 40% and 60% of the mean full trace of the worked solutions (403 tokens on the test problems).
# Window and ratio were to be chosen on validation problems (the sweep stage), but every setting
# scored 0 there, at 25% and at 40%; window 16 and ratio 0.9 keep the most of each row. The label
# and whole-number spans were chosen on validation problems too (the choose stage): future_far,
# without spans, for the learned policy; tova gains from spans, so it gets a +spans row.
set -euo pipefail
cd "$(dirname "$0")/.."
MEMLM=${MEMLM:-memlm}
STAGES=${STAGES:-sft predictors sweep choose labels transfer rescore rescore_test prompt evict bench}
MODEL=bench/models/long-mult-lora  # the SFT adapter, committed (bf16, 7.8 MB)
LABELS="answer future_decay future_far"
CANDIDATES=runs/predictor-long-mult-answer,runs/predictor-long-mult-future_decay,runs/predictor-long-mult-future_far
PREDICTORS=runs/predictor-long-mult-answer,runs/predictor-long-mult-future_far  # the published label and the chosen one
PROMPT_PREDICTOR=runs/predictor-long-mult-future_far-prompt  # future_far on prompt tokens too (committed: bench/models)
WINDOW=${WINDOW:-16}
RATIO=${RATIO:-0.9}
DTYPE=q4_1  # the embedded GGUF's own blocks with fp32 activations: exact, ~7x faster than float32 here

for stage in $STAGES; do
  case $stage in
    sft)  # LoRA rank 16 on every linear, 600 steps x 8, one chain sum in five examples (~70 min, bf16)
      $MEMLM train sft --task long_mult:4,chain_sum:1 --out runs/sft-long-mult --steps 600 --save-every 50 \
        --n-eval 0
      mkdir -p $MODEL && cp runs/sft-long-mult/adapter/* $MODEL/
      for task in long_mult chain_sum; do  # eval.json in $MODEL gathers these two
        $MEMLM eval --model $MODEL --task $task --n 64 --dtype $DTYPE --json runs/eval-long-mult-lora-$task.json
      done
      ;;
    predictors)  # one per label, on the SFT model's own traces (256 training, 64 validation problems)
      for label in $LABELS; do  # future_far counts reads beyond the policy's window (--horizon 16 = WINDOW)
        $MEMLM train predictor --model $MODEL --task long_mult --label $label --horizon "$WINDOW" --dtype $DTYPE \
          --n-train 256 --n-val 64 --batch-size 32 --out runs/predictor-long-mult-$label
      done
      cp runs/predictor-long-mult-future_far/{predictor.*,metrics.json} bench/models/long-mult-predictor/
      ;;
    sweep)  # the learned policy's window and ratio on 16 validation problems at 40% (at 25% every setting scored 0)
      for window in 8 16; do
        for ratio in 0.5 0.9; do
          $MEMLM bench kv --model $MODEL --task long_mult --split val --n 16 --probe-n 0 --budgets 160 \
            --policies learned --predictor runs/predictor-long-mult-answer,runs/predictor-long-mult-future_decay \
            --window $window --ratio $ratio --dtype $DTYPE \
            --max-new-tokens 448 --json runs/kv-sweep/w$window-r$ratio.json
        done
      done
      ;;
    choose)  # every label, with and without whole-number spans (and tova both ways), 16 validation problems
      $MEMLM bench kv --model $MODEL --task long_mult --split val --n 16 --probe-n 0 --budgets 160,240 \
        --batch-size 16 --policies tova,learned --predictor $CANDIDATES --window "$WINDOW" --ratio "$RATIO" \
        --spans both --dtype $DTYPE --max-new-tokens 448 --json runs/kv-choose.json
      ;;
    rescore)  # the learned policy re-scoring a share of its slots by the newest query's attention:
      # share x ratio x spans on 16 validation problems at 40% and 60% (rule fixed before: the best
      # mean of the two budgets goes to the test stage)
      for rescore in 0.25 0.5 0.75; do
        for ratio in 0.9 1.0; do
          $MEMLM bench kv --model $MODEL --task long_mult --split val --n 16 --probe-n 0 --budgets 160,240 \
            --batch-size 16 --policies learned --predictor runs/predictor-long-mult-future_far --window "$WINDOW" \
            --ratio $ratio --rescore $rescore --spans both --dtype $DTYPE --max-new-tokens 448 \
            --json runs/kv-rescore/s$rescore-r$ratio.json
        done
      done
      ;;
    rescore_test)  # the chosen re-scoring setting on the 64 test problems of the bench stage (same
      # problems, batches and dtype, so its rows sit beside bench/results/kv_long_mult_labels.json's)
      $MEMLM bench kv --model $MODEL --task long_mult --n 64 --budgets 100,160,240 --batch-size 32 \
        --max-new-tokens 448 --probe-n 0 --policies learned --spans "${RESCORE_SPANS:-off}" \
        --predictor bench/models/long-mult-predictor --window "$WINDOW" --ratio "${RESCORE_RATIO:-0.9}" \
        --rescore "${RESCORE:-0.5}" --dtype $DTYPE --json bench/results/kv_rescore.json
      ;;
    labels)  # every policy at 25%, 40% and 60% of the mean full trace, 64 test problems 32 at a
      # time (the native step's rows), answers cut at 448 tokens (worked solutions end by 425), no
      # retrieval probe: what fitted one session's CPU time (~35 min)
      $MEMLM bench kv --model $MODEL --task long_mult --n 64 --budgets 100,160,240 --batch-size 32 \
        --max-new-tokens 448 --probe-n 0 --spans tova \
        --predictor $PREDICTORS --window "$WINDOW" --ratio "$RATIO" --dtype $DTYPE \
        --json bench/results/kv_long_mult_labels.json --plot bench/results/kv_long_mult_labels.png
      ;;
    prompt)  # future_far on the prompt's tokens too (~23 min, mostly generating traces): a
      # predictor that says so in its config, so the learned policy may evict prompt tokens
      $MEMLM train predictor --model $MODEL --task long_mult --label future_far --horizon "$WINDOW" --dtype $DTYPE \
        --n-train 256 --n-val 64 --batch-size 32 --prompt --out $PROMPT_PREDICTOR
      mkdir -p bench/models/long-mult-predictor-prompt  # committed beside the earlier one (3.9 MB)
      cp $PROMPT_PREDICTOR/{predictor.*,metrics.json} bench/models/long-mult-predictor-prompt/
      ;;
    evict)  # the evicting policy's ratio x rescore on the 16 validation problems at 40% and 60%
      # (rule fixed before: the best mean of the two budgets; a tie goes to the smaller rescore)
      mkdir -p runs/kv-evict
      for setting in "0.9 0" "0.9 0.25" "1.0 0" "1.0 0.25" "1.0 0.5" "1.0 0.75"; do
        set -- $setting
        $MEMLM bench kv --model $MODEL --task long_mult --split val --n 16 --probe-n 0 --budgets 160,240 \
          --batch-size 16 --policies learned --predictor $PROMPT_PREDICTOR --window "$WINDOW" --evict-prompt \
          --ratio "$1" --rescore "$2" --dtype $DTYPE --max-new-tokens 448 --json runs/kv-evict/r$1-s$2.json
      done
      ;;
    bench)  # every policy at 25%, 40% and 60%, 64 test problems; two learned rows at the chosen
      # setting (ratio 1, rescore 0.5): the earlier future_far predictor keeping the prompt, and the
      # one trained on prompt tokens evicting them (~30 min). When kv.json was made, a predictor
      # trained with --prompt evicted prompt tokens by default; since issue 30 only the caller
      # opts in, here with the folder's :evict-prompt suffix (the same rows as then)
      $MEMLM bench kv --model $MODEL --task long_mult --n 64 --budgets 100,160,240 --batch-size 32 \
        --max-new-tokens 448 --probe-n 0 --spans tova \
        --predictor runs/predictor-long-mult-future_far,$PROMPT_PREDICTOR:evict-prompt --window "$WINDOW" --ratio 1.0 \
        --rescore 0.5 --dtype $DTYPE --json bench/results/kv.json --plot bench/results/kv.png
      ;;
    transfer)  # the same model and predictors on chain sums, a task the predictors never saw (the
      # prompt is ~75 tokens, so the learned policy's prompt + window needs a budget above 96)
      $MEMLM bench kv --model $MODEL --task chain_sum --n 64 --budgets 112,128 --batch-size 32 --probe-n 0 \
        --policies full,sinks,h2o,tova,learned --spans tova \
        --predictor $PREDICTORS --window "$WINDOW" --ratio "$RATIO" --dtype $DTYPE \
        --json bench/results/kv_transfer_chain_sum.json --plot bench/results/kv_transfer_chain_sum.png
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
