#!/usr/bin/env bash
# The LCM experiment's trainings, in the order they ran (bench/README.md, "Codebook memory").
# Equal budgets: every model sees the same 400 steps x 16 windows x 256 tokens (1.64 M tokens,
# about 2 epochs of the training split), drawn in the same order for a given seed.
#   LCM:            stage 1 (decoder) 200 steps, stage 2 (encoder + grids) 140, stage 3 (joint) 60
#   decoder alone:  400 steps of stage 1 (memory none)
#   transformer:    400 steps, 8 Llama blocks at width 192 (4.33 M parameters; the LCM has 4.34 M)
# Seeds 0, 1, 2 for these three; the retrained variants (continuous z, one codebook) seed 0 only.
# Two single-threaded pipelines can share a 2-core machine without oversubscribing it (then EVAL=1
# bench/lcm_train.sh, alone, writes bench/results/lcm.json and lcm.png from the finished runs):
#   SEEDS=0 OMP_NUM_THREADS=1 bench/lcm_train.sh & SEEDS="1 2" OMP_NUM_THREADS=1 bench/lcm_train.sh
set -euo pipefail
MEMLM=${MEMLM:-.venv/bin/memlm}
DATA=runs/data4k
R=runs/lcm
mkdir -p $R/logs
if [ ! -f $DATA/train.json ]; then
  $MEMLM data tokenizer --vocab-size 4096 --out runs/tok4k
  $MEMLM data pack --tokenizer runs/tok4k --out $DATA
fi
# A run with a report is done; one with a checkpoint is resumed (bit-for-bit, see memlm/train/loop.py).
run() {
  local name=$1; shift
  [ -f $R/$name/report.json ] && return
  mkdir $R/$name.lock 2>/dev/null || { echo "$name is running elsewhere" >&2; return 1; }
  trap "rmdir $R/$name.lock" RETURN
  local resume=(); [ -f $R/$name/train/checkpoint.pt ] && resume=(--resume)
  "$MEMLM" "$@" --out $R/$name "${resume[@]}" >> $R/logs/$name.log 2>&1
}
for seed in ${SEEDS:-0 1 2}; do
  run s$seed-stage1 train lcm --stage 1 --data $DATA --steps 200 --seed $seed
  run s$seed-stage2 train lcm --stage 2 --data $DATA --steps 140 --seed $seed --init $R/s$seed-stage1/model
  run s$seed-stage3 train lcm --stage 3 --data $DATA --steps 60 --seed $seed --init $R/s$seed-stage2/model
  run s$seed-decoder train lcm --stage 1 --data $DATA --steps 400 --seed $seed --memory none
  run s$seed-transformer train lm --data $DATA --steps 400 --seed $seed --layers 8
  if [ "$seed" = 0 ]; then
    for kind in continuous single; do
      run s0-$kind-stage2 train lcm --stage 2 --data $DATA --steps 140 --seed 0 --init $R/s0-stage1/model --memory $kind
      run s0-$kind-stage3 train lcm --stage 3 --data $DATA --steps 60 --seed 0 --init $R/s0-$kind-stage2/model
    done
  fi
done

# The evaluation (run alone, 2 threads: it times decoding). Every held-out window of the val split.
if [ "${EVAL:-0}" = 1 ]; then
  m() { for s in 0 1 2; do printf -- "--$1 $R/s$s-$2/model "; done; }
  $MEMLM eval lcm --data $DATA --windows 252 $(m model stage3) $(m decoder decoder) $(m transformer transformer) \
    --variant continuous=$R/s0-continuous-stage3/model --variant single=$R/s0-single-stage3/model \
    --json bench/results/lcm.json --plot bench/results/lcm.png
fi
