#!/usr/bin/env bash
# MemGen's weaver trained on whole answers by GRPO (issue 31): the commands behind
# bench/results/memgen_grpo.json. Run from the repository root with memlm installed; each stage
# writes under runs/ (bench/results/ for what is reported) and can be run alone:
#   STAGES="grpo_from_sft grpo_from_scratch sft_same_steps sft_same_time bench caps" bench/memgen_grpo.sh
# (bench_from_sft: vanilla and the GRPO weaver from SFT alone, for when the other runs are not done)
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
STAGES=${STAGES:-grpo_from_sft grpo_from_scratch sft_same_steps sft_same_time bench caps}
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
    sft_same_time)  # LoRA-SFT given the GRPO run's wall-clock: its optimizer steps' seconds (screening
      # left out) over the seconds of one of sft_same_steps' steps, both read from metrics.jsonl
      steps=$(python - <<'PY'
import json
def seconds(path):  # per logged step: items / items_per_s
    rows = [json.loads(line) for line in open(path)]
    return [r["step"] for r in rows], [None if not r["items_per_s"] else 1 / r["items_per_s"] for r in rows]
g_steps, g_per_item = seconds("runs/weaver-grpo-sft/train/metrics.jsonl")
grpo = sum(32 * s for s in g_per_item if s)  # 4 problems x 8 answers per step
_, s_per_item = seconds("runs/sft-mixed-40/train/metrics.jsonl")
sft = 8 * sum(s for s in s_per_item if s) / len([s for s in s_per_item if s])  # one step of 8 examples
print(max(40, round(grpo / sft)))
PY
)
      echo "LoRA-SFT for the GRPO run's wall-clock: $steps steps"
      $MEMLM train sft --model $REASONER --task $TASK --steps "$steps" --n-eval 0 --save-every 50 --out runs/sft-mixed-wall
      ;;
    bench)  # vanilla, both LoRA-SFTs, the SFT weaver and both GRPO weavers; what each forgets; 128 test problems
      $MEMLM bench memgen --model $REASONER --task $TASK --n 128 \
        --lora-sft lora_sft_40=runs/sft-mixed-40/adapter --lora-sft lora_sft_wall=runs/sft-mixed-wall/adapter \
        --weaver weaver_sft=bench/models/chain-sum-mixed-memgen-kv \
        --weaver weaver_grpo_sft=runs/weaver-grpo-sft/memory --weaver weaver_grpo_scratch=runs/weaver-grpo-scratch/memory \
        $FORGET --speed-tokens 0 --json bench/results/memgen_grpo.json --plot bench/results/memgen_grpo.png
      ;;
    bench_from_sft)  # the first GRPO run alone beside the frozen reasoner, target task only (what
      # one session could run; the forgetting columns are the full bench stage's)
      $MEMLM bench memgen --model $REASONER --task $TASK --n 128 \
        --weaver weaver_grpo_sft=runs/weaver-grpo-sft/memory \
        --speed-tokens 0 --json bench/results/memgen_grpo_sft.json --plot bench/results/memgen_grpo_sft.png
      ;;
    caps)  # the seed's insertion cap (5 per answer) and a single insertion, on the SFT weaver (trained with 8)
      $MEMLM bench memgen --model $REASONER --task $TASK --n 128 --lora-sft lora_sft_40=runs/sft-mixed-40/adapter \
        --weaver weaver_sft=bench/models/chain-sum-mixed-memgen-kv --caps 1,5 \
        $FORGET --speed-tokens 0 --json bench/results/memgen_caps.json --plot bench/results/memgen_caps.png
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
