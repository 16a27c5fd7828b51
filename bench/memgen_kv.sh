#!/usr/bin/env bash
# MemGen in its setting with a weaver that writes keys and values (bench/README.md, "A weaver that
# writes keys and values"). Run from the repository root with memlm installed; each stage writes
# under runs/ (bench/results/ for the reported ones) and can be run alone:
#   STAGES="sweep full trigger bench speed tokens trigger_lr1e2" bench/memgen_kv.sh   (and `sft`, not rerun here: see its stage)
# The budget and the rule were fixed before the runs: the sweep's 60 steps x 8 and its rule (the
# lowest held-out loss at step 60 wins); the full runs are 250 steps x 8 for both the weaver and
# LoRA-SFT, the same draws; the benchmark is 64 test problems, greedy, as in memgen_mixed_embeddings.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MEMLM=${MEMLM:-memlm}
STAGES=${STAGES:-sweep full trigger bench speed tokens}
REASONER=bench/models/chain-sum-lora  # the frozen reasoner: the committed chain-sum adapter, merged
TASK=chain_sum_mixed                  # 8-12 terms of one or two digits: it half-solves them
KV="--weaver-input states --weaver-output kv --init delimiter"
FORGET="--retain-task chain_sum --text gensim:enwiki --text-windows 16"

for stage in $STAGES; do
  case $stage in
    sweep)  # the sweep's protocol: 60 steps x 8, held-out loss on 32 validation problems (~15 min)
      $MEMLM train weaver --model $REASONER --task $TASK --steps 60 --n-eval 0 --save-every 20 --n-val-loss 32 \
        --out runs/sweep11/kv_delim $KV
      python -m memlm.bench.memgen_sweep
      ;;
    full)  # the weaver at the full budget, the same draws as memgen_mixed_embeddings.json's (~55 min, bf16)
      $MEMLM train weaver --model $REASONER --task $TASK --steps 250 --n-eval 0 --save-every 50 \
        --out runs/weaver-mixed-kv $KV
      ;;
    sft)  # LoRA-SFT of the reasoner itself on the same data and steps (~15 min, bf16). Not rerun on
          # 2026-12-05: its row is memgen_mixed_embeddings.json's (the same command, problems and dtype)
      $MEMLM train sft --model $REASONER --task $TASK --steps 250 --n-eval 0 --save-every 50 --out runs/sft-mixed
      ;;
    trigger)  # RL of the trigger on the trained weaver, problems screened for mixed groups (~15 min)
      $MEMLM train trigger --model $REASONER --memory runs/weaver-mixed-kv/memory --task $TASK \
        --out runs/trigger-mixed-kv --steps 10 --problems-per-step 4 --group-size 8 --temperature 0.7 \
        --screen 16 --n-eval 0
      mkdir -p bench/models/chain-sum-mixed-memgen-kv  # the committed memory: weaver + trigger (8 MB, bf16)
      cp runs/trigger-mixed-kv/memory/* bench/models/chain-sum-mixed-memgen-kv/
      ;;
    trigger_lr1e2)  # the same RL at the previous session's lr 1e-2 (run after the first had barely moved)
      $MEMLM train trigger --model $REASONER --memory runs/weaver-mixed-kv/memory --task $TASK \
        --out runs/trigger-mixed-kv-lr1e2 --steps 10 --problems-per-step 4 --group-size 8 --temperature 0.7 \
        --screen 16 --n-eval 0 --lr 1e-2
      $MEMLM bench memgen --model $REASONER --task $TASK --n 64 --weaver-trigger runs/trigger-mixed-kv-lr1e2/memory \
        $FORGET --speed-tokens 0 --json bench/results/memgen_trigger_lr1e2.json \
        --plot bench/results/memgen_trigger_lr1e2.png
      ;;
    bench)  # vanilla, the weaver (always), the learned trigger and never (one folder), what each forgets
      SFT=(); [ -d runs/sft-mixed/adapter ] && SFT=(--lora-sft runs/sft-mixed/adapter)
      $MEMLM bench memgen --model $REASONER --task $TASK --n 64 "${SFT[@]}" --weaver runs/weaver-mixed-kv/memory \
        --weaver-trigger runs/trigger-mixed-kv/memory $FORGET --speed-tokens 0 \
        --json bench/results/memgen.json --plot bench/results/memgen.png
      ;;
    speed)  # decode time with the memory against vanilla, batch 1 and 8, fp32 and q4_1 (~6 min)
      python -m memlm.bench.memgen_speed --model $REASONER --memory runs/weaver-mixed-kv/memory \
        --task $TASK --json bench/results/memgen_speed_kv.json
      ;;
    tokens)  # where the loss goes: result digits, copied digits, the rest (64 validation problems, ~3 min)
      python -m memlm.bench.memgen_tokens --model $REASONER --memory runs/weaver-mixed-kv/memory --task $TASK --n 64 \
        --json bench/results/memgen_tokens_kv.json
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
