#!/usr/bin/env bash
# Prompt compression (issue 29): the commands behind bench/results/press.json and press.png.
# Run from the repository root with memlm installed. One run per length (each writes its JSON,
# and a .partial while it runs), then the merge. Budget fixed before the run: every press x ratio
# (0.25, 0.5, 0.75, 0.9 removed) x the five tasks, test seeds; 10 problems per task at 1000 and
# 2000 tokens, 6 at 4000 (a 4k problem costs ~2.5x a 2k one), one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
MEMLM=${MEMLM:-memlm}
LENGTHS=${LENGTHS:-"1000:10 2000:10 4000:6"}
PRESSES=random,streaming_llm,knorm,snapkv,snapkv_question,expected_attention,tova,observed_attention,pyramid:snapkv,learned
PREDICTOR=${PREDICTOR:-bench/models/press-smollm2-135m}
runs=()
for spec in $LENGTHS; do
  length=${spec%%:*} n=${spec##*:}
  OMP_NUM_THREADS=1 $MEMLM bench press --lengths "$length" --n "$n" --presses $PRESSES --predictor "$PREDICTOR" \
    --threads 1 --json "runs/press-$length.json"
  runs+=("runs/press-$length.json")
done
python -m memlm.bench.press bench/results/press.json bench/results/press.png "${runs[@]}"
