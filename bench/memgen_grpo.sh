#!/usr/bin/env bash
# MemGen's weaver trained on whole answers by GRPO (issue 31): the commands behind
# bench/results/memgen_grpo.json. Run from the repository root with memlm installed; each stage
# writes under runs/ (bench/results/ for what is reported) and can be run alone:
#   STAGES="grpo_from_sft grpo_from_scratch sft_same_steps bench" bench/memgen_grpo.sh
#
# The setting is memgen_kv.sh's: the frozen reasoner is the committed chain-sum adapter, the task
# chain_sum_mixed (8-12 terms of one or two digits: it half-solves them), the weaver reads the
# reasoner's states and writes keys and values, starting from the delimiter's.
# Budget, fixed before any run: 40 GRPO steps x 4 problems x 8 sampled answers (1,280 answers),
# temperature 0.7, lr 1e-4, KL weight 0.04 to the starting weaver, clip 0.2, problems screened
# (64 training problems, RL draws from those whose group was mixed). Two starts: the committed SFT
# weaver (bench/models/chain-sum-mixed-memgen-kv, trigger forced to `always`) and a fresh one.
# LoRA-SFT gets the same 40 task-reward-free steps (x 8 examples), and, separately, the GRPO run's
# wall-clock (its steps set from train/metrics.jsonl's timing: see the stage). The evaluation is
# 128 test problems (seed 98765; one point ~ one problem in 128), greedy.
set -euo pipefail
cd "$(dirname "$0")/.."
MEMLM=${MEMLM:-memlm}
STAGES=${STAGES:-grpo_from_sft grpo_from_scratch sft_same_steps bench}
REASONER=bench/models/chain-sum-lora
TASK=chain_sum_mixed
KV="--weaver-input states --weaver-output kv --init delimiter"
GRPO="--objective grpo --steps 40 --problems-per-step 4 --group-size 8 --temperature 0.7 --lr 1e-4 --beta 0.04 --clip 0.2 --screen 64 --n-eval 0"
FORGET="--retain-task chain_sum --text gensim:enwiki --text-windows 16"
RESUME=${RESUME:+--resume}  # RESUME=1 continues a stopped run from its checkpoint (and its saved screening)

for stage in $STAGES; do
  case $stage in
    grpo_from_sft)  # start from the SFT weaver (its learned trigger set aside: always on)
      $MEMLM train weaver --model $REASONER --task $TASK --out runs/weaver-grpo-sft $GRPO \
        --start-from bench/models/chain-sum-mixed-memgen-kv --start-trigger always $RESUME
      ;;
    grpo_from_scratch)  # a fresh weaver of the same shape; its KL reference is that fresh start
      $MEMLM train weaver --model $REASONER --task $TASK --out runs/weaver-grpo-scratch $GRPO $KV $RESUME
      ;;
    sft_same_steps)  # LoRA-SFT of the reasoner with the same number of steps, no task reward
      $MEMLM train sft --model $REASONER --task $TASK --steps 40 --n-eval 0 --save-every 20 --out runs/sft-mixed-40
      ;;
    bench)  # vanilla, LoRA-SFT, each weaver; what each forgets; 128 test problems
      for run in weaver-grpo-sft weaver-grpo-scratch; do
        $MEMLM bench memgen --model $REASONER --task $TASK --n 128 --lora-sft runs/sft-mixed-40/adapter \
          --weaver runs/$run/memory $FORGET --speed-tokens 0 \
          --json bench/results/memgen_grpo_${run#weaver-grpo-}.json --plot bench/results/memgen_grpo_${run#weaver-grpo-}.png
      done
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
