#!/usr/bin/env bash
# Prompt compression (issue 29): the commands behind bench/results/press.json and press.png.
# Run from the repository root with memlm installed. One run per length (each writes its JSON,
# and a .partial while it runs), then the merge. Every press x ratio (0.25, 0.5, 0.75, 0.9 removed)
# x the five tasks, test seeds, one thread; problems per task: 10 at 1000 tokens, 8 at 2000, 4 at
# 4000 (a 4k problem costs ~2.5x a 2k one, a 2k ~2.5x a 1k; what one session's machine time held).
set -euo pipefail
cd "$(dirname "$0")/.."
MEMLM=${MEMLM:-memlm}
LENGTHS=${LENGTHS:-"1000:10 2000:8 4000:4"}
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
