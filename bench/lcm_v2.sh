#!/usr/bin/env bash
# LCM v2 (issue 32): the decoder's view of the past is cut every W tokens, so what it knows of the
# text before its segment can only come through z -> grids -> z_q. The trainings behind
# bench/results/lcm_v2.json, in the order they ran (bench/README.md, "Codebook memory: v2").
# Equal budgets, fixed before any run: 400 optimizer steps x 4 windows x 1,024 tokens (1.64 M tokens,
# the v1 budget, in windows long enough to hold the 4W+ bucket), the same windows in the same order
# for a given seed, and (near) equal parameters:
#   LCM:                 stage 1 (bounded 4-layer decoder) 200 steps, stage 2 140, stage 3 60    4.3 M
#   continuous z:        the LCM with z passed unquantised (no grids), same stages              4.3 M
#   bounded decoder:     400 steps, 8 layers, the same cut                                      4.3 M
#   unbounded decoder:   400 steps, 8 layers, no cut                                           4.3 M
# Seeds 0 1 2 at W=64; two single-threaded pipelines share a 2-core machine:
#   SEEDS=0 OMP_NUM_THREADS=1 bench/lcm_v2.sh & SEEDS="1 2" OMP_NUM_THREADS=1 bench/lcm_v2.sh
# PARTS selects what runs ("base": the decoders and the LCM's stage 1; "memory": stages 2-3).
# EVAL=1 (alone, 2 threads) writes bench/results/lcm_v2.json and lcm_v2.png from the finished runs.
set -euo pipefail
MEMLM=${MEMLM:-.venv/bin/memlm}
DATA=runs/data4k
R=runs/lcm2
W=${W:-64}
mkdir -p $R/logs
if [ ! -f $DATA/train.json ]; then
  $MEMLM data tokenizer --vocab-size 4096 --out runs/tok4k
  $MEMLM data pack --tokenizer runs/tok4k --out $DATA
fi
COMMON="--data $DATA --seq-len 1024 --batch-size 4"
# A run with a report is done; one with a checkpoint is resumed (bit-for-bit, see memlm/train/loop.py).
run() {
  local name=$1; shift
  [ -f $R/$name/report.json ] && return
  mkdir $R/$name.lock 2>/dev/null || { echo "$name is running elsewhere" >&2; return 0; }
  trap "rmdir $R/$name.lock" RETURN
  local resume=(); [ -f $R/$name/train/checkpoint.pt ] && resume=(--resume)
  "$MEMLM" "$@" --out $R/$name "${resume[@]}" >> $R/logs/$name.log 2>&1
}
for seed in ${SEEDS:-0 1 2}; do
  S=s$seed-w$W
  if [[ " ${PARTS:-base memory} " == *" base "* ]]; then
    run $S-stage1 train lcm --stage 1 $COMMON --steps 200 --seed $seed --decoder-window $W
    run $S-decoder train lcm --stage 1 $COMMON --steps 400 --seed $seed --decoder-window $W --memory none --decoder-layers 8
    run s$seed-unbounded train lcm --stage 1 $COMMON --steps 400 --seed $seed --memory none --decoder-layers 8
  fi
  if [[ " ${PARTS:-base memory} " == *" memory "* ]]; then
    for kind in grids continuous; do
      P=$S; [ $kind = grids ] || P=$S-$kind
      run $P-stage2 train lcm --stage 2 $COMMON --steps 140 --seed $seed --init $R/$S-stage1/model --memory $kind
      run $P-stage3 train lcm --stage 3 $COMMON --steps 60 --seed $seed --init $R/$P-stage2/model
    done
  fi
done

# The other cuts, seed 0 only: W=32 SEEDS=0 bench/lcm_v2.sh, then EVAL=1 W=32 SEEDS=0 bench/lcm_v2.sh.
if [ "${EVAL:-0}" = 1 ]; then
  m() { for s in ${SEEDS:-0 1 2}; do printf -- "--$1 $R/s$s-$2/model "; done; }
  OUT=bench/results/lcm_v2; [ "$W" = 64 ] || OUT=bench/results/lcm_v2_w$W
  $MEMLM eval lcm-reach --data $DATA $(m lcm w$W-stage3) $(m continuous w$W-continuous-stage3) \
    $(m decoder w$W-decoder) $(m unbounded unbounded) --json $OUT.json --plot $OUT.png
  $MEMLM eval lcm-safety --model $R/s0-w$W-stage3/model --data $DATA --json $OUT-safety.json --plot $OUT-safety.png
fi
