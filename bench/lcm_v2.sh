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
# PARTS selects what runs, in the script's order: stage1 decoder unbounded (or "base", all three)
# and grids continuous (or "memory": stages 2-3 of the LCM and of the unquantised z).
# EVAL=1 (alone, 2 threads) writes bench/results/lcm_v2.json and lcm_v2.png from the finished runs.
# RECALL=S trains every model on text a share S of which states made-up facts and restates them
# tens to hundreds of tokens later (`memlm data pack --recall-share`): something worth carrying
# past the cut. Its runs and results are apart (runs/lcm2-recall, bench/results/lcm_v2_recall*).
set -euo pipefail
MEMLM=${MEMLM:-.venv/bin/memlm}
DATA=runs/data4k
R=runs/lcm2
W=${W:-64}
if [ -n "${RECALL:-}" ]; then DATA=runs/data4k-recall$RECALL; R=runs/lcm2-recall$RECALL; fi
mkdir -p $R/logs
[ -f runs/tok4k/tokenizer.json ] || $MEMLM data tokenizer --vocab-size 4096 --out runs/tok4k
[ -f $DATA/train.json ] || $MEMLM data pack --tokenizer runs/tok4k --out $DATA --recall-share "${RECALL:-0}"
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
  wants() { [[ " ${PARTS:-base memory} " =~ " $1 " || " ${PARTS:-base memory} " =~ " $2 " ]]; }
  wants stage1 base && run $S-stage1 train lcm --stage 1 $COMMON --steps 200 --seed $seed --decoder-window $W
  wants decoder base && run $S-decoder train lcm --stage 1 $COMMON --steps 400 --seed $seed --decoder-window $W --memory none --decoder-layers 8
  wants unbounded base && run s$seed-unbounded train lcm --stage 1 $COMMON --steps 400 --seed $seed --memory none --decoder-layers 8
  for kind in grids continuous; do
    wants $kind memory || continue
    P=$S; [ $kind = grids ] || P=$S-$kind
    run $P-stage2 train lcm --stage 2 $COMMON --steps 140 --seed $seed --init $R/$S-stage1/model --memory $kind
    run $P-stage3 train lcm --stage 3 $COMMON --steps 60 --seed $seed --init $R/$P-stage2/model
  done
done

# The other cuts, seed 0 only: W=32 SEEDS=0 bench/lcm_v2.sh, then EVAL=1 W=32 SEEDS=0 bench/lcm_v2.sh.
if [ "${EVAL:-0}" = 1 ]; then
  m() { for s in ${SEEDS:-0 1 2}; do printf -- "--$1 $R/s$s-$2/model "; done; }
  OUT=bench/results/lcm_v2${RECALL:+_recall$RECALL}; [ "$W" = 64 ] || OUT=${OUT}_w$W
  $MEMLM eval lcm-reach --data $DATA $(m lcm w$W-stage3) $(m continuous w$W-continuous-stage3) \
    $(m decoder w$W-decoder) $(m unbounded unbounded) --json $OUT.json --plot $OUT.png
  $MEMLM eval lcm-safety --model $R/s0-w$W-stage3/model --data $DATA --json $OUT-safety.json --plot $OUT-safety.png
fi
