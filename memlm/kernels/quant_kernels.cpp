// memlm's native CPU kernels: GGUF-quantized (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q2_K..Q6_K) matrix
// products with fp32 activations, and a whole decode step of a Llama-family model in one call.
//
// Plain C++17 with AVX2/FMA/F16C intrinsics and a C ABI (loaded with ctypes): no torch headers,
// so it compiles in about a second and does not depend on torch's ABI.
//
// Weights are stored structure-of-arrays, bit for bit the GGUF block contents split in columns:
//   qs  [out, in/2] (4-bit; byte j of a 32-value block holds value j in its low nibble and value
//       j+16 in its high nibble) or [out, in] int8 (Q8_0)
//   d   [out, in/32] float16 block scales, m [out, in/32] float16 block minimums (Q4_1 only)
// Dequantized values are computed exactly as the gguf package's reference does (a multiply, then
// an add for Q4_1; this file is compiled with -ffp-contract=off so nothing fuses them): a kernel
// multiplies the reference fp32 weights, only its summation order differs from a fp32 matmul.
//
// The other formats ("raw": Q5_0, Q5_1 and the K-quants) are read as the file's block bytes, and
// every one of them decodes, per block, into int8 codes c and per-16-value float32 scales S and
// offsets O with value = S * c + O (see memlm/quant/blocks.py, the torch reference of the same
// decoding). One templated kernel per activation type then serves them all.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

constexpr int QK = 32;  // values per quantization block
enum Format : int32_t { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2, Q5_0 = 3, Q5_1 = 4, Q2_K = 5, Q3_K = 6, Q4_K = 7, Q5_K = 8, Q6_K = 9 };

// ---- threads -----------------------------------------------------------------------------------
// OpenMP, from the same runtime torch uses: the extension links libgomp.so.1, and the dynamic
// loader hands it the copy torch already loaded. One thread team serves torch's ops and these
// kernels, sized by torch.set_num_threads; a second pool of spinning threads would fight torch's
// for the two cores between every kernel call and every torch op (measured: 2x slower steps).

inline int threads() { return omp_get_max_threads(); }

// fn(task) for task in [0, tasks), spread over the team; returns when all are done.
template <class Fn>
void parallel(int tasks, const Fn& fn) {
  if (tasks <= 1 || threads() == 1) {
    for (int t = 0; t < tasks; ++t) fn(t);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::min(tasks, threads()))
  for (int t = 0; t < tasks; ++t) fn(t);
}

// ---- small vector helpers --------------------------------------------------------------------

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// exp(x) for 8 lanes, Cephes-style: 2^n * p(r) with a degree-6 polynomial; about 1 ulp, and
// exactly 0 below the float range (softmax of -inf scores must give 0).
inline __m256 exp_ps(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(n));
  return _mm256_andnot_ps(underflow, y);
}

// ---- quantized matrices ----------------------------------------------------------------------

}  // namespace

extern "C" {

struct QMat {
  int32_t format;
  int32_t out, in;
  const uint8_t* qs;
  const uint16_t* d;
  const uint16_t* m;  // Q4_1 only
  const float* bias;  // optional, [out]
  // An optional LoRA adapter beside the weights: y += scaling * (x A^T) B^T, with A [rank, in] and
  // B^T [rank, out] (fp32, B transposed so the update streams along output rows), applied when the
  // caller asks for it (the latent weaver's pass).
  const float* lora_a;
  const float* lora_bt;
  int32_t rank;
  float scaling;
  // A matrix whose row groups are stored in different formats (a Q4_K_M file's Q4_K q and k beside
  // its Q6_K v, fused): `nparts` descriptors, in row order, each with its own format, out rows and
  // bias; qs/d/m of this descriptor are unused then.
  const QMat* parts;
  int32_t nparts;
  // Several adapters stacked along the rank (memlm.adapters.bank): the adapter each rank column
  // belongs to, [rank]; a token then uses only its own adapter's columns (DecodeArgs.adapter).
  // nullptr: one adapter, every column for every token.
  const int32_t* lora_owner;
};

}  // extern "C"

namespace {

// One block (32 values) of output row `row`, block `b`, dequantized into four vectors of 8: the
// reference values, for `dequantize` and the embedding lookup.
template <int F>
inline void dequant_block(const QMat& w, int64_t row, int64_t b, __m256 v[4]);

// The block's integer codes as floats (Q4: 0..15, Q8_0: -128..127), before scale and offset.
// Each group of 8 bytes is loaded and widened to int32 lanes in one instruction (vpmovzxbd /
// vpmovsxbd with a memory operand); a 4-bit byte then gives its low nibble by a mask and its high
// nibble by a shift, with no byte shuffles.
template <int F>
inline void block_codes(const QMat& w, int64_t row, int64_t b, __m256 f[4]) {
  if constexpr (F == Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.qs) + row * w.in + b * QK;
    for (int i = 0; i < 4; ++i)
      f[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i))));
  } else {
    const uint8_t* q = w.qs + row * (w.in / 2) + b * (QK / 2);
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
    const __m256i mask = _mm256_set1_epi32(0x0F);
    f[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, mask));  // values 0..7
    f[1] = _mm256_cvtepi32_ps(_mm256_and_si256(c, mask));  // values 8..15
    f[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));    // values 16..23
    f[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4));    // values 24..31
  }
}

template <int F>
inline void dequant_block(const QMat& w, int64_t row, int64_t b, __m256 v[4]) {
  const int64_t blocks = w.in / QK;
  const __m256 d = _mm256_set1_ps(half_to_float(w.d[row * blocks + b]));
  __m256 f[4];
  block_codes<F>(w, row, b, f);
  if constexpr (F == Q4_0) {
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int i = 0; i < 4; ++i) v[i] = _mm256_mul_ps(d, _mm256_sub_ps(f[i], eight));
  } else if constexpr (F == Q4_1) {
    const __m256 m = _mm256_set1_ps(half_to_float(w.m[row * blocks + b]));
    for (int i = 0; i < 4; ++i) v[i] = _mm256_add_ps(_mm256_mul_ps(d, f[i]), m);
  } else {
    for (int i = 0; i < 4; ++i) v[i] = _mm256_mul_ps(d, f[i]);
  }
}

// sum_b s[b] * sx[b] with s float16 (per-block scales or minimums of one row).
inline float dot_half(const uint16_t* s, const float* sx, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= n; b += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + b))),
                          _mm256_loadu_ps(sx + b), acc);
  float total = hsum(acc);
  for (; b < n; ++b) total += half_to_float(s[b]) * sx[b];
  return total;
}

// y[r, o] = sum_k x[r, k] * W[o, k] for NB activation rows and output rows [o0, o1).
//
// Factored per block: sum_i (d q_i + m) x_i = d * sum_i q_i x_i + m * sum_i x_i, and for Q4_0
// d (q_i - 8) gives d * sum_i q_i x_i - 8 d * sum_i x_i. The inner loop only converts codes and
// multiplies; the offset terms are one short dot product per row over the blocks, with the block
// sums of x (`sx`, computed once per matmul). Each block's codes serve all NB rows. ACC block
// accumulators per row and OR output rows at a time keep independent FMA chains in flight.
template <int F, int NB, int ACC, int OR>
void matmul_rows(const QMat& w, const float* x, int64_t ldx, const float* sx, float* y, int64_t ldy, int o0, int o1) {
  const int64_t blocks = w.in / QK;
  int o = o0;
  for (; o + OR <= o1; o += OR) {
    __m256 acc[OR][NB][ACC];
#pragma GCC unroll 16
    for (int j = 0; j < OR; ++j)
#pragma GCC unroll 16
      for (int r = 0; r < NB; ++r)
#pragma GCC unroll 4
        for (int a = 0; a < ACC; ++a) acc[j][r][a] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
#pragma GCC unroll 4
      for (int j = 0; j < OR; ++j) {
        __m256 f[4];
        block_codes<F>(w, o + j, b, f);
        const __m256 d = _mm256_set1_ps(half_to_float(w.d[(o + j) * blocks + b]));
#pragma GCC unroll 16
        for (int r = 0; r < NB; ++r) {
          const float* xr = x + r * ldx + b * QK;
          __m256 t = _mm256_mul_ps(f[0], _mm256_loadu_ps(xr));
          t = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xr + 8), t);
          t = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xr + 16), t);
          t = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xr + 24), t);
          acc[j][r][b % ACC] = _mm256_fmadd_ps(d, t, acc[j][r][b % ACC]);
        }
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < OR; ++j) {
      const int64_t row = o + j;
#pragma GCC unroll 16
      for (int r = 0; r < NB; ++r) {
        __m256 s = acc[j][r][0];
#pragma GCC unroll 4
        for (int a = 1; a < ACC; ++a) s = _mm256_add_ps(s, acc[j][r][a]);
        float total = hsum(s);
        if constexpr (F == Q4_1) total += dot_half(w.m + row * blocks, sx + r * blocks, blocks);
        if constexpr (F == Q4_0) total -= 8.0f * dot_half(w.d + row * blocks, sx + r * blocks, blocks);
        y[r * ldy + row] = total + (w.bias ? w.bias[row] : 0.0f);
      }
    }
  }
  if (o < o1) matmul_rows<F, NB, ACC, 1>(w, x, ldx, sx, y, ldy, o, o1);
}

template <int F>
void matmul_group(const QMat& w, const float* x, int64_t ldx, const float* sx, float* y, int64_t ldy, int nb, int o0,
                  int o1) {
  switch (nb) {
    case 1: return matmul_rows<F, 1, 2, 4>(w, x, ldx, sx, y, ldy, o0, o1);
    case 2: return matmul_rows<F, 2, 2, 1>(w, x, ldx, sx, y, ldy, o0, o1);
    case 3: return matmul_rows<F, 3, 1, 1>(w, x, ldx, sx, y, ldy, o0, o1);
    case 4: return matmul_rows<F, 4, 1, 1>(w, x, ldx, sx, y, ldy, o0, o1);
    case 5: return matmul_rows<F, 5, 1, 1>(w, x, ldx, sx, y, ldy, o0, o1);
    case 6: return matmul_rows<F, 6, 1, 1>(w, x, ldx, sx, y, ldy, o0, o1);
    case 7: return matmul_rows<F, 7, 1, 1>(w, x, ldx, sx, y, ldy, o0, o1);
    default: return matmul_rows<F, 8, 1, 1>(w, x, ldx, sx, y, ldy, o0, o1);
  }
}

// The block sums of x for the fp32-activation kernel: sx[r * blocks + b] = sum of x[r, 32b .. 32b+31].
void block_sums(const float* x, int64_t n, int64_t ldx, int64_t in, std::vector<float>& sx) {
  const int64_t blocks = in / QK;
  sx.resize(static_cast<size_t>(n * blocks));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + r * ldx + b * QK;
      __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                               _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
      sx[r * blocks + b] = hsum(s);
    }
}

// Output rows [o0, o1) of y = x W^T for all n activation rows, 8 at a time per pass over the weights.
void rows_fp32(const QMat& w, const float* x, int64_t n, int64_t ldx, const float* sx, float* y, int64_t ldy, int o0,
               int o1) {
  const int64_t blocks = w.in / QK;
  for (int64_t r = 0; r < n; r += 8) {
    const int nb = static_cast<int>(std::min<int64_t>(8, n - r));
    const float* xr = x + r * ldx;
    const float* sxr = sx + r * blocks;
    float* yr = y + r * ldy;
    switch (w.format) {
      case Q4_0: matmul_group<Q4_0>(w, xr, ldx, sxr, yr, ldy, nb, o0, o1); break;
      case Q4_1: matmul_group<Q4_1>(w, xr, ldx, sxr, yr, ldy, nb, o0, o1); break;
      default: matmul_group<Q8_0>(w, xr, ldx, sxr, yr, ldy, nb, o0, o1); break;
    }
  }
}

// Thread t's share of `out` output rows among `parts`: one contiguous range each, starting at a
// multiple of 4 (the batch-1 kernel's output rows per pass). A shared task counter would cost a
// cache-line transfer per grab, which small matrices feel.
inline void share(int out, int t, int parts, int& o0, int& o1) {
  o0 = static_cast<int>(int64_t(out) * t / parts) & ~3;
  o1 = t + 1 == parts ? out : static_cast<int>(int64_t(out) * (t + 1) / parts) & ~3;
}

// How many threads a matrix is worth: a slice under 16 rows costs more to hand out than to compute.
inline int parts_for(int out, int team) { return std::max(1, std::min(team, out / 16)); }

// ---- the quantized-activation path (llama.cpp's on AVX2) --------------------------------------
// Activations are quantized once per matmul to int8 per 32-value block (scale amax/127, round to
// nearest), and each block's dot product runs on integers: _mm256_maddubs_epi16 multiplies the
// unsigned 4-bit codes (or |q| for Q8_0, with the sign moved onto x) by the int8 activations and
// adds pairs, _mm256_madd_epi16 widens to int32. Per block and row the float work is one convert
// and one FMA, so batches cost far fewer FP operations than the fp32-activation kernel; the price
// is the activations' rounding (perplexity within a fraction of a percent, see bench/README.md).

struct QuantizedActivations {
  std::vector<int8_t> q;      // [n, in]
  std::vector<float> scale;   // [n, blocks]
  std::vector<float> sum;     // [n, blocks]: scale * sum of the block's codes (for offsets)
  std::vector<float> sum16;   // [n, in/16]: the same per half block (offsets of the raw formats)
  // The same per group of 8 rows, rows innermost ([groups, blocks, 8], zeros past n): the
  // batched kernel scales 8 rows' block dot products with one vector multiply.
  std::vector<float> scale8, sum8;
  // Batch 1 over rows whose block count is not a multiple of 8 (matmul_flat_q8): the row's codes,
  // scales and sums repeated `flat_rows` times, so that eight consecutive weight blocks, wherever
  // rows end among them, find their activation blocks at the same offsets. 0: not built.
  int flat_rows = 0;
  std::vector<int8_t> flat_q;
  std::vector<float> flat_scale, flat_sum;
  // q and flat_q with each pair of blocks (A, B) laid out as the 4-bit formats' bytes unpack:
  // A[0:16] B[0:16] A[16:32] B[16:32] (see q4_pair). Built where a Q4_0 / Q4_1 matrix reads these
  // activations, for rows of an even block count; empty otherwise.
  std::vector<int8_t> pairs, flat_pairs;
};

// The paired layout of `count` pairs of 32-value blocks.
void pair_blocks(const int8_t* src, int8_t* dst, int64_t count) {
  for (int64_t j = 0; j < count; ++j, src += 2 * QK, dst += 2 * QK) {
    std::memcpy(dst, src, 16);
    std::memcpy(dst + 16, src + 32, 16);
    std::memcpy(dst + 32, src + 16, 16);
    std::memcpy(dst + 48, src + 48, 16);
  }
}

// `paired`: a 4-bit matrix reads these activations (build their paired layout).
void quantize_activations(const float* x, int64_t n, int64_t ldx, int64_t in, bool paired,
                          QuantizedActivations& out) {
  const int64_t blocks = in / QK;
  out.q.resize(static_cast<size_t>(n * in));
  out.scale.resize(static_cast<size_t>(n * blocks));
  out.sum.resize(static_cast<size_t>(n * blocks));
  out.sum16.resize(static_cast<size_t>(n * blocks * 2));
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + r * ldx + b * QK;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float d = _mm_cvtss_f32(m4) / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
      // Round to nearest (even), as the default rounding mode does, then pack 32 int32 to int8.
      __m256i q[4];
      for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
      const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // undo lane interleave
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + r * in + b * QK), packed);
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      out.scale[r * blocks + b] = d;
      out.sum[r * blocks + b] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
      for (int h = 0; h < 2; ++h) {  // values 16h .. 16h+15
        const __m256i s16 = _mm256_add_epi32(q[2 * h], q[2 * h + 1]);
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        out.sum16[(r * blocks + b) * 2 + h] = d * static_cast<float>(_mm_cvtsi128_si32(t));
      }
    }
  const int64_t groups = (n + 7) / 8;
  out.scale8.assign(static_cast<size_t>(groups * blocks * 8), 0.0f);
  out.sum8.assign(static_cast<size_t>(groups * blocks * 8), 0.0f);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t at = ((r / 8) * blocks + b) * 8 + r % 8;
      out.scale8[at] = out.scale[r * blocks + b];
      out.sum8[at] = out.sum[r * blocks + b];
    }
  out.flat_rows = n == 1 && blocks % 8 != 0 ? 8 / std::gcd(static_cast<int>(blocks % 8), 8) : 0;
  out.flat_q.resize(static_cast<size_t>(out.flat_rows * in));
  out.flat_scale.resize(static_cast<size_t>(out.flat_rows * blocks));
  out.flat_sum.resize(static_cast<size_t>(out.flat_rows * blocks));
  for (int i = 0; i < out.flat_rows; ++i) {
    std::copy_n(out.q.data(), in, out.flat_q.data() + i * in);
    std::copy_n(out.scale.data(), blocks, out.flat_scale.data() + i * blocks);
    std::copy_n(out.sum.data(), blocks, out.flat_sum.data() + i * blocks);
  }
  // A row of an odd block count has no whole pairs; a flat span (whole eights of blocks) always does.
  out.pairs.resize(paired && blocks % 2 == 0 ? static_cast<size_t>(n * in) : 0);
  out.flat_pairs.resize(paired ? out.flat_q.size() : 0);
  pair_blocks(out.q.data(), out.pairs.data(), static_cast<int64_t>(out.pairs.size()) / (2 * QK));
  pair_blocks(out.flat_q.data(), out.flat_pairs.data(), static_cast<int64_t>(out.flat_pairs.size()) / (2 * QK));
}

template <int F>
inline __m256i block_bytes(const QMat& w, int64_t row, int64_t b);

// Sums of 4 adjacent products of unsigned by signed bytes, as 8 int32. With AVX512-VNNI (and VL)
// it is one instruction; on AVX2, maddubs (pairs into int16) then madd (pairs into int32). The
// codes here never saturate int16 (at most 2 * 128 * 127), so both give identical results.
inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

extern "C" int32_t mk_variant() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return 1;
#else
  return 0;
#endif
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// For 8 vectors: lane i of `low` = the sum of v[i]'s lanes 0-3, of `high` = of its lanes 4-7 (a
// transpose-and-add tree that stops before adding the halves).
inline void half_sums(const __m256i v[8], __m256i& low, __m256i& high) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  low = _mm256_permute2x128_si256(a, b, 0x20);
  high = _mm256_permute2x128_si256(a, b, 0x31);
}

// Lane i = the sum of the 8 int32 lanes of v[i], for 8 vectors.
inline __m256i row_sums(const __m256i v[8]) {
  __m256i low, high;
  half_sums(v, low, high);
  return _mm256_add_epi32(low, high);
}

// The 4-bit formats, two blocks at a time. A block's 16 bytes hold value j in the low nibble of
// byte j and value j+16 in the high one, so 32 bytes of two blocks A, B unpack, with no lane
// crossing, into lo = A[0:16] B[0:16] and hi = A[16:32] B[16:32]; the activations' paired layout
// (pair_blocks) matches. One pair then costs a load, a shift and two masks (a block alone: a
// 16-byte load, a shift, two masks and a lane insert), and its two products add in int16 (at
// most 2 * 2 * 15 * 127) before one widening.
inline void q4_pair(const uint8_t* qs, __m256i& lo, __m256i& hi) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  lo = _mm256_and_si256(raw, mask);
  hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
}

// Lanes 0-3: block A's dot product in four parts, lanes 4-7: block B's.
inline __m256i dot_pair(__m256i lo, __m256i hi, const int8_t* x) {
  const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xlo), hi, xhi);
#else
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

// Lane i = block i's total, from dot_pair of the pairs (0, 1), (2, 3), (4, 5), (6, 7).
inline __m256i pair_sums(const __m256i v[4]) {
  // three horizontal adds leave blocks 0 2 4 6 | 1 3 5 7
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  return _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 5 to 8 activation rows at once: each row's block dot product stays an int32 vector until a
// transpose-and-add tree puts the 8 rows' totals in the lanes of one vector, which is scaled,
// offset and accumulated with a handful of vector operations for all rows together.
template <int F, int NB>
void matmul_rows_q8_batch(const QMat& w, const QuantizedActivations& xa, int64_t r0, float* y, int64_t ldy, int o0,
                          int o1) {
  const int64_t blocks = w.in / QK;
  const float* scale8 = xa.scale8.data() + (r0 / 8) * blocks * 8;
  const float* sum8 = xa.sum8.data() + (r0 / 8) * blocks * 8;
  // One block's contribution to the 8 rows' sums, from their dot products (lane r: row r's).
  const auto add_block = [&](int o, int64_t b, __m256i dots, __m256& acc, __m256& offset) {
    const __m256 d = _mm256_set1_ps(half_to_float(w.d[o * blocks + b]));
    acc = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_loadu_ps(scale8 + b * 8)), _mm256_cvtepi32_ps(dots), acc);
    if constexpr (F == Q4_0)
      offset = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(-8.0f)), _mm256_loadu_ps(sum8 + b * 8), offset);
    if constexpr (F == Q4_1)
      offset = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(w.m[o * blocks + b])), _mm256_loadu_ps(sum8 + b * 8), offset);
  };
  for (int o = o0; o < o1; ++o) {
    __m256 acc = _mm256_setzero_ps(), offset = _mm256_setzero_ps();
    int64_t b = 0;
    if constexpr (F != Q8_0) {
      // Two 4-bit blocks per load against the paired activations (q4_pair), where rows hold pairs:
      // each row's dot_pair has the first block in lanes 0-3, the second in 4-7.
      if (!xa.pairs.empty())
        for (; b < blocks; b += 2) {
          __m256i lo, hi, v[8], first, second;
          q4_pair(w.qs + o * (w.in / 2) + b * (QK / 2), lo, hi);
#pragma GCC unroll 8
          for (int r = 0; r < 8; ++r)
            v[r] = r < NB ? dot_pair(lo, hi, xa.pairs.data() + (r0 + r) * w.in + b * QK) : _mm256_setzero_si256();
          half_sums(v, first, second);
          add_block(o, b, first, acc, offset);
          add_block(o, b + 1, second, acc, offset);
        }
    }
    for (; b < blocks; ++b) {
      const __m256i q = block_bytes<F>(w, o, b);
      __m256i magnitude = q;
      if constexpr (F == Q8_0) magnitude = _mm256_sign_epi8(q, q);
      __m256i dots[8];
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        if (r >= NB) {
          dots[r] = _mm256_setzero_si256();
          continue;
        }
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa.q.data() + (r0 + r) * w.in + b * QK));
        if constexpr (F == Q8_0) xv = _mm256_sign_epi8(xv, q);
        dots[r] = dot_u8_s8(magnitude, xv);
      }
      add_block(o, b, row_sums(dots), acc, offset);
    }
    alignas(32) float out[8];
    _mm256_store_ps(out, _mm256_add_ps(acc, offset));
    const float bias = w.bias ? w.bias[o] : 0.0f;
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) y[r * ldy + o] = out[r] + bias;
  }
}

template <int F>
inline __m256i block_bytes(const QMat& w, int64_t row, int64_t b) {
  if constexpr (F == Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const int8_t*>(w.qs) + row * w.in + b * QK));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs + row * (w.in / 2) + b * (QK / 2)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
  }
}

// R output rows at a time: each row's sums keep their order (results do not depend on R), and
// R independent chains of multiply-adds hide each other's latency, which bounds a lone row at
// batch 1 (one fma chain and one scalar offset chain per block).
template <int F, int NB, int R = 1>
void matmul_rows_q8(const QMat& w, const QuantizedActivations& xa, int64_t r0, float* y, int64_t ldy, int o0, int o1) {
  const int64_t blocks = w.in / QK;
  int o = o0;
  for (; o + R <= o1; o += R) {
    __m256 acc[R][NB];
    float offset[R][NB];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) acc[i][r] = _mm256_setzero_ps(), offset[i][r] = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) {
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const __m256i q = block_bytes<F>(w, o + i, b);
        const float d = half_to_float(w.d[(o + i) * blocks + b]);
        __m256i magnitude = q;
        if constexpr (F == Q8_0) magnitude = _mm256_sign_epi8(q, q);
        float m = 0.0f;
        if constexpr (F == Q4_1) m = half_to_float(w.m[(o + i) * blocks + b]);
#pragma GCC unroll 8
        for (int r = 0; r < NB; ++r) {
          const int64_t row = r0 + r;
          __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa.q.data() + row * w.in + b * QK));
          if constexpr (F == Q8_0) xv = _mm256_sign_epi8(xv, q);
          const __m256i dot = dot_u8_s8(magnitude, xv);
          const float scale = xa.scale[row * blocks + b];
          acc[i][r] = _mm256_fmadd_ps(_mm256_set1_ps(d * scale), _mm256_cvtepi32_ps(dot), acc[i][r]);
          if constexpr (F == Q4_0) offset[i][r] -= 8.0f * d * xa.sum[row * blocks + b];
          if constexpr (F == Q4_1) offset[i][r] += m * xa.sum[row * blocks + b];
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r)
        y[r * ldy + o + i] = hsum(acc[i][r]) + offset[i][r] + (w.bias ? w.bias[o + i] : 0.0f);
  }
  if constexpr (R > 1) {
    if (o < o1) matmul_rows_q8<F, NB, 1>(w, xa, r0, y, ldy, o, o1);
  }
}

// Eight blocks at a time: their integer dot products stay int32 until one transpose-and-add puts
// them in the lanes of a vector, scaled by the eight blocks' d (one f16 conversion) times the
// activations' eight scales; the offsets of Q4_0 (-8 d) and Q4_1 (m) likewise take one
// multiply-add per eight blocks against the activation sums. For rows of 8k blocks (every
// matrix of a 1B-class model); SmolLM2's 576 values (18 blocks) take the kernels above, which
// measured faster there than eight-block groups with a one-at-a-time tail.
template <int F, int NB>
void matmul_rows_q8_by8(const QMat& w, const QuantizedActivations& xa, int64_t r0, float* y, int64_t ldy, int o0,
                        int o1) {
  const int64_t blocks = w.in / QK;
  for (int o = o0; o < o1; ++o) {
    __m256 acc[NB], offset[NB];
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) acc[r] = offset[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b += 8) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.d + o * blocks + b)));
      __m256 m = _mm256_setzero_ps();
      if constexpr (F == Q4_1) m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.m + o * blocks + b)));
      __m256i q[8], magnitude[8], lo[4], hi[4];
      if constexpr (F == Q8_0) {
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          q[k] = block_bytes<F>(w, o, b + k);
          magnitude[k] = _mm256_sign_epi8(q[k], q[k]);
        }
      } else {
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) q4_pair(w.qs + o * (w.in / 2) + (b + 2 * j) * (QK / 2), lo[j], hi[j]);
      }
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) {
        __m256i totals;
        if constexpr (F == Q8_0) {
          const int8_t* xq = xa.q.data() + (r0 + r) * w.in + b * QK;
          __m256i dots[8];
#pragma GCC unroll 8
          for (int k = 0; k < 8; ++k) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + QK * k));
            dots[k] = dot_u8_s8(magnitude[k], _mm256_sign_epi8(xv, q[k]));
          }
          totals = row_sums(dots);
        } else {
          const int8_t* xp = xa.pairs.data() + (r0 + r) * w.in + b * QK;
          __m256i dots[4];
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) dots[j] = dot_pair(lo[j], hi[j], xp + 2 * QK * j);
          totals = pair_sums(dots);
        }
        const int64_t at = (r0 + r) * blocks + b;
        const __m256 scale = _mm256_mul_ps(d, _mm256_loadu_ps(xa.scale.data() + at));
        acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(totals), acc[r]);
        if constexpr (F == Q4_0) offset[r] = _mm256_fmadd_ps(d, _mm256_loadu_ps(xa.sum.data() + at), offset[r]);
        if constexpr (F == Q4_1) offset[r] = _mm256_fmadd_ps(m, _mm256_loadu_ps(xa.sum.data() + at), offset[r]);
      }
    }
    const float bias = w.bias ? w.bias[o] : 0.0f;
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) {
      float total = hsum(acc[r]);
      if constexpr (F == Q4_0) total -= 8.0f * hsum(offset[r]);
      if constexpr (F == Q4_1) total += hsum(offset[r]);
      y[r * ldy + o] = total + bias;
    }
  }
}

template <int F>
void matmul_group_q8(const QMat& w, const QuantizedActivations& xa, int64_t r0, float* y, int64_t ldy, int nb, int o0,
                     int o1) {
  if ((w.in / QK) % 8 == 0) {
    switch (nb) {
      case 1: return matmul_rows_q8_by8<F, 1>(w, xa, r0, y, ldy, o0, o1);
      case 2: return matmul_rows_q8_by8<F, 2>(w, xa, r0, y, ldy, o0, o1);
      case 3: return matmul_rows_q8_by8<F, 3>(w, xa, r0, y, ldy, o0, o1);
      case 4: return matmul_rows_q8_by8<F, 4>(w, xa, r0, y, ldy, o0, o1);
      case 5: return matmul_rows_q8_by8<F, 5>(w, xa, r0, y, ldy, o0, o1);
      case 6: return matmul_rows_q8_by8<F, 6>(w, xa, r0, y, ldy, o0, o1);
      case 7: return matmul_rows_q8_by8<F, 7>(w, xa, r0, y, ldy, o0, o1);
      default: return matmul_rows_q8_by8<F, 8>(w, xa, r0, y, ldy, o0, o1);
    }
  }
  switch (nb) {
    case 1: return matmul_rows_q8<F, 1, 4>(w, xa, r0, y, ldy, o0, o1);
    case 2: return matmul_rows_q8<F, 2, 2>(w, xa, r0, y, ldy, o0, o1);
    case 3: return matmul_rows_q8<F, 3>(w, xa, r0, y, ldy, o0, o1);
    case 4: return matmul_rows_q8<F, 4>(w, xa, r0, y, ldy, o0, o1);
    case 5: return matmul_rows_q8_batch<F, 5>(w, xa, r0, y, ldy, o0, o1);
    case 6: return matmul_rows_q8_batch<F, 6>(w, xa, r0, y, ldy, o0, o1);
    case 7: return matmul_rows_q8_batch<F, 7>(w, xa, r0, y, ldy, o0, o1);
    default: return matmul_rows_q8_batch<F, 8>(w, xa, r0, y, ldy, o0, o1);
  }
}

void rows_q8(const QMat& w, const QuantizedActivations& xa, int64_t n, float* y, int64_t ldy, int o0, int o1) {
  for (int64_t r = 0; r < n; r += 8) {
    const int nb = static_cast<int>(std::min<int64_t>(8, n - r));
    float* yr = y + r * ldy;
    switch (w.format) {
      case Q4_0: matmul_group_q8<Q4_0>(w, xa, r, yr, ldy, nb, o0, o1); break;
      case Q4_1: matmul_group_q8<Q4_1>(w, xa, r, yr, ldy, nb, o0, o1); break;
      default: matmul_group_q8<Q8_0>(w, xa, r, yr, ldy, nb, o0, o1); break;
    }
  }
}

// ---- the raw formats: Q5_0, Q5_1 and the K-quants, read as the file's blocks ------------------
// decode_block<F> turns one block into int8 codes (SIMD), and scales S and offsets O per group of
// 16 values (scalar: a few per 256 values), computed as the gguf package computes them; formats
// without an offset set O = -0.0, the identity of addition, so S * c + O is bit-identical to it.

template <int F>
struct Raw;  // block size (values), block bytes, whether O is ever nonzero
template <> struct Raw<Q5_0> { static constexpr int size = 32, bytes = 22; static constexpr bool offset = false; };
template <> struct Raw<Q5_1> { static constexpr int size = 32, bytes = 24; static constexpr bool offset = true; };
template <> struct Raw<Q2_K> { static constexpr int size = 256, bytes = 84; static constexpr bool offset = true; };
template <> struct Raw<Q3_K> { static constexpr int size = 256, bytes = 110; static constexpr bool offset = false; };
template <> struct Raw<Q4_K> { static constexpr int size = 256, bytes = 144; static constexpr bool offset = true; };
template <> struct Raw<Q5_K> { static constexpr int size = 256, bytes = 176; static constexpr bool offset = true; };
template <> struct Raw<Q6_K> { static constexpr int size = 256, bytes = 210; static constexpr bool offset = false; };

// Q5_x, Q4_K and Q5_K have one scale per 32 values (S repeats over both of its groups of 16);
// Q2_K, Q3_K and Q6_K one per 16.
template <int F>
constexpr bool per32() { return F == Q5_0 || F == Q5_1 || F == Q4_K || F == Q5_K; }

struct Decoded {
  alignas(32) int8_t q[256];
  alignas(32) float s[16];
  alignas(32) float o[16];
};

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// (v >> shift) & mask on every byte (a 16-bit shift, then the mask drops the neighbour's bits).
inline __m256i bits(__m256i v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(static_cast<char>(mask)));
}

// Byte i = 0x10 where bit i of the 32-bit word h is set (the fifth bit of Q5_0/Q5_1 codes).
inline __m256i fifth_bits(uint32_t h) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(h)),
      _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// Q4_K / Q5_K: the j-th 6-bit scale and minimum of the 12 packed bytes.
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// For the panels: kScales = false decodes the codes alone (they compute the K-quants' scales as
// vectors); kLifted keeps the codes as stored, before the format's zero point (16 for Q5_0, 4
// for Q3_K, 32 for Q6_K) is subtracted, i.e. u = c + z >= 0; `codes` (32-byte aligned) receives
// them in place of out.q.
template <int F, bool kScales = true, bool kLifted = false>
inline void decode_block(const uint8_t* b, Decoded& out, int8_t* codes = nullptr) {
  __m256i* q = reinterpret_cast<__m256i*>(codes ? codes : out.q);
  if constexpr (F == Q5_0 || F == Q5_1) {
    const int start = F == Q5_1 ? 4 : 2;
    uint32_t h;
    std::memcpy(&h, b + start, 4);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + start + 4));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m256i c = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
    c = _mm256_or_si256(c, fifth_bits(h));
    if constexpr (F == Q5_0 && !kLifted) c = _mm256_sub_epi8(c, _mm256_set1_epi8(16));
    _mm256_store_si256(q, c);
    const float d = half_to_float(load_u16(b));
    const float m = F == Q5_1 ? half_to_float(load_u16(b + 2)) : -0.0f;
    out.s[0] = out.s[1] = d;
    out.o[0] = out.o[1] = m;
  } else if constexpr (F == Q2_K) {
    const uint8_t* sc = b;
    for (int h = 0; h < 2; ++h) {
      const __m256i v = load32(b + 16 + 32 * h);
      for (int k = 0; k < 4; ++k) _mm256_store_si256(q + 4 * h + k, bits(v, 2 * k, 3));
    }
    const float d = half_to_float(load_u16(b + 80)), dmin = half_to_float(load_u16(b + 82));
    for (int g = 0; g < 16; ++g) {
      out.s[g] = d * static_cast<float>(sc[g] & 0x0F);
      out.o[g] = -(dmin * static_cast<float>(sc[g] >> 4));
    }
  } else if constexpr (F == Q3_K) {
    const __m256i hmask = load32(b);
    for (int h = 0; h < 2; ++h) {
      const __m256i v = load32(b + 32 + 32 * h);
      for (int k = 0; k < 4; ++k) {
        const __m256i high = bits(hmask, 4 * h + k, 1);  // 1: no offset, 0: minus 4
        __m256i code = bits(v, 2 * k, 3);
        if constexpr (!kLifted) code = _mm256_sub_epi8(code, _mm256_set1_epi8(4));
        _mm256_store_si256(q + 4 * h + k, _mm256_add_epi8(code, _mm256_slli_epi16(high, 2)));
      }
    }
    const uint8_t* p = b + 96;
    const float d = half_to_float(load_u16(b + 108));
    for (int g = 0; g < 16; ++g) {
      const int low = g < 8 ? (p[g] & 0x0F) : (p[g - 8] >> 4);
      const int high = (p[8 + g % 4] >> (2 * (g / 4))) & 3;
      out.s[g] = d * static_cast<float>((low | (high << 4)) - 32);
      out.o[g] = -0.0f;
    }
  } else if constexpr (F == Q4_K || F == Q5_K) {
    const uint8_t* nib = b + (F == Q4_K ? 16 : 48);
    const __m256i qh = F == Q5_K ? load32(b + 16) : _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256i v = load32(nib + 32 * j);
      __m256i lo = bits(v, 0, 0x0F), hi = bits(v, 4, 0x0F);
      if constexpr (F == Q5_K) {
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(bits(qh, 2 * j, 1), 4));
        hi = _mm256_or_si256(hi, _mm256_slli_epi16(bits(qh, 2 * j + 1, 1), 4));
      }
      _mm256_store_si256(q + 2 * j, lo);
      _mm256_store_si256(q + 2 * j + 1, hi);
    }
    if constexpr (!kScales) return;
    const float d = half_to_float(load_u16(b)), dmin = half_to_float(load_u16(b + 2));
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      scale_min_k4(j, b + 4, sc, m);
      out.s[2 * j] = out.s[2 * j + 1] = d * static_cast<float>(sc);
      out.o[2 * j] = out.o[2 * j + 1] = -(dmin * static_cast<float>(m));
    }
  } else {  // Q6_K
    for (int h = 0; h < 2; ++h) {
      const __m256i qh = load32(b + 128 + 32 * h);
      for (int k = 0; k < 4; ++k) {
        const __m256i v = load32(b + 64 * h + 32 * (k & 1));
        const __m256i low = bits(v, k < 2 ? 0 : 4, 0x0F);
        const __m256i code = _mm256_or_si256(low, _mm256_slli_epi16(bits(qh, 2 * k, 3), 4));
        _mm256_store_si256(q + 4 * h + k, kLifted ? code : _mm256_sub_epi8(code, _mm256_set1_epi8(32)));
      }
    }
    if constexpr (!kScales) return;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half_to_float(load_u16(b + 208));
    for (int g = 0; g < 16; ++g) {
      out.s[g] = d * static_cast<float>(sc[g]);
      out.o[g] = -0.0f;
    }
  }
}

// sum_g o[g] * s[g] over G groups (G = 2 or 16).
template <int G>
inline float dot_groups(const float* o, const float* s) {
  if constexpr (G == 16) {
    const __m256 a = _mm256_mul_ps(_mm256_load_ps(o), _mm256_loadu_ps(s));
    return hsum(_mm256_fmadd_ps(_mm256_load_ps(o + 8), _mm256_loadu_ps(s + 8), a));
  } else {
    float t = 0.0f;
    for (int g = 0; g < G; ++g) t += o[g] * s[g];
    return t;
  }
}

inline __m256 codes8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

// The fp32-activation kernel's float vectors: 16 lanes on the AVX-512 build, 8 on AVX2 (where the
// kernel's operations, and so its results, are those it always had).
#if defined(__AVX512F__)
using VecF = __m512;
constexpr int kLanes = 16;
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vset1(float v) { return _mm512_set1_ps(v); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VecF vmul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF vfmadd(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline VecF vcodes(const int8_t* q) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}
inline float vsum(VecF v) {
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), high));
}
#else
using VecF = __m256;
constexpr int kLanes = 8;
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vset1(float v) { return _mm256_set1_ps(v); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VecF vmul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF vfmadd(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline VecF vcodes(const int8_t* q) { return codes8(q); }
inline float vsum(VecF v) { return hsum(v); }
#endif

// fp32 activations: y[r, o] = sum_g S_g * sum_i c_i x_i + sum_g O_g * (sum of x over group g),
// the second term from the per-16 sums of x (`sx16`, computed once per matmul).
template <int F, int NB>
void raw_rows_fp32(const QMat& w, const float* x, int64_t ldx, const float* sx16, float* y, int64_t ldy, int o0,
                   int o1) {
  constexpr int BS = Raw<F>::size, G = BS / 16, ACC = NB <= 2 ? 2 : 1;
  const int64_t blocks = w.in / BS, row_bytes = blocks * Raw<F>::bytes, groups = w.in / 16;
  Decoded dec;
  for (int o = o0; o < o1; ++o) {
    const uint8_t* row = w.qs + o * row_bytes;
    VecF acc[NB][ACC];
    float offset[NB];
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) {
      offset[r] = 0.0f;
      for (int a = 0; a < ACC; ++a) acc[r][a] = vzero();
    }
    // Per group of one scale (32 values, or 16), the codes times x in K vectors, then times S.
    const auto group = [&]<int K>(int64_t b, const int8_t* q, float scale, int at, int slot) {
      VecF c[K];
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) c[k] = vcodes(q + kLanes * k);
      const VecF s = vset1(scale);
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) {
        const float* xr = x + r * ldx + b * BS + at;
        VecF t = vmul(c[0], vload(xr));
#pragma GCC unroll 4
        for (int k = 1; k < K; ++k) t = vfmadd(c[k], vload(xr + kLanes * k), t);
        acc[r][slot] = vfmadd(s, t, acc[r][slot]);
      }
    };
    for (int64_t b = 0; b < blocks; ++b) {
      decode_block<F>(row + b * Raw<F>::bytes, dec);
      if constexpr (per32<F>()) {  // one scale per 32 values: one multiply by it per 32
#pragma GCC unroll 8
        for (int c = 0; c < BS / 32; ++c) group.template operator()<32 / kLanes>(b, dec.q + 32 * c, dec.s[2 * c], 32 * c, c % ACC);
      } else {
#pragma GCC unroll 16
        for (int g = 0; g < G; ++g) group.template operator()<16 / kLanes>(b, dec.q + 16 * g, dec.s[g], 16 * g, g % ACC);
      }
      if constexpr (Raw<F>::offset) {
#pragma GCC unroll 8
        for (int r = 0; r < NB; ++r) offset[r] += dot_groups<G>(dec.o, sx16 + r * groups + b * G);
      }
    }
    const float bias = w.bias ? w.bias[o] : 0.0f;
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) {
      VecF s = acc[r][0];
      if constexpr (ACC == 2) s = vadd(s, acc[r][1]);
      y[r * ldy + o] = vsum(s) + offset[r] + bias;
    }
  }
}

// int8 activations (32-value blocks): per 32 codes, |c| times x with c's sign, in integers; the
// two 16-value groups' sums land in lanes 0-3 and 4-7, scaled by their S in one vector multiply.
template <int F, int NB, int R = 1>
void raw_rows_q8(const QMat& w, const QuantizedActivations& xa, int64_t r0, float* y, int64_t ldy, int o0, int o1) {
  constexpr int BS = Raw<F>::size, G = BS / 16, C = BS / 32;
  const int64_t blocks = w.in / BS, row_bytes = blocks * Raw<F>::bytes, groups = w.in / 16, xblocks = w.in / QK;
  Decoded dec[R];
  int o = o0;
  for (; o + R <= o1; o += R) {  // R rows at a time, as matmul_rows_q8 (each row's sums in order)
    __m256 acc[R][NB];
    float offset[R][NB];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) acc[i][r] = _mm256_setzero_ps(), offset[i][r] = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) {
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) decode_block<F>(w.qs + (o + i) * row_bytes + b * Raw<F>::bytes, dec[i]);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
          const __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i*>(dec[i].q + 32 * c));
          const __m256i magnitude = _mm256_sign_epi8(q, q);
          const __m256 s = per32<F>() ? _mm256_set1_ps(dec[i].s[2 * c])
                                 : _mm256_set_m128(_mm_set1_ps(dec[i].s[2 * c + 1]), _mm_set1_ps(dec[i].s[2 * c]));
          const int64_t xb = b * C + c;
#pragma GCC unroll 8
          for (int r = 0; r < NB; ++r) {
            const int64_t row_x = r0 + r;
            const __m256i xv =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa.q.data() + row_x * w.in + xb * QK));
            const __m256i dot = dot_u8_s8(magnitude, _mm256_sign_epi8(xv, q));
            const __m256 scale = _mm256_mul_ps(s, _mm256_set1_ps(xa.scale[row_x * xblocks + xb]));
            acc[i][r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc[i][r]);
          }
        }
        if constexpr (Raw<F>::offset) {
#pragma GCC unroll 8
          for (int r = 0; r < NB; ++r)
            offset[i][r] += dot_groups<G>(dec[i].o, xa.sum16.data() + (r0 + r) * groups + b * G);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const float bias = w.bias ? w.bias[o + i] : 0.0f;
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) y[r * ldy + o + i] = hsum(acc[i][r]) + offset[i][r] + bias;
    }
  }
  if constexpr (R > 1) {
    if (o < o1) raw_rows_q8<F, NB, 1>(w, xa, r0, y, ldy, o, o1);
  }
}

// ---- Q4_K and Q5_K with int8 activations, straight from the block bytes ------------------------
// A Q4_K sub-block is 32 values with one 6-bit scale and minimum, exactly one activation block,
// so value = d*sc_j * c - dmin*m_j with unsigned codes c in 0..15 (Q5_K: 0..31, a fifth bit from
// its qh bytes; the same scales) and
//   y = sum_j (d sc_j) (x scale_j) (sum_i c_i x_i) - sum_j (dmin m_j) (x scale_j sum_i x_i).
// The eight integer dot products of a super-block stay int32 until one transpose-and-add puts
// them in the lanes of a vector, scaled by eight scale products at once: no codes written to
// memory and read back, no sign tricks (the codes are unsigned), a handful of float operations
// per 256 values instead of per 32.

// The super-block's eight scales (times d) and minimums (times dmin) as float vectors. The 12
// packed bytes as three words w0 w1 w2 (byte j of a word is sub-block j's or j+4's):
//   scale j < 4: low 6 bits of w0's byte j       minimum j < 4: low 6 bits of w1's byte j
//   scale j+4:   w2's low nibble, w0's top 2 bits   minimum j+4: w2's high nibble, w1's top 2 bits
inline void q4k_scales(const uint8_t* block, __m256& scale, __m256& minimum) {
  uint32_t w[3];
  std::memcpy(w, block + 4, 12);
  const uint32_t low6 = 0x3F3F3F3F, nibble = 0x0F0F0F0F, top2 = 0x03030303;
  const uint32_t sc_lo = w[0] & low6, m_lo = w[1] & low6;
  const uint32_t sc_hi = (w[2] & nibble) | (((w[0] >> 6) & top2) << 4);
  const uint32_t m_hi = ((w[2] >> 4) & nibble) | (((w[1] >> 6) & top2) << 4);
  const __m128i packed = _mm_setr_epi32(static_cast<int>(sc_lo), static_cast<int>(sc_hi), static_cast<int>(m_lo),
                                        static_cast<int>(m_hi));
  const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(packed));
  const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(packed, 8)));
  scale = _mm256_mul_ps(_mm256_set1_ps(half_to_float(load_u16(block))), sc);
  minimum = _mm256_mul_ps(_mm256_set1_ps(half_to_float(load_u16(block + 2))), m);
}

template <int F, int NB>
void q4k_rows_q8(const QMat& w, const QuantizedActivations& xa, int64_t r0, float* y, int64_t ldy, int o0, int o1) {
  const int64_t blocks = w.in / 256, row_bytes = blocks * Raw<F>::bytes, xblocks = w.in / QK;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int o = o0; o < o1; ++o) {
    const uint8_t* row = w.qs + o * row_bytes;
    __m256 acc[NB], offset[NB];
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) acc[r] = offset[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = row + b * Raw<F>::bytes;
      __m256 scale, minimum;
      q4k_scales(block, scale, minimum);
      __m256i codes[8];  // sub-block 2k: the low nibbles of 32 bytes, 2k+1: their high nibbles
      const __m256i qh = F == Q5_K ? load32(block + 16) : _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const __m256i v = load32(block + (F == Q5_K ? 48 : 16) + 32 * k);
        codes[2 * k] = _mm256_and_si256(v, low4);
        codes[2 * k + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        if constexpr (F == Q5_K) {  // the fifth bits: bit 2k of each qh byte for sub-block 2k
          codes[2 * k] = _mm256_or_si256(codes[2 * k], _mm256_slli_epi16(bits(qh, 2 * k, 1), 4));
          codes[2 * k + 1] = _mm256_or_si256(codes[2 * k + 1], _mm256_slli_epi16(bits(qh, 2 * k + 1, 1), 4));
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) {
        const int8_t* xq = xa.q.data() + (r0 + r) * w.in + b * 256;
        __m256i dots[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j)
          dots[j] = dot_u8_s8(codes[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * j)));
        const int64_t at = (r0 + r) * xblocks + b * 8;
        const __m256 xscale = _mm256_loadu_ps(xa.scale.data() + at);
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(scale, xscale), _mm256_cvtepi32_ps(row_sums(dots)), acc[r]);
        offset[r] = _mm256_fmadd_ps(minimum, _mm256_loadu_ps(xa.sum.data() + at), offset[r]);
      }
    }
    const float bias = w.bias ? w.bias[o] : 0.0f;
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) y[r * ldy + o] = hsum(_mm256_sub_ps(acc[r], offset[r])) + bias;
  }
}

// ---- Q5_0 / Q5_1 with int8 activations, straight from the block bytes --------------------------
// Unsigned 5-bit codes u (0..31): value = d*(u - 16) for Q5_0, d*u + m for Q5_1, the constant part
// against the activation block sums. Eight blocks at a time as matmul_rows_q8_by8 (their d and m
// gathered from the blocks' headers); the last blocks % 8 of a row (Gemma 3's 640 values are 20
// blocks) one at a time. At batch 1 such rows take matmul_flat_q8 instead.
template <int F>
inline __m256i q5_codes(const uint8_t* block) {
  constexpr int start = F == Q5_1 ? 4 : 2;
  uint32_t h;
  std::memcpy(&h, block + start, 4);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + start + 4));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m256i low = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
  return _mm256_or_si256(low, fifth_bits(h));
}

template <int F, int NB>
void q5_rows_q8(const QMat& w, const QuantizedActivations& xa, int64_t r0, float* y, int64_t ldy, int o0, int o1) {
  constexpr int bytes = Raw<F>::bytes;
  const int64_t blocks = w.in / QK, whole = blocks - blocks % 8;
  const float* scale8 = xa.scale8.data() + (r0 / 8) * blocks * 8;
  const float* sum8 = xa.sum8.data() + (r0 / 8) * blocks * 8;
  for (int o = o0; o < o1; ++o) {
    const uint8_t* row = w.qs + o * blocks * bytes;
    __m256 acc[NB], offset[NB];
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) acc[r] = offset[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < whole; b += 8) {
      alignas(16) uint16_t dh[8], mh[8];
      __m256i codes[8];
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const uint8_t* block = row + (b + k) * bytes;
        dh[k] = load_u16(block);
        if constexpr (F == Q5_1) mh[k] = load_u16(block + 2);
        codes[k] = q5_codes<F>(block);
      }
      const __m256 d = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(dh)));
      // Q5_0's constant is -16 d per block, Q5_1's m
      const __m256 constant = F == Q5_1 ? _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(mh)))
                                        : _mm256_mul_ps(d, _mm256_set1_ps(-16.0f));
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) {
        const int8_t* xq = xa.q.data() + (r0 + r) * w.in + b * QK;
        __m256i dots[8];
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k)
          dots[k] = dot_u8_s8(codes[k], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + QK * k)));
        const int64_t at = (r0 + r) * blocks + b;
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_loadu_ps(xa.scale.data() + at)),
                                 _mm256_cvtepi32_ps(row_sums(dots)), acc[r]);
        offset[r] = _mm256_fmadd_ps(constant, _mm256_loadu_ps(xa.sum.data() + at), offset[r]);
      }
    }
    float total[NB];
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) total[r] = hsum(acc[r]) + hsum(offset[r]);
    // The last blocks % 8 one at a time: the rows' dot products of a block reduce together (lane r:
    // row r), scaled and offset in one vector against the 8-row scale and sum layout.
    for (int64_t b = whole; b < blocks; ++b) {
      const uint8_t* block = row + b * bytes;
      const __m256i codes = q5_codes<F>(block);
      const float d = half_to_float(load_u16(block));
      const float constant = F == Q5_1 ? half_to_float(load_u16(block + 2)) : -16.0f * d;
      __m256i dots[8];
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r)
        dots[r] = r < NB ? dot_u8_s8(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                                xa.q.data() + (r0 + r) * w.in + b * QK)))
                         : _mm256_setzero_si256();
      alignas(32) float part[8];
      _mm256_store_ps(part, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(d), _mm256_loadu_ps(scale8 + b * 8)),
                                            _mm256_cvtepi32_ps(row_sums(dots)),
                                            _mm256_mul_ps(_mm256_set1_ps(constant), _mm256_loadu_ps(sum8 + b * 8))));
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) total[r] += part[r];
    }
    const float bias = w.bias ? w.bias[o] : 0.0f;
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) y[r * ldy + o] = total[r] + bias;
  }
}

// ---- batch 1 over rows of a block count that is not a multiple of 8 ---------------------------
// SmolLM2's 576 values are 18 blocks a row, Gemma 3's 640 are 20: the eight-block kernels above
// leave a tail per row, and the row-at-a-time ones read four rows interleaved, streams of a few
// hundred bytes each, too short for the hardware prefetcher (a 49152 x 576 Q8_0 head, SmolLM2's,
// streamed 3.9 GB/s from memory against 11.5 for 2,048-wide rows, and 21 from cache). Rows lie one
// after the other, so R = 8 / gcd(blocks, 8) consecutive rows are a whole number of eights of
// consecutive blocks: this kernel walks them in memory order, eight blocks (straddling rows where
// they fall) per transpose-and-add, each against its activation block in R copies of the row's
// activations, and sums each row's block products at the end.
// A Q8_0 / Q5_0 / Q5_1 block's codes (the 4-bit formats go two blocks at a time, q4_pair);
// `block` counts over the whole matrix.
template <int F>
inline __m256i flat_codes(const QMat& w, int64_t block) {
  if constexpr (F == Q5_0 || F == Q5_1) return q5_codes<F>(w.qs + block * Raw<F>::bytes);
  else return block_bytes<F>(w, 0, block);
}

// The scales d of the eight blocks from `block` on, and their constant terms c per unit of
// activation sum (value = d * code + constant: -8 d for Q4_0, -16 d for Q5_0, m for Q4_1 / Q5_1).
template <int F>
inline void flat_scales(const QMat& w, int64_t block, __m256& d, __m256& c) {
  if constexpr (F == Q5_0 || F == Q5_1) {
    alignas(16) uint16_t dh[8], mh[8];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const uint8_t* header = w.qs + (block + k) * Raw<F>::bytes;
      dh[k] = load_u16(header);
      if constexpr (F == Q5_1) mh[k] = load_u16(header + 2);
    }
    d = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(dh)));
    c = F == Q5_1 ? _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(mh)))
                  : _mm256_mul_ps(d, _mm256_set1_ps(-16.0f));
  } else {
    d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.d + block)));
    if constexpr (F == Q4_1) c = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.m + block)));
    else c = _mm256_mul_ps(d, _mm256_set1_ps(F == Q4_0 ? -8.0f : 0.0f));
  }
}

template <int F>
void matmul_flat_q8(const QMat& w, const QuantizedActivations& xa, float* y, int o0, int o1) {
  const int64_t blocks = w.in / QK;
  const int R = xa.flat_rows;
  const int64_t span = R * blocks;
  thread_local std::vector<float> part;  // one span's block products
  part.resize(static_cast<size_t>(span));
  int o = o0;
  for (; o + R <= o1; o += R) {
    const int64_t first = int64_t(o) * blocks;
    for (int64_t p = 0; p < span; p += 8) {
      __m256i totals;
      if constexpr (F == Q4_0 || F == Q4_1) {
        __m256i dots[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          __m256i lo, hi;
          q4_pair(w.qs + (first + p + 2 * j) * (QK / 2), lo, hi);
          dots[j] = dot_pair(lo, hi, xa.flat_pairs.data() + (p + 2 * j) * QK);
        }
        totals = pair_sums(dots);
      } else {
        __m256i dots[8];
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          const __m256i q = flat_codes<F>(w, first + p + k);
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa.flat_q.data() + (p + k) * QK));
          if constexpr (F == Q8_0) dots[k] = dot_u8_s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q));
          else dots[k] = dot_u8_s8(q, xv);
        }
        totals = row_sums(dots);
      }
      __m256 d, c;
      flat_scales<F>(w, first + p, d, c);
      const __m256 product = _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(xa.flat_scale.data() + p)),
                                           _mm256_cvtepi32_ps(totals));
      _mm256_storeu_ps(part.data() + p, F == Q8_0 ? product
                                                  : _mm256_fmadd_ps(c, _mm256_loadu_ps(xa.flat_sum.data() + p), product));
    }
    for (int i = 0; i < R; ++i) {
      const float* row = part.data() + i * blocks;
      __m256 v = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 8 <= blocks; b += 8) v = _mm256_add_ps(v, _mm256_loadu_ps(row + b));
      float total = hsum(v);
      for (; b < blocks; ++b) total += row[b];
      y[o + i] = total + (w.bias ? w.bias[o + i] : 0.0f);
    }
  }
  if (o < o1) {  // the rows past the last whole span, one at a time
    if constexpr (F == Q5_0 || F == Q5_1) q5_rows_q8<F, 1>(w, xa, 0, y, 0, o, o1);
    else matmul_rows_q8<F, 1>(w, xa, 0, y, 0, o, o1);
  }
}

inline bool has_flat_kernel(int32_t format) { return format <= Q5_1; }  // Q4_0, Q4_1, Q8_0, Q5_0, Q5_1

void flat_rows_q8(const QMat& w, const QuantizedActivations& xa, float* y, int o0, int o1) {
  switch (w.format) {
    case Q4_0: return matmul_flat_q8<Q4_0>(w, xa, y, o0, o1);
    case Q4_1: return matmul_flat_q8<Q4_1>(w, xa, y, o0, o1);
    case Q8_0: return matmul_flat_q8<Q8_0>(w, xa, y, o0, o1);
    case Q5_0: return matmul_flat_q8<Q5_0>(w, xa, y, o0, o1);
    default: return matmul_flat_q8<Q5_1>(w, xa, y, o0, o1);
  }
}

// ---- Q6_K with int8 activations, straight from the block bytes ---------------------------------
// value = d*sc_g * (u - 32) over 16 groups g of 16 values, u in 0..63 unsigned (so one vpdpbusd per
// 32 values, no sign tricks), and the -32 folded into an offset against the activations' per-16
// sums: y = sum_g (d sc_g)(x scale) (sum_i u_i x_i) - 32 sum_g (d sc_g)(x scale sum_i x_i).
// A 32-value chunk's dot product holds group 2c in lanes 0-3 and 2c+1 in lanes 4-7; two levels of
// horizontal adds over four chunks leave groups [0 2 4 6 | 1 3 5 7] in one vector's lanes, which
// the scales are shuffled to match.
template <int NB>
void q6k_rows_q8(const QMat& w, const QuantizedActivations& xa, int64_t r0, float* y, int64_t ldy, int o0, int o1) {
  const int64_t blocks = w.in / 256, row_bytes = blocks * Raw<Q6_K>::bytes, xblocks = w.in / QK, groups = w.in / 16;
  const __m128i lane_order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int o = o0; o < o1; ++o) {
    const uint8_t* row = w.qs + o * row_bytes;
    __m256 acc[NB], offset[NB];
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) acc[r] = offset[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = row + b * Raw<Q6_K>::bytes;
      const __m256 d = _mm256_set1_ps(half_to_float(load_u16(block + 208)));
      const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192));
      const __m128i shuffled = _mm_shuffle_epi8(sc, lane_order);
      __m256 natural[2], lanes[2];  // d sc_g for groups 0-7, 8-15: in order, and in the sums' lane order
      for (int h = 0; h < 2; ++h) {
        natural[h] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h ? _mm_srli_si128(sc, 8) : sc)));
        lanes[h] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h ? _mm_srli_si128(shuffled, 8) : shuffled)));
      }
      __m256i codes[8];  // chunk 4h+k: values 128h + 32k ..
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i qh = load32(block + 128 + 32 * h);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          const __m256i v = load32(block + 64 * h + 32 * (k & 1));
          codes[4 * h + k] = _mm256_or_si256(bits(v, k < 2 ? 0 : 4, 0x0F), _mm256_slli_epi16(bits(qh, 2 * k, 3), 4));
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) {
        const int8_t* xq = xa.q.data() + (r0 + r) * w.in + b * 256;
        const float* xs = xa.scale.data() + (r0 + r) * xblocks + b * 8;
        const float* xsum = xa.sum16.data() + (r0 + r) * groups + b * 16;
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          __m256i dots[4];
#pragma GCC unroll 4
          for (int k = 0; k < 4; ++k)
            dots[k] = dot_u8_s8(codes[4 * h + k],
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 128 * h + 32 * k)));
          const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(dots[0], dots[1]), _mm256_hadd_epi32(dots[2], dots[3]));
          const __m256 scale = _mm256_mul_ps(lanes[h], _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xs + 4 * h)));
          acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[r]);
          offset[r] = _mm256_fmadd_ps(natural[h], _mm256_loadu_ps(xsum + 8 * h), offset[r]);
        }
      }
    }
    const float bias = w.bias ? w.bias[o] : 0.0f;
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) y[r * ldy + o] = hsum(acc[r]) - 32.0f * hsum(offset[r]) + bias;
  }
}

template <int F>
void raw_group_fp32(const QMat& w, const float* x, int64_t ldx, const float* sx16, float* y, int64_t ldy, int nb,
                    int o0, int o1) {
  switch (nb) {
    case 1: return raw_rows_fp32<F, 1>(w, x, ldx, sx16, y, ldy, o0, o1);
    case 2: return raw_rows_fp32<F, 2>(w, x, ldx, sx16, y, ldy, o0, o1);
    case 3: return raw_rows_fp32<F, 3>(w, x, ldx, sx16, y, ldy, o0, o1);
    case 4: return raw_rows_fp32<F, 4>(w, x, ldx, sx16, y, ldy, o0, o1);
    case 5: return raw_rows_fp32<F, 5>(w, x, ldx, sx16, y, ldy, o0, o1);
    case 6: return raw_rows_fp32<F, 6>(w, x, ldx, sx16, y, ldy, o0, o1);
    case 7: return raw_rows_fp32<F, 7>(w, x, ldx, sx16, y, ldy, o0, o1);
    default: return raw_rows_fp32<F, 8>(w, x, ldx, sx16, y, ldy, o0, o1);
  }
}

template <int F>
void raw_group_q8(const QMat& w, const QuantizedActivations& xa, int64_t r0, float* y, int64_t ldy, int nb, int o0,
                  int o1) {
  // The formats of Q4_K_M and Q5_K_M files (Q5_0/Q5_1 where a row is not whole super-blocks)
  // read without decode_block: kernels of their own.
  constexpr bool own = F == Q4_K || F == Q5_K || F == Q6_K || F == Q5_0 || F == Q5_1;
  if constexpr (own) {
    auto run = [&]<int NB>() {
      if constexpr (F == Q4_K || F == Q5_K) q4k_rows_q8<F, NB>(w, xa, r0, y, ldy, o0, o1);
      if constexpr (F == Q6_K) q6k_rows_q8<NB>(w, xa, r0, y, ldy, o0, o1);
      if constexpr (F == Q5_0 || F == Q5_1) q5_rows_q8<F, NB>(w, xa, r0, y, ldy, o0, o1);
    };
    switch (nb) {
      case 1: return run.template operator()<1>();
      case 2: return run.template operator()<2>();
      case 3: return run.template operator()<3>();
      case 4: return run.template operator()<4>();
      case 5: return run.template operator()<5>();
      case 6: return run.template operator()<6>();
      case 7: return run.template operator()<7>();
      default: return run.template operator()<8>();
    }
  }
  switch (nb) {
    // Several rows at a time pays for 32-value blocks (one short chain per block); a K-quant
    // block already runs 8 chunks per row, and decoding several at once measured slower.
    case 1: return raw_rows_q8<F, 1, Raw<F>::size == 32 ? 4 : 1>(w, xa, r0, y, ldy, o0, o1);
    case 2: return raw_rows_q8<F, 2, Raw<F>::size == 32 ? 2 : 1>(w, xa, r0, y, ldy, o0, o1);
    case 3: return raw_rows_q8<F, 3>(w, xa, r0, y, ldy, o0, o1);
    case 4: return raw_rows_q8<F, 4>(w, xa, r0, y, ldy, o0, o1);
    case 5: return raw_rows_q8<F, 5>(w, xa, r0, y, ldy, o0, o1);
    case 6: return raw_rows_q8<F, 6>(w, xa, r0, y, ldy, o0, o1);
    case 7: return raw_rows_q8<F, 7>(w, xa, r0, y, ldy, o0, o1);
    default: return raw_rows_q8<F, 8>(w, xa, r0, y, ldy, o0, o1);
  }
}

inline bool is_raw(int32_t format) { return format >= Q5_0 && format <= Q6_K; }

// Calls fn.template operator()<F>() with the raw format F of `format`.
template <class Fn>
void with_raw_format(int32_t format, Fn&& fn) {
  switch (format) {
    case Q5_0: return fn.template operator()<Q5_0>();
    case Q5_1: return fn.template operator()<Q5_1>();
    case Q2_K: return fn.template operator()<Q2_K>();
    case Q3_K: return fn.template operator()<Q3_K>();
    case Q4_K: return fn.template operator()<Q4_K>();
    case Q5_K: return fn.template operator()<Q5_K>();
    default: return fn.template operator()<Q6_K>();
  }
}

void raw_rows_fp32_any(const QMat& w, const float* x, int64_t n, int64_t ldx, const float* sx16, float* y, int64_t ldy,
                       int o0, int o1) {
  const int64_t groups = w.in / 16;
  with_raw_format(w.format, [&]<int F>() {
    for (int64_t r = 0; r < n; r += 8) {
      const int nb = static_cast<int>(std::min<int64_t>(8, n - r));
      raw_group_fp32<F>(w, x + r * ldx, ldx, sx16 + r * groups, y + r * ldy, ldy, nb, o0, o1);
    }
  });
}

void raw_rows_q8_any(const QMat& w, const QuantizedActivations& xa, int64_t n, float* y, int64_t ldy, int o0, int o1) {
  with_raw_format(w.format, [&]<int F>() {
    for (int64_t r = 0; r < n; r += 8) {
      const int nb = static_cast<int>(std::min<int64_t>(8, n - r));
      raw_group_q8<F>(w, xa, r, y + r * ldy, ldy, nb, o0, o1);
    }
  });
}

// ---- AVX-512: int8 activations times 16-row panels (prefills and batches) ----------------------
// Where the CPU has AVX-512 F/BW/VNNI (the `avx512` build), several activation rows multiply
// every format through one kernel. Each thread decodes 16 weight rows at a time into a panel of
// unsigned bytes u = c + z (z lifts the format's codes to >= 0), interleaved four values per row:
// bytes [chunk k/4][row 0..15][4]. One 512-bit load of the panel then holds 4 values of all 16
// rows, and vpdpbusd against 4 activation bytes broadcast from memory adds their products into 16
// int32 lanes, one per output row: no horizontal sums, and the decoding is paid once per 16 rows
// and call, whatever the number of activation rows. Per group of G values (32, or 16 where the
// format keeps a scale per 16), the 16 rows' int32 sums become floats once:
//   y += (S * dx) * sum(u q) + O' * (dx * sum(q)),  O' = O - z * S,
// dx and dx * sum(q) being the activation block's scale and scaled code sum (QuantizedActivations).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// Activation rows from which a matrix takes the panel kernel rather than the row kernels above
// (python -m memlm.bench.kernels --shape 2048x8192 --rows 4,6,8,12,16 --activations q8_0, one
// thread, against a build without panels): Q4_0 / Q4_1, two blocks per load, gain from 16 rows
// (12: 1.00x, 16: 1.53x); Q8_0, Q5_0 and the K-quants from 8 (1.32-1.83x), where the panels'
// time hardly depends on the rows (it is the decoding) and already beats the row kernels' at 6.
constexpr int64_t kPanelMinRows = 6;
// Whether n int8 activation rows take the panels for a matrix of this format.
inline bool takes_panels(int32_t format, int64_t n) { return n >= (format == Q4_0 || format == Q4_1 ? 16 : kPanelMinRows); }

template <int F>
constexpr int panel_group() { return F == Q2_K || F == Q3_K || F == Q6_K ? 16 : 32; }

template <int F>
constexpr int panel_zero() {
  if constexpr (F == Q8_0) return 128;
  else if constexpr (F == Q6_K) return 32;
  else if constexpr (F == Q5_0) return 16;
  else if constexpr (F == Q3_K) return 4;
  else return 0;
}

struct Panel {
  std::vector<uint8_t> codes;  // [in / 4, 16, 4]
  std::vector<float> s, o;     // [in / G, 16]: S and O' per group and row
};

// The blocks the panel decodes at a time: 32 values for Q4_0 / Q4_1 / Q8_0, else the file's.
template <int F>
constexpr int panel_block_size() {
  if constexpr (F == Q4_0 || F == Q4_1 || F == Q8_0) return QK;
  else return Raw<F>::size;
}

// Block b of row `row` into u (its values lifted by z) and its groups' S and O' into s and o.
// The formats of Q4_K_M / Q6_K files compute their scales as vectors (scalar code for the 8 or 16
// groups of a super-block cost the panels more than their codes).
template <int F>
void panel_block(const QMat& w, int64_t row, int64_t b, uint8_t* u, float* s, float* o) {
  constexpr int Z = panel_zero<F>();
  if constexpr (F == Q4_0 || F == Q4_1 || F == Q8_0) {
    const int64_t blocks = w.in / QK;
    const __m256i lift = _mm256_set1_epi8(static_cast<char>(Z));
    _mm256_store_si256(reinterpret_cast<__m256i*>(u), _mm256_add_epi8(block_bytes<F>(w, row, b), lift));
    const float d = half_to_float(w.d[row * blocks + b]);
    s[0] = d;
    if constexpr (F == Q4_1) o[0] = half_to_float(w.m[row * blocks + b]);
    else o[0] = -static_cast<float>(F == Q4_0 ? 8 : Z) * d;
  } else {
    constexpr int BS = Raw<F>::size;
    constexpr bool vector_scales = F == Q4_K || F == Q5_K || F == Q6_K;
    const uint8_t* block = w.qs + (row * (w.in / BS) + b) * Raw<F>::bytes;
    Decoded dec;
    decode_block<F, !vector_scales, true>(block, dec, reinterpret_cast<int8_t*>(u));
    if constexpr (F == Q4_K || F == Q5_K) {  // Z = 0: O' = O = -dmin * m
      __m256 scale, minimum;
      q4k_scales(block, scale, minimum);
      _mm256_storeu_ps(s, scale);
      _mm256_storeu_ps(o, _mm256_sub_ps(_mm256_set1_ps(-0.0f), minimum));
    } else if constexpr (F == Q6_K) {  // O = -0.0: O' = -32 S
      const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192));
      const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(half_to_float(load_u16(block + 208))),
                                         _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
      _mm512_storeu_ps(s, scale);
      _mm512_storeu_ps(o, _mm512_sub_ps(_mm512_set1_ps(-0.0f), _mm512_mul_ps(_mm512_set1_ps(32.0f), scale)));
    } else {
      constexpr int G = panel_group<F>();
      for (int g = 0; g < BS / G; ++g) {
        const float scale = dec.s[g * G / 16];
        s[g] = scale;
        o[g] = dec.o[g * G / 16] - static_cast<float>(Z) * scale;
      }
    }
  }
}

// m[i] lane j <- m[j] lane i, for 16 vectors of 16 int32: pairs of lanes, then of 64-bit halves
// interleave, then two rounds of 128-bit lane shuffles.
inline void transpose16(__m512i m[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(m[i], m[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(m[i], m[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    m[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    m[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    m[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    m[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // m[4a + c] lane 4l + e holds element (row 4a + e, column 4l + c); the 128-bit lane shuffles
  // gather lane l from the four a's.
#pragma GCC unroll 2
  for (int h = 0; h < 16; h += 8)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      t[h + c] = _mm512_shuffle_i32x4(m[h + c], m[h + 4 + c], 0x88);
      t[h + 4 + c] = _mm512_shuffle_i32x4(m[h + c], m[h + 4 + c], 0xDD);
    }
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) {
    m[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    m[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xDD);
  }
}

// Prefetch the bytes of values [v, v + n) of row `row` (and their block scales): the panels read
// 16 rows a block at a time, 16 short streams the hardware prefetcher does not follow in time.
template <int F>
inline void prefetch_values(const QMat& w, int64_t row, int64_t v, int64_t n) {
  const auto lines = [](const void* from, int64_t bytes) {
    const char* p = static_cast<const char*>(from);
    for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(p + at, _MM_HINT_T0);
  };
  if constexpr (F == Q4_0 || F == Q4_1 || F == Q8_0) {
    constexpr int den = F == Q8_0 ? 1 : 2;  // values per byte
    lines(w.qs + (row * w.in + v) / den, n / den);
    lines(w.d + row * (w.in / QK) + v / QK, 2 * n / QK);
    if constexpr (F == Q4_1) lines(w.m + row * (w.in / QK) + v / QK, 2 * n / QK);
  } else {
    constexpr int BS = Raw<F>::size;
    lines(w.qs + (row * (w.in / BS) + v / BS) * Raw<F>::bytes, n / BS * Raw<F>::bytes);
  }
}

// Output rows p0 .. p0+count-1 (count <= 16; the rest of the panel is zeros) into `panel`: V
// values of the 16 rows at a time are decoded into a tile that stays in L1, then interleaved,
// 64 bytes of each row being a 16 x 16 matrix of 4-byte chunks transposed in registers; the
// rows' scales and offsets of those values are transposed the same way into one vector per group.
template <int F>
void pack_panel(const QMat& w, int p0, int count, Panel& panel) {
  constexpr int G = panel_group<F>(), BS = panel_block_size<F>(), V = BS > 64 ? BS : 64, NG = V / G;
  // NG <= 8: a row's scales in lanes 0-7 and offsets in 8-15 of one vector; 16: one vector each.
  constexpr int SV = NG <= 8 ? 1 : 2;
  const int64_t in = w.in;
  panel.codes.resize(static_cast<size_t>(16 * in));
  panel.s.resize(static_cast<size_t>(in / G * 16));
  panel.o.resize(static_cast<size_t>(in / G * 16));
  alignas(64) uint8_t tile[16][V] = {};
  alignas(64) float scales[SV][16][16] = {};
  for (int64_t v0 = 0; v0 < in; v0 += V) {
    const int64_t width = std::min<int64_t>(V, in - v0);  // 32 at the end of an odd number of 32-blocks
    // The next panel's same values: one panel ahead, spread over this one's steps (batch-8 decode
    // of a 1B-shape Q4_K_M file: 1.0-1.08x the speed with each row's own values fetched 512
    // ahead instead, ~1.1x that with no prefetch).
    for (int i = p0 + 16; i < std::min(p0 + 32, w.out); ++i) prefetch_values<F>(w, i, v0, width);
    for (int i = 0; i < count; ++i)
      for (int64_t at = 0; at < width; at += BS) {
        float* s = scales[0][i] + at / G;
        float* o = SV == 1 ? scales[0][i] + 8 + at / G : scales[SV - 1][i] + at / G;
        panel_block<F>(w, p0 + i, (v0 + at) / BS, tile[i] + at, s, o);
      }
    for (int64_t c = 0; c < width; c += 64) {
      __m512i m[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) m[i] = _mm512_load_si512(tile[i] + c);
      transpose16(m);
      const int64_t chunks = std::min<int64_t>(16, (width - c) / 4);
      for (int64_t j = 0; j < chunks; ++j) _mm512_storeu_si512(panel.codes.data() + ((v0 + c) / 4 + j) * 64, m[j]);
    }
    const int64_t g0 = v0 / G, groups = width / G;
    for (int v = 0; v < SV; ++v) {
      __m512i m[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) m[i] = _mm512_load_si512(scales[v][i]);
      transpose16(m);
      for (int64_t g = 0; g < groups; ++g) {
        if constexpr (SV == 1) {
          _mm512_storeu_si512(panel.s.data() + (g0 + g) * 16, m[g]);
          _mm512_storeu_si512(panel.o.data() + (g0 + g) * 16, m[8 + g]);
        } else {
          _mm512_storeu_si512((v ? panel.o : panel.s).data() + (g0 + g) * 16, m[g]);
        }
      }
    }
  }
}

// NR activation rows (from r0) against P packed panels: out[p][r] = panel p's 16 output rows'
// sums for activation row r. Two panels share each broadcast of 4 activation bytes.
template <int G, int NR, int P>
void panel_tile(const Panel* panel, const QuantizedActivations& xa, int64_t in, int64_t r0, __m512 out[P][NR]) {
  const int64_t blocks = in / QK, groups = in / G;
  const float* sums = G == 32 ? xa.sum.data() : xa.sum16.data();
  __m512 acc[P][NR];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[p][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[P][NR];
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) dot[p][r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int c = 0; c < G / 4; ++c) {
      __m512i u[P];
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) u[p] = _mm512_loadu_si512(panel[p].codes.data() + (g * G / 4 + c) * 64);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        int32_t x4;
        std::memcpy(&x4, xa.q.data() + (r0 + r) * in + g * G + 4 * c, 4);
        const __m512i x = _mm512_set1_epi32(x4);
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) dot[p][r] = _mm512_dpbusd_epi32(dot[p][r], u[p], x);
      }
    }
    const int64_t b = g * G / QK;
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      const __m512 s = _mm512_loadu_ps(panel[p].s.data() + g * 16), o = _mm512_loadu_ps(panel[p].o.data() + g * 16);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        const __m512 scale = _mm512_mul_ps(s, _mm512_set1_ps(xa.scale[(r0 + r) * blocks + b]));
        acc[p][r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot[p][r]), acc[p][r]);
        acc[p][r] = _mm512_fmadd_ps(o, _mm512_set1_ps(sums[(r0 + r) * groups + g]), acc[p][r]);
      }
    }
  }
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) out[p][r] = acc[p][r];
}

// All n activation rows against P panels (output rows p0 ..), NR rows at a time and a tail.
template <int G, int P, int NR>
void panel_rows(const Panel* panel, const QMat& w, const QuantizedActivations& xa, int64_t n, float* y, int64_t ldy,
                int p0, int count) {
  __mmask16 valid[P];
  __m512 bias[P];
  for (int p = 0; p < P; ++p) {
    const int rows = std::clamp(count - 16 * p, 0, 16);
    valid[p] = static_cast<__mmask16>((1u << rows) - 1);
    bias[p] = w.bias ? _mm512_maskz_loadu_ps(valid[p], w.bias + p0 + 16 * p) : _mm512_setzero_ps();
  }
  const auto tile = [&]<int R>(int64_t r0) {
    __m512 out[P][R];
    panel_tile<G, R, P>(panel, xa, w.in, r0, out);
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        _mm512_mask_storeu_ps(y + (r0 + r) * ldy + p0 + 16 * p, valid[p], _mm512_add_ps(out[p][r], bias[p]));
  };
  int64_t r0 = 0;
  for (; r0 + NR <= n; r0 += NR) tile.template operator()<NR>(r0);
  switch (n - r0) {
    case 1: tile.template operator()<1>(r0); break;
    case 2: tile.template operator()<2>(r0); break;
    case 3: tile.template operator()<3>(r0); break;
    case 4: if constexpr (NR > 4) tile.template operator()<4>(r0); break;
    case 5: if constexpr (NR > 5) tile.template operator()<5>(r0); break;
    case 6: if constexpr (NR > 6) tile.template operator()<6>(r0); break;
    case 7: if constexpr (NR > 7) tile.template operator()<7>(r0); break;
    default: break;
  }
}

// Output rows 32 at a time: two panels against 4 activation rows (at 64 rows 1.07-1.24x one panel
// against 8, NR = 6 no better), a last panel of up to 16 rows alone.
template <int F>
void panel_rows_q8(const QMat& w, const QuantizedActivations& xa, int64_t n, float* y, int64_t ldy, int o0, int o1) {
  constexpr int G = panel_group<F>();
  thread_local Panel panel[2];
  for (int p0 = o0; p0 < o1; p0 += 32) {
    const int count = std::min(32, o1 - p0);
    pack_panel<F>(w, p0, std::min(count, 16), panel[0]);
    if (count > 16) {
      pack_panel<F>(w, p0 + 16, count - 16, panel[1]);
      panel_rows<G, 2, 4>(panel, w, xa, n, y, ldy, p0, count);
    } else panel_rows<G, 1, 8>(panel, w, xa, n, y, ldy, p0, count);
  }
}

void panel_rows_q8_any(const QMat& w, const QuantizedActivations& xa, int64_t n, float* y, int64_t ldy, int o0, int o1) {
  switch (w.format) {
    case Q4_0: return panel_rows_q8<Q4_0>(w, xa, n, y, ldy, o0, o1);
    case Q4_1: return panel_rows_q8<Q4_1>(w, xa, n, y, ldy, o0, o1);
    case Q8_0: return panel_rows_q8<Q8_0>(w, xa, n, y, ldy, o0, o1);
    default: with_raw_format(w.format, [&]<int F>() { panel_rows_q8<F>(w, xa, n, y, ldy, o0, o1); });
  }
}
#else
constexpr int64_t kPanelMinRows = 0;  // no panels
inline bool takes_panels(int32_t, int64_t) { return false; }
void panel_rows_q8_any(const QMat&, const QuantizedActivations&, int64_t, float*, int64_t, int, int) {}
#endif

// Row `row` of a raw-format matrix, dequantized: S * c + O per value, a multiply then an add.
template <int F>
void raw_dequantize_row(const QMat& w, int64_t row, float* out) {
  constexpr int BS = Raw<F>::size;
  const int64_t blocks = w.in / BS;
  const uint8_t* p = w.qs + row * blocks * Raw<F>::bytes;
  Decoded dec;
  for (int64_t b = 0; b < blocks; ++b) {
    decode_block<F>(p + b * Raw<F>::bytes, dec);
    for (int g = 0; g < BS / 16; ++g) {
      const __m256 s = _mm256_set1_ps(dec.s[g]), o = _mm256_set1_ps(dec.o[g]);
      for (int i = 0; i < 2; ++i)
        _mm256_storeu_ps(out + b * BS + 16 * g + 8 * i,
                         _mm256_add_ps(_mm256_mul_ps(s, codes8(dec.q + 16 * g + 8 * i)), o));
    }
  }
}

// The per-16 sums of x for the raw formats' offsets: sx16[r * in/16 + g].
void group_sums(const float* x, int64_t n, int64_t ldx, int64_t in, std::vector<float>& sx16) {
  const int64_t groups = in / 16;
  sx16.resize(static_cast<size_t>(n * groups));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + r * ldx + g * 16;
      sx16[r * groups + g] = hsum(_mm256_add_ps(_mm256_loadu_ps(xg), _mm256_loadu_ps(xg + 8)));
    }
}

// A matmul's activations, prepared once (block sums, or int8 blocks) and read by every thread.
struct Input {
  bool q8 = false;
  const float* x = nullptr;
  int64_t n = 0, ldx = 0;
  std::vector<float> sx, sx16;
  QuantizedActivations xa;

  // `raw`: some matrix read with these activations is in a raw format (per-16 sums needed);
  // `paired`: some matrix is Q4_0 / Q4_1 (int8 activations in pairs of blocks needed).
  void prepare(const QMat& w, const float* x_, int64_t n_, int64_t ldx_, bool q8_, bool raw, bool paired) {
    x = x_, n = n_, ldx = ldx_, q8 = q8_;
    if (q8) quantize_activations(x, n, ldx, w.in, paired, xa);
    else {
      block_sums(x, n, ldx, w.in, sx);
      if (raw) group_sums(x, n, ldx, w.in, sx16);
    }
  }

  void rows(const QMat& w, float* y, int64_t ldy, int o0, int o1) const {
    if (q8 && xa.flat_rows > 0 && has_flat_kernel(w.format)) flat_rows_q8(w, xa, y, o0, o1);
    else if (q8 && takes_panels(w.format, n)) panel_rows_q8_any(w, xa, n, y, ldy, o0, o1);
    else if (is_raw(w.format)) {
      if (q8) raw_rows_q8_any(w, xa, n, y, ldy, o0, o1);
      else raw_rows_fp32_any(w, x, n, ldx, sx16.data(), y, ldy, o0, o1);
    } else if (q8) rows_q8(w, xa, n, y, ldy, o0, o1);
    else rows_fp32(w, x, n, ldx, sx.data(), y, ldy, o0, o1);
  }
};

// y[n, out] = x[n, in] W^T (+ bias), activations fp32 (exact against the reference weights) or
// int8 blocks; output rows split over the thread team.
float dot(const float* a, const float* b, int n);

// Whether rank column j applies to token r: always with one adapter; with stacked adapters only
// the token's own (adapter[r], 0 = none) -- S-LoRA's gather, so a token pays for its adapter alone.
inline bool lora_column(const QMat& w, const int32_t* adapter, int64_t r, int j) {
  return w.lora_owner == nullptr || w.lora_owner[j] == (adapter ? adapter[r] : 0);
}

// y[:, o0:o1] += scaling * h B^T[:, o0:o1], with h = x A^T [n, rank] computed once by the caller.
void add_lora_rows(const QMat& w, const float* h, int64_t n, float* y, int64_t ldy, int o0, int o1,
                   const int32_t* adapter) {
  for (int64_t r = 0; r < n; ++r) {
    float* yr = y + r * ldy;
    for (int j = 0; j < w.rank; ++j) {
      if (!lora_column(w, adapter, r, j)) continue;
      const float s = w.scaling * h[r * w.rank + j];
      const float* bt = w.lora_bt + int64_t(j) * w.out;
      const __m256 vs = _mm256_set1_ps(s);
      int o = o0;
      for (; o + 8 <= o1; o += 8)
        _mm256_storeu_ps(yr + o, _mm256_fmadd_ps(vs, _mm256_loadu_ps(bt + o), _mm256_loadu_ps(yr + o)));
      for (; o < o1; ++o) yr[o] += s * bt[o];
    }
  }
}

void matmul_any(const QMat& w, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy, bool q8,
                bool lora = false, const int32_t* adapter = nullptr) {
  thread_local Input input;  // reused across calls by each calling thread
  thread_local std::vector<float> down;
  const Input* in = &input;  // the team reads the caller's (a thread_local named in a task is the worker's own)
  // A matrix of mixed formats runs each part on its own output columns of y; one part otherwise.
  const QMat* parts = w.nparts > 0 ? w.parts : &w;
  const int count = w.nparts > 0 ? w.nparts : 1;
  bool raw = false;
  bool paired = false;
  for (int p = 0; p < count; ++p) {
    raw = raw || is_raw(parts[p].format);
    paired = paired || parts[p].format == Q4_0 || parts[p].format == Q4_1;
  }
  paired = paired && !(q8 && takes_panels(Q4_0, n));  // the panels read q alone
  input.prepare(w, x, n, ldx, q8, raw, paired);
  const bool adapted = lora && w.lora_a != nullptr;
  if (adapted) {  // x A^T: n x rank dot products over `in`, small next to the matmul
    down.resize(static_cast<size_t>(n * w.rank));
    for (int64_t r = 0; r < n; ++r)
      for (int j = 0; j < w.rank; ++j)
        down[r * w.rank + j] = lora_column(w, adapter, r, j) ? dot(x + r * ldx, w.lora_a + int64_t(j) * w.in, w.in) : 0.0f;
  }
  const float* h = down.data();
  const int team = threads();
  if (count == 1) {
    const int slices = parts_for(w.out, team);
    parallel(slices, [&](int t) {
      int o0, o1;
      share(w.out, t, slices, o0, o1);
      in->rows(w, y, ldy, o0, o1);
      if (adapted) add_lora_rows(w, h, n, y, ldy, o0, o1, adapter);
    });
    return;
  }
  // Every part's slices in one parallel region: (part, slice) tasks, each part's rows shared out.
  int slices[64], first[65], offset[64];
  first[0] = 0;
  for (int p = 0, row = 0; p < count; ++p) {
    slices[p] = parts_for(parts[p].out, team);
    first[p + 1] = first[p] + slices[p];
    offset[p] = row;
    row += parts[p].out;
  }
  parallel(first[count], [&](int t) {
    int p = 0;
    while (t >= first[p + 1]) ++p;
    int o0, o1;
    share(parts[p].out, t - first[p], slices[p], o0, o1);
    in->rows(parts[p], y + offset[p], ldy, o0, o1);
  });
  if (adapted) {
    const int lora_slices = parts_for(w.out, team);
    parallel(lora_slices, [&](int t) {
      int o0, o1;
      share(w.out, t, lora_slices, o0, o1);
      add_lora_rows(w, h, n, y, ldy, o0, o1, adapter);
    });
  }
}

template <int F>
void dequantize_row(const QMat& w, int64_t row, float* out) {
  for (int64_t b = 0; b < w.in / QK; ++b) {
    __m256 v[4];
    dequant_block<F>(w, row, b, v);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + b * QK + 8 * i, v[i]);
  }
}

void dequantize_rows(const QMat& w, const int64_t* rows, int64_t n, float* out) {
  const int64_t per_task = std::max<int64_t>(1, 16384 / w.in);
  const int tasks = static_cast<int>((n + per_task - 1) / per_task);
  parallel(tasks, [&](int t) {
    for (int64_t i = t * per_task; i < std::min(n, (t + 1) * per_task); ++i) {
      int64_t row = rows ? rows[i] : i;
      const QMat* m = &w;
      for (int p = 0; p < w.nparts; ++p) {  // a mixed matrix: the part holding this row
        m = w.parts + p;
        if (row < m->out) break;
        row -= m->out;
      }
      float* dst = out + i * w.in;
      if (is_raw(m->format)) {
        with_raw_format(m->format, [&]<int F>() { raw_dequantize_row<F>(*m, row, dst); });
        continue;
      }
      switch (m->format) {
        case Q4_0: dequantize_row<Q4_0>(*m, row, dst); break;
        case Q4_1: dequantize_row<Q4_1>(*m, row, dst); break;
        default: dequantize_row<Q8_0>(*m, row, dst); break;
      }
    }
  });
}

// ---- the layers around the matmuls -----------------------------------------------------------

void rms_norm(const float* x, const float* weight, float eps, int n, float* out) {
  __m256 ss = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    ss = _mm256_fmadd_ps(v, v, ss);
  }
  float sum = hsum(ss);
  for (; i < n; ++i) sum += x[i] * x[i];
  const float scale = 1.0f / std::sqrt(sum / n + eps);
  for (i = 0; i < n; ++i) out[i] = x[i] * scale * weight[i];
}

// x * cos + roll(x, d/2) * signed_sin, in place (the half-split RoPE of Hugging Face checkpoints).
// Rotates the first d values (the rest of a head passes: partial rotary).
void rope(float* x, const float* cos, const float* ssin, int d) {
  const int h = d / 2;
  float tmp[512];
  std::memcpy(tmp, x, sizeof(float) * d);
  for (int i = 0; i < d; ++i) x[i] = tmp[i] * cos[i] + tmp[(i + h) % d] * ssin[i];
}

// The 8 lanes of a . b over its first n16 values (a multiple of 16), before the final hsum: two
// independent FMA chains, added once.
inline __m256 dot_lanes(const float* a, const float* b, int n16) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (int i = 0; i < n16; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  return _mm256_add_ps(s0, s1);
}

float dot(const float* a, const float* b, int n) {
  const int n16 = n - n % 16;
  float s = hsum(dot_lanes(a, b, n16));
  for (int i = n16; i < n; ++i) s += a[i] * b[i];
  return s;
}

void softmax(float* p, int n) {
  float mx = -INFINITY;
  for (int i = 0; i < n; ++i) mx = std::max(mx, p[i]);
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vs = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + i), vmx));
    _mm256_storeu_ps(p + i, e);
    vs = _mm256_add_ps(vs, e);
  }
  float sum = hsum(vs);
  for (; i < n; ++i) {
    p[i] = std::exp(p[i] - mx);
    sum += p[i];
  }
  const float inv = 1.0f / sum;
  for (i = 0; i < n; ++i) p[i] *= inv;
}

void silu_mul(const float* gate, const float* up, int n, float* out) {
  int i = 0;
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 g = _mm256_loadu_ps(gate + i);
    __m256 e = exp_ps(_mm256_sub_ps(zero, g));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// GeGLU with torch's tanh approximation: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) * up,
// tanh(y) = 1 - 2 / (exp(2y) + 1) (saturates to +-1 as exp over/underflows).
void gelu_tanh_mul(const float* gate, const float* up, int n, float* out) {
  const float k = 0.7978845608028654f, c = 0.044715f;
  int i = 0;
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
  const __m256 vk = _mm256_set1_ps(k), vc = _mm256_set1_ps(c);
  for (; i + 8 <= n; i += 8) {
    __m256 g = _mm256_loadu_ps(gate + i);
    __m256 y = _mm256_mul_ps(vk, _mm256_fmadd_ps(_mm256_mul_ps(vc, g), _mm256_mul_ps(g, g), g));
    __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp_ps(_mm256_mul_ps(two, y)), one)));
    __m256 gelu = _mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_add_ps(one, t));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(gelu, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) {
    const float g = gate[i];
    out[i] = 0.5f * g * (1.0f + std::tanh(k * (g + c * g * g * g))) * up[i];
  }
}

// ---- the KV cache's stored forms (memlm/cache/kv_format.py) ----------------------------------
// A head's keys or values are stored as fp32, bf16, or ggml's q8_0 / q4_0 blocks of 32 (an fp16
// scale, then 32 int8 or 16 bytes of nibbles). Writing quantizes exactly as the torch reference
// does (same float operations in the same order), so both paths store identical bytes.

enum KVType : int32_t { KV_F32 = 0, KV_BF16 = 1, KV_Q8_0 = 2, KV_Q4_0 = 3 };

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

inline float round_away(float x) {  // ggml's roundf, written as the torch reference computes it
  const float a = std::fabs(x), fl = std::floor(a);
  const float r = fl + std::floor(2.0f * (a - fl));
  return x < 0 ? -r : (x > 0 ? r : 0.0f);
}

inline uint16_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

void kv_store(int32_t type, const float* x, int n, uint8_t* out) {
  if (type == KV_F32) {
    std::memcpy(out, x, sizeof(float) * n);
  } else if (type == KV_BF16) {
    auto* o = reinterpret_cast<uint16_t*>(out);
    for (int i = 0; i < n; ++i) o[i] = float_to_bf16(x[i]);
  } else if (type == KV_Q8_0) {
    for (int b = 0; b < n / QK; ++b, out += 2 + QK) {
      const float* xb = x + b * QK;
      float amax = 0.0f;
      for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
      const uint16_t dh = float_to_half(d);
      std::memcpy(out, &dh, 2);
      for (int i = 0; i < QK; ++i) out[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(round_away(xb[i] * id)));
    }
  } else {  // KV_Q4_0
    for (int b = 0; b < n / QK; ++b, out += 2 + QK / 2) {
      const float* xb = x + b * QK;
      float amax = 0.0f, mx = 0.0f;
      for (int i = 0; i < QK; ++i)
        if (std::fabs(xb[i]) > amax) amax = std::fabs(xb[i]), mx = xb[i];  // first of the largest, as argmax
      const float d = mx / -8.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
      const uint16_t dh = float_to_half(d);
      std::memcpy(out, &dh, 2);
      uint8_t q[QK];
      for (int i = 0; i < QK; ++i) q[i] = static_cast<uint8_t>(std::min(15.0f, std::max(0.0f, std::trunc(xb[i] * id + 8.5f))));
      for (int i = 0; i < QK / 2; ++i) out[2 + i] = q[i] | (q[i + QK / 2] << 4);
    }
  }
}

// 8 stored values from `p` (the i-th group of 8 of a head) as floats.
inline __m256 load_bf16(const uint8_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

inline __m256 load_i8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Values j..j+7 (j a multiple of 8 within a block of 32) of a q4_0 block's nibbles, minus 8.
inline __m256 load_q4(const uint8_t* qs, int j) {
  const int lane = j % 16, high = j >= 16;
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + lane));
  if (high) b = _mm_srli_epi16(b, 4);
  b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
  return _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_set1_ps(8.0f));
}

// out += w * stored vector of n values
void kv_axpy(int32_t type, float w, const uint8_t* p, int n, float* out) {
  const __m256 vw = _mm256_set1_ps(w);
  if (type == KV_F32 || type == KV_BF16) {
    for (int i = 0; i < n; i += 8) {
      const __m256 x = type == KV_F32 ? _mm256_loadu_ps(reinterpret_cast<const float*>(p) + i) : load_bf16(p + 2 * i);
      _mm256_storeu_ps(out + i, _mm256_fmadd_ps(vw, x, _mm256_loadu_ps(out + i)));
    }
    return;
  }
  const int bytes = type == KV_Q8_0 ? 2 + QK : 2 + QK / 2;
  for (int b = 0; b < n / QK; ++b, p += bytes) {
    uint16_t dh;
    std::memcpy(&dh, p, 2);
    const __m256 wd = _mm256_set1_ps(w * half_to_float(dh));
    for (int j = 0; j < QK; j += 8) {
      const __m256 x = type == KV_Q8_0 ? load_i8(p + 2 + j) : load_q4(p + 2, j);
      float* o = out + b * QK + j;
      _mm256_storeu_ps(o, _mm256_fmadd_ps(wd, x, _mm256_loadu_ps(o)));
    }
  }
}

// Attention over a run of stored keys / values (one head, consecutive slots of a block), several
// keys per pass: a key's dot product is left in the 8 lanes it is summed in last (the lanes kv_dot
// hands to hsum), and 8 keys' lanes are summed together by hsum8; each weighted value is added to
// an output held in registers. Both keep every float operation of kv_dot / kv_axpy in its order,
// so scores and outputs are bit-identical to the one-key-at-a-time loop, only fewer instructions.

// The 8 lanes of q . stored vector, before kv_dot's final hsum (F32 only when n % 16 == 0).
template <int T>
inline __m256 kv_dot_lanes(const float* q, const uint8_t* p, int n) {
  if constexpr (T == KV_F32) {
    return dot_lanes(q, reinterpret_cast<const float*>(p), n);
  } else if constexpr (T == KV_BF16) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load_bf16(p + 2 * i), acc);
    return acc;
  } else {
    constexpr int bytes = T == KV_Q8_0 ? 2 + QK : 2 + QK / 2;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n / QK; ++b, p += bytes) {
      uint16_t dh;
      std::memcpy(&dh, p, 2);
      __m256 s = _mm256_setzero_ps();
      for (int j = 0; j < QK; j += 8) {
        const __m256 w = T == KV_Q8_0 ? load_i8(p + 2 + j) : load_q4(p + 2, j);
        s = _mm256_fmadd_ps(_mm256_loadu_ps(q + b * QK + j), w, s);
      }
      acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(dh)), s, acc);
    }
    return acc;
  }
}

// q . stored vector of n values
float kv_dot(int32_t type, const float* q, const uint8_t* p, int n) {
  switch (type) {
    case KV_F32: return dot(q, reinterpret_cast<const float*>(p), n);  // any n
    case KV_BF16: return hsum(kv_dot_lanes<KV_BF16>(q, p, n));
    case KV_Q8_0: return hsum(kv_dot_lanes<KV_Q8_0>(q, p, n));
    default: return hsum(kv_dot_lanes<KV_Q4_0>(q, p, n));
  }
}

// hsum of each of 8 vectors, as one vector [hsum(v[0]) .. hsum(v[7])], adding in hsum's order:
// the two 128-bit halves, then lanes 0+2 and 1+3, then those two.
inline __m256 hsum8(const __m256* v) {
  __m256 x[4];
  for (int i = 0; i < 4; ++i)  // [v[i] halves summed | v[i + 4] halves summed]
    x[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[i], v[i + 4], 0x20), _mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
  // [a0+a2, b0+b2, a1+a3, b1+b3 | the same for v[4], v[5]] from x[0] = a, x[1] = b; likewise c, d
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(x[0], x[1]), _mm256_unpackhi_ps(x[0], x[1]));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(x[2], x[3]), _mm256_unpackhi_ps(x[2], x[3]));
  return _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
}

// p[i] = q . key i * scale for `count` keys from `keys`, `stride` bytes apart.
template <int T>
void kv_scores(const float* q, const uint8_t* keys, int64_t stride, int count, int hd, float scale, float* p) {
  int i = 0;
  __m256 lanes[8];
  for (; i + 8 <= count; i += 8) {
    for (int k = 0; k < 8; ++k) lanes[k] = kv_dot_lanes<T>(q, keys + (i + k) * stride, hd);
    _mm256_storeu_ps(p + i, _mm256_mul_ps(hsum8(lanes), _mm256_set1_ps(scale)));
  }
  for (; i < count; ++i) p[i] = hsum(kv_dot_lanes<T>(q, keys + i * stride, hd)) * scale;
}

// out[:hd] += sum_i w[i] * value i, for `count` values from `vals`, `stride` bytes apart; the
// output 8 * R floats at a time (hd % (8 * R) == 0), in registers across the values.
template <int T, int R>
void kv_weighted_sum(const float* w, const uint8_t* vals, int64_t stride, int count, int hd, float* out) {
  for (int d0 = 0; d0 < hd; d0 += 8 * R) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_loadu_ps(out + d0 + 8 * r);
    for (int i = 0; i < count; ++i) {
      const uint8_t* v = vals + i * stride;
      if constexpr (T == KV_F32 || T == KV_BF16) {
        const __m256 vw = _mm256_set1_ps(w[i]);
        for (int r = 0; r < R; ++r) {
          const int d = d0 + 8 * r;
          const __m256 x = T == KV_F32 ? _mm256_loadu_ps(reinterpret_cast<const float*>(v) + d) : load_bf16(v + 2 * d);
          acc[r] = _mm256_fmadd_ps(vw, x, acc[r]);
        }
      } else {
        constexpr int bytes = T == KV_Q8_0 ? 2 + QK : 2 + QK / 2;
        for (int r = 0; r < R; ++r) {
          const int d = d0 + 8 * r, j = d % QK;
          const uint8_t* block = v + (d / QK) * bytes;
          uint16_t dh;
          std::memcpy(&dh, block, 2);
          const __m256 wd = _mm256_set1_ps(w[i] * half_to_float(dh));
          const __m256 x = T == KV_Q8_0 ? load_i8(block + 2 + j) : load_q4(block + 2, j);
          acc[r] = _mm256_fmadd_ps(wd, x, acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + d0 + 8 * r, acc[r]);
  }
}

template <int T>
void kv_weighted_sum_any(const float* w, const uint8_t* vals, int64_t stride, int count, int hd, float* out) {
  if (hd % 64 == 0) return kv_weighted_sum<T, 8>(w, vals, stride, count, hd, out);
  if (hd % 32 == 0) return kv_weighted_sum<T, 4>(w, vals, stride, count, hd, out);
  for (int i = 0; i < count; ++i) kv_axpy(T, w[i], vals + i * stride, hd, out);
}

// The two by stored type; head sizes the lane forms do not cover go one key at a time.
void attend_scores(int32_t type, const float* q, const uint8_t* keys, int64_t stride, int count, int hd, float scale,
                   float* p) {
  switch (hd % 16 == 0 ? type : -1) {
    case KV_F32: return kv_scores<KV_F32>(q, keys, stride, count, hd, scale, p);
    case KV_BF16: return kv_scores<KV_BF16>(q, keys, stride, count, hd, scale, p);
    case KV_Q8_0: return kv_scores<KV_Q8_0>(q, keys, stride, count, hd, scale, p);
    case KV_Q4_0: return kv_scores<KV_Q4_0>(q, keys, stride, count, hd, scale, p);
    default:
      for (int i = 0; i < count; ++i) p[i] = kv_dot(type, q, keys + i * stride, hd) * scale;
  }
}

void attend_values(int32_t type, const float* w, const uint8_t* vals, int64_t stride, int count, int hd, float* out) {
  switch (type) {
    case KV_F32: return kv_weighted_sum_any<KV_F32>(w, vals, stride, count, hd, out);
    case KV_BF16: return kv_weighted_sum_any<KV_BF16>(w, vals, stride, count, hd, out);
    case KV_Q8_0: return kv_weighted_sum_any<KV_Q8_0>(w, vals, stride, count, hd, out);
    default: return kv_weighted_sum_any<KV_Q4_0>(w, vals, stride, count, hd, out);
  }
}

// x times the normalised Walsh-Hadamard matrix, per block of `n` (a power of two): the butterfly
// in the order of the torch reference (memlm.cache.kv_format.rotate), then one scale.
void hadamard(float* x, int d, int n) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  for (int base = 0; base < d; base += n) {
    float* y = x + base;
    for (int h = 1; h < n; h *= 2)
      for (int i = 0; i < n; i += 2 * h)
        for (int j = i; j < i + h; ++j) {
          const float a = y[j], b = y[j + h];
          y[j] = a + b;
          y[j + h] = a - b;
        }
    for (int i = 0; i < n; ++i) y[i] *= scale;
  }
}

}  // namespace

// ---- whole-model decode step -----------------------------------------------------------------

extern "C" {

struct LayerDesc {
  const float* attn_norm;
  QMat qkv;
  const float* q_norm;  // optional (Qwen3)
  const float* k_norm;
  QMat o;
  const float* ffn_norm;
  QMat gate_up;
  QMat down;
  const float* attn_out_norm;  // optional (Gemma's sandwich norms): on the attention's output
  const float* ffn_out_norm;   // and on the MLP's, before each residual add
  int32_t window;              // > 0: keys at positions > the query's - window only (sliding layers)
  int32_t local_rope;          // 1: RoPE from DecodeArgs' local tables (Gemma 3's sliding layers)
};

struct ModelDesc {
  int32_t layers, hidden, heads, kv_heads, head_dim, intermediate;
  float eps;
  int32_t quantized_activations;  // 1: int8 activation blocks in every matmul
  const LayerDesc* layer;
  int32_t activation;  // the gated MLP's: 0 silu, 1 gelu (tanh approximation)
  float attn_scale;    // scores' scale (Gemma: query_pre_attn_scalar^-1/2)
  int32_t rotary_dim;  // RoPE on each head's first rotary_dim values (Phi's partial rotary)
};

struct DecodeArgs {
  float* x;            // [tokens, hidden] embeddings in, final hidden states (before the last norm) out
  int32_t tokens;      // real tokens of the chunk, rows in order (padding removed)
  const float* cos;    // [tokens, head_dim]
  const float* ssin;   // [tokens, head_dim] signed sin
  uint8_t* k;          // cache storage [layers, blocks, kv_heads, block_size, stored head] and its
  uint8_t* v;          // strides in bytes over layer, block, head, slot-in-block
  int64_t k_stride[4];
  int64_t v_stride[4];
  const int64_t* row;   // [tokens] the batch row of each token
  const int64_t* slot;  // [tokens] the slot it is written to; it attends to its row's slots 0..slot
  const int64_t* table; // [rows, table_width] block ids: row b's slot s is in block table[b][s / block_size]
  int32_t table_width;
  int32_t block_size;
  int32_t kv_type;      // KVType of the stored keys and values
  int32_t rotate;       // 1: keys stored rotated (Hadamard); queries are rotated alike
  float* attention;     // optional [batch, width], one token per row only: head-mean attention / layers,
                        // summed over layers, written at row[t]
  int32_t width;
  int32_t lora;         // 1: apply the projections' LoRA adapters
  const int32_t* adapter;  // optional [tokens]: each token's adapter among stacked ones (0 = none)
  const float* cos_local;   // [tokens, rotary_dim] the local RoPE tables (layers with local_rope)
  const float* ssin_local;
  const int64_t* positions; // [rows, positions_width] each slot's position (sliding windows)
  int32_t positions_width;
};

}  // extern "C"

namespace {

struct Model {
  ModelDesc desc;
  std::vector<LayerDesc> layers;
  std::vector<float> h, qkv, att, gu, act, tmp, probs;
};

// Every layer for a chunk of tokens, each token in its own row at its own slot: decode steps (one
// token per row), and short chunks (latents inserted, rows joining) with the padding removed.
// A token's keys and values are written before attention runs, so a token attends to the chunk's
// earlier tokens of its row as causal attention does.
void decode(Model& model, const DecodeArgs& a) {
  const ModelDesc& c = model.desc;
  const int N = a.tokens, D = c.hidden, H = c.heads, KV = c.kv_heads, hd = c.head_dim, I = c.intermediate;
  const int q_size = H * hd, kv_size = KV * hd, qkv_size = q_size + 2 * kv_size, group = H / KV;
  int max_len = 0;
  for (int t = 0; t < N; ++t) max_len = std::max<int>(max_len, static_cast<int>(a.slot[t]) + 1);
  model.h.resize(static_cast<size_t>(N) * D);
  model.qkv.resize(static_cast<size_t>(N) * qkv_size);
  model.att.resize(static_cast<size_t>(N) * q_size);
  model.gu.resize(static_cast<size_t>(N) * 2 * I);
  model.act.resize(static_cast<size_t>(N) * I);
  model.tmp.resize(static_cast<size_t>(N) * D);
  model.probs.resize(static_cast<size_t>(N) * H * max_len);
  const float scale = c.attn_scale > 0 ? c.attn_scale : 1.0f / std::sqrt(static_cast<float>(hd));
  const int rot = c.rotary_dim > 0 ? c.rotary_dim : hd;
  const bool q8 = c.quantized_activations != 0, lora = a.lora != 0;

  for (int l = 0; l < c.layers; ++l) {
    const LayerDesc& L = model.layers[l];
    for (int t = 0; t < N; ++t) rms_norm(a.x + t * D, L.attn_norm, c.eps, D, model.h.data() + t * D);
    matmul_any(L.qkv, model.h.data(), N, D, model.qkv.data(), qkv_size, q8, lora, a.adapter);
    const float* cos = L.local_rope ? a.cos_local : a.cos;
    const float* ssin = L.local_rope ? a.ssin_local : a.ssin;
    uint8_t* kl = a.k + l * a.k_stride[0];
    uint8_t* vl = a.v + l * a.v_stride[0];
    for (int t = 0; t < N; ++t) {
      float* tok = model.qkv.data() + t * qkv_size;
      for (int h = 0; h < H + KV; ++h) {
        float* head = tok + h * hd;
        if (L.q_norm) rms_norm(head, h < H ? L.q_norm : L.k_norm, c.eps, hd, head);
        rope(head, cos + t * rot, ssin + t * rot, rot);
      }
      if (a.rotate)
        for (int h = 0; h < H + KV; ++h) hadamard(tok + h * hd, hd, hd & -hd);
      const int64_t b = a.row[t], slot = a.slot[t];
      const int64_t block = a.table[b * a.table_width + slot / a.block_size], at = slot % a.block_size;
      for (int g = 0; g < KV; ++g) {
        kv_store(a.kv_type, tok + q_size + g * hd, hd, kl + block * a.k_stride[1] + g * a.k_stride[2] + at * a.k_stride[3]);
        kv_store(a.kv_type, tok + q_size + kv_size + g * hd, hd,
                 vl + block * a.v_stride[1] + g * a.v_stride[2] + at * a.v_stride[3]);
      }
    }
    parallel(N * H, [&](int task) {
      const int t = task / H, h = task % H, g = h / group, n = static_cast<int>(a.slot[t]) + 1;
      const int64_t* blocks = a.table + a.row[t] * a.table_width;
      const float* q = model.qkv.data() + t * qkv_size + h * hd;
      float* p = model.probs.data() + (static_cast<size_t>(t) * H + h) * max_len;
      // A sliding layer sees the slots from `lo` on: slots are in time order, so the keys within
      // the window (position > the query's - window) are a suffix of the row, eviction or not.
      int lo = 0;
      if (L.window > 0) {
        const int64_t* pos = a.positions + a.row[t] * a.positions_width;
        const int64_t oldest = pos[n - 1] - L.window;
        while (lo < n - 1 && pos[lo] <= oldest) ++lo;
        std::fill(p, p + lo, 0.0f);
      }
      // Slot j lives in block blocks[j / bs] at offset j % bs: walk the row's blocks in order.
      const int bs = a.block_size;
      for (int j0 = lo - lo % bs; j0 < n; j0 += bs) {
        const int j = std::max(j0, lo), end = std::min(n, j0 + bs);
        const uint8_t* keys = kl + blocks[j0 / bs] * a.k_stride[1] + g * a.k_stride[2] + (j - j0) * a.k_stride[3];
        attend_scores(a.kv_type, q, keys, a.k_stride[3], end - j, hd, scale, p + j);
      }
      softmax(p + lo, n - lo);
      float* out = model.att.data() + t * q_size + h * hd;
      std::memset(out, 0, sizeof(float) * hd);
      for (int j0 = lo - lo % bs; j0 < n; j0 += bs) {
        const int j = std::max(j0, lo), end = std::min(n, j0 + bs);
        const uint8_t* vals = vl + blocks[j0 / bs] * a.v_stride[1] + g * a.v_stride[2] + (j - j0) * a.v_stride[3];
        attend_values(a.kv_type, p + j, vals, a.v_stride[3], end - j, hd, out);
      }
    });
    if (a.attention) {
      const float w = 1.0f / (H * c.layers);
      for (int t = 0; t < N; ++t) {
        const int n = static_cast<int>(a.slot[t]) + 1;
        float* received = a.attention + a.row[t] * a.width;
        for (int h = 0; h < H; ++h) {
          const float* p = model.probs.data() + (static_cast<size_t>(t) * H + h) * max_len;
          for (int j = 0; j < n; ++j) received[j] += p[j] * w;
        }
      }
    }
    matmul_any(L.o, model.att.data(), N, q_size, model.tmp.data(), D, q8, lora, a.adapter);
    if (L.attn_out_norm)
      for (int t = 0; t < N; ++t) rms_norm(model.tmp.data() + t * D, L.attn_out_norm, c.eps, D, model.tmp.data() + t * D);
    for (int i = 0; i < N * D; ++i) a.x[i] += model.tmp[i];
    for (int t = 0; t < N; ++t) rms_norm(a.x + t * D, L.ffn_norm, c.eps, D, model.h.data() + t * D);
    matmul_any(L.gate_up, model.h.data(), N, D, model.gu.data(), 2 * I, q8, lora, a.adapter);
    for (int t = 0; t < N; ++t) {
      const float* gate = model.gu.data() + t * 2 * I;
      (c.activation == 1 ? gelu_tanh_mul : silu_mul)(gate, gate + I, I, model.act.data() + t * I);
    }
    matmul_any(L.down, model.act.data(), N, I, model.tmp.data(), D, q8, lora, a.adapter);
    if (L.ffn_out_norm)
      for (int t = 0; t < N; ++t) rms_norm(model.tmp.data() + t * D, L.ffn_out_norm, c.eps, D, model.tmp.data() + t * D);
    for (int i = 0; i < N * D; ++i) a.x[i] += model.tmp[i];
  }
}

}  // namespace

extern "C" {

int32_t mk_abi_version() { return 11; }

int32_t mk_threads() { return threads(); }

// The fewest activation rows the int8 panel kernel takes (0: this build has none); it takes every
// format, so int8-activation prefills stay on it rather than dequantize + fp32 GEMM.
int32_t mk_panel_min_rows() { return static_cast<int32_t>(kPanelMinRows); }

void mk_matmul(const QMat* w, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy, int32_t q8) {
  matmul_any(*w, x, n, ldx, y, ldy, q8 != 0);
}

void mk_dequantize(const QMat* w, const int64_t* rows, int64_t n, float* out) { dequantize_rows(*w, rows, n, out); }

// One head attending `count` stored keys and values (`stride` bytes apart): probs = softmax(q . k *
// scale), out = probs . v. `one_at_a_time`: the loop over kv_dot / kv_axpy, the reference that the
// decode step's lane forms equal bit for bit.
void mk_attend(int32_t type, const float* q, const uint8_t* keys, const uint8_t* vals, int64_t stride, int32_t count,
               int32_t hd, float scale, float* probs, float* out, int32_t one_at_a_time) {
  std::memset(out, 0, sizeof(float) * hd);
  if (one_at_a_time) {
    for (int j = 0; j < count; ++j) probs[j] = kv_dot(type, q, keys + j * stride, hd) * scale;
    softmax(probs, count);
    for (int j = 0; j < count; ++j) kv_axpy(type, probs[j], vals + j * stride, hd, out);
  } else {
    attend_scores(type, q, keys, stride, count, hd, scale, probs);
    softmax(probs, count);
    attend_values(type, probs, vals, stride, count, hd, out);
  }
}

// Queries of a short chunk (a decode step's one per row, a memory's few) attending their row's
// slots 0..count-1 of one layer's stored keys and values, every head: the float model's attention
// read straight from the store's blocks (paged, or contiguous as one block per row), instead of
// gathering every row's blocks into one tensor per layer and step first. Each (query, head) is
// computed alone, in the same order whatever else the batch holds.
struct AttendArgs {
  const float* q;           // [queries, heads, hd], in the stored keys' basis (rotated when they are)
  float* out;               // [queries, heads, hd]
  float* probs;             // optional [queries, heads, width]: the weights, zeros past the count
  int32_t width;
  int32_t queries, heads, kv_heads, hd;
  const uint8_t* k;         // the layer's storage [blocks, kv_heads, block_size, stored head]
  const uint8_t* v;
  int64_t k_stride[3];      // bytes over block, head, slot-in-block
  int64_t v_stride[3];
  const int64_t* table;     // [rows, table_width] block ids
  int32_t table_width, block_size, kv_type;
  const int64_t* row;       // [queries] the row whose slots each query reads
  const int64_t* count;     // [queries] how many of them: slots 0..count-1
  float scale;
};

void mk_attend_store(const AttendArgs* args) {
  const AttendArgs& a = *args;
  const int H = a.heads, hd = a.hd, group = a.heads / a.kv_heads, bs = a.block_size;
  int64_t longest = 1;
  for (int i = 0; i < a.queries; ++i) longest = std::max(longest, a.count[i]);
  std::vector<float> scratch(a.probs ? 0 : static_cast<size_t>(std::min(a.queries * H, threads())) * longest);
  parallel(a.queries * H, [&](int task) {
    const int i = task / H, h = task % H, g = h / group, n = static_cast<int>(a.count[i]);
    const int64_t* blocks = a.table + a.row[i] * a.table_width;
    const float* q = a.q + static_cast<int64_t>(task) * hd;
    float* p = a.probs ? a.probs + static_cast<int64_t>(task) * a.width
                       : scratch.data() + static_cast<int64_t>(omp_get_thread_num()) * longest;
    for (int j0 = 0; j0 < n; j0 += bs)  // slot j lives in block blocks[j / bs] at offset j % bs
      attend_scores(a.kv_type, q, a.k + blocks[j0 / bs] * a.k_stride[0] + g * a.k_stride[1], a.k_stride[2],
                    std::min(bs, n - j0), hd, a.scale, p + j0);
    softmax(p, n);
    float* out = a.out + static_cast<int64_t>(task) * hd;
    std::memset(out, 0, sizeof(float) * hd);
    for (int j0 = 0; j0 < n; j0 += bs)
      attend_values(a.kv_type, p + j0, a.v + blocks[j0 / bs] * a.v_stride[0] + g * a.v_stride[1], a.v_stride[2],
                    std::min(bs, n - j0), hd, out);
    if (a.probs) std::fill(p + n, p + a.width, 0.0f);
  });
}

void* mk_model_new(const ModelDesc* desc) {
  auto* model = new Model();
  model->desc = *desc;
  model->layers.assign(desc->layer, desc->layer + desc->layers);
  model->desc.layer = nullptr;
  return model;
}

void mk_model_free(void* model) { delete static_cast<Model*>(model); }

void mk_decode(void* model, const DecodeArgs* args) { decode(*static_cast<Model*>(model), *args); }

}  // extern "C"
