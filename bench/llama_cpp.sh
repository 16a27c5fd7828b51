#!/usr/bin/env bash
# memlm against llama.cpp on the files people download (issue 26): tokenization, the quantizers on
# the same float32 weights, and decode / prefill / peak RSS on the real Gemma 3 file and on the
# embedded model in llama.cpp's own Q4_K_M. Run from the repository root with memlm installed and
# llama-cpp-python built (optional, never a CI dependency; ~25 min on 1 core):
#   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
#     -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
#     -DGGML_AMX_INT8=OFF -DLLAMA_CURL=OFF" pip install llama-cpp-python diskcache
# (AMX off: this machine's CPUs report AMX, but llama.cpp's AMX kernels crash in its sandbox, so
# llama.cpp runs its AVX-512 VNNI kernels, with its weight repacking, as it would without AMX.)
# On a CPU without AVX-512 (the *_avx2.json results; an AVX-512 build dies there), from the sdist:
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
#   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
#     -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DLLAMA_CURL=OFF" pip install /tmp/lcp/llama_cpp_python-0.3.36.tar.gz
# and the two decode lines below with --json $R/decode_{gemma3,q4km}_vs_llamacpp_avx2.json.
# One thread each, so the other core can stay busy; the decode rows run one after the other in
# fresh processes, llama.cpp's in a process that holds llama.cpp alone (its peak RSS is its own).
set -euo pipefail
cd "$(dirname "$0")/.."
MEMLM=${MEMLM:-memlm}
PY=${PY:-python}
R=${R:-bench/results}

$PY -m memlm.bench.tokenize_agreement --model gemma3-270m --json $R/tokenize_gemma3.json
$PY -m memlm.bench.tokenize_agreement --model smollm2-135m-instruct --json $R/tokenize_smollm2.json
# Both quantizers from the same float32 file (memlm quantize --type F32 of the embedded model).
$PY -m memlm.bench.quant_quality --against llama.cpp --threads 1 --json $R/quant_quality_vs_llamacpp.json
$MEMLM bench decode --model gemma3-270m --dtype auto,auto:q8_0 --batch-sizes 1,8 --new-tokens 32 \
  --threads 1 --against llama.cpp --json $R/decode_gemma3_vs_llamacpp.json
Q4KM=$($PY -c "from memlm.bench.quantized_files import llama_cpp_quantized_file as f; print(f('smollm2-135m-instruct', 'Q4_K_M'))")
$MEMLM bench decode --model "$Q4KM" --dtype auto,auto:q8_0 --batch-sizes 1,8 --new-tokens 64 \
  --threads 1 --against llama.cpp --json $R/decode_q4km_vs_llamacpp.json
