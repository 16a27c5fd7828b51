#!/usr/bin/env bash
# Speed at the sizes people run (issue 27): random-weight models of real shapes (memlm/bench/sizes.py)
# written by llama.cpp's own quantizer, then memlm against llama.cpp on the same file and threads:
# prefill and decode after a PROMPT-token prompt, batch 1 and 8, peak RSS; merged into
# bench/results/sizes.json and sizes.png. Needs llama-cpp-python (see bench/llama_cpp.sh).
# The whole grid is hours on 2 cores; SHAPES / TYPES / PROMPTS / BATCHES / DTYPES pick a part of it.
set -euo pipefail
cd "$(dirname "$0")/.."
MEMLM=${MEMLM:-memlm}
PY=${PY:-python}
OUT=${OUT:-runs/sizes}
SHAPES=${SHAPES:-"llama-3.2-1b qwen2.5-1.5b smollm2-135m"}
TYPES=${TYPES:-Q4_K_M,Q4_0,Q8_0}
PROMPTS=${PROMPTS:-"512 2048"}
BATCHES=${BATCHES:-1,8}
DTYPES=${DTYPES:-auto:q8_0,auto}
THREADS=${THREADS:-2}
NEW=${NEW:-128}
REPEATS=${REPEATS:-2}
RESULT=${RESULT:-bench/results/sizes}  # .json and .png
mkdir -p "$OUT"
results=()
for shape in $SHAPES; do
  for file in $($PY -m memlm.bench.sizes make --shape "$shape" --types "$TYPES" --out "$OUT" --threads "$THREADS"); do
    for prompt in $PROMPTS; do
      json="$OUT/$(basename "$file" .gguf)-p$prompt.json"
      [ -f "$json" ] || $MEMLM bench decode --model "$file" --dtype "$DTYPES" --batch-sizes "$BATCHES" \
        --new-tokens "$NEW" --prompt-tokens "$prompt" --threads "$THREADS" --repeats "$REPEATS" \
        --against llama.cpp --no-quality --json "$json"
      results+=("$json")
    done
  done
done
$PY -m memlm.bench.sizes merge "${results[@]}" --json "$RESULT.json" --plot "$RESULT.png"
