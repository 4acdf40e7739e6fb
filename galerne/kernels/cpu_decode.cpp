// galerne's CPU decode step: every layer of a Mistral-family decoder for a batch
// of sequences that each add one token, in one call.
//
// Why one call: at batch 1 on a CPU the step is bound by reading the weights once
// (a GEMV per matrix), and everything else is small. Done op by op from Python,
// the small things (norms, rotary, the cache write, attention over a few hundred
// positions, silu) cost a few microseconds of dispatch each, which add up to a
// quarter of the step. Here they are loops inside one OpenMP region, with a
// barrier between stages.
//
// Layouts are the Python side's (galerne/engine/paged.py):
//   k_cache, v_cache: (layers, num_blocks, block_size, K, hd), the activations'
//            dtype (float32 or bf16, that of the norms)
//   weights: nn.Linear's (out, in), row-major, untouched (no repacking: LoRA
//            merges, exports and the torch path see the same tensors); each
//            matrix float32, bf16, or QuantLinear's uint8 blocks (q8_0, q4_0,
//            q4_k: see "quantized weights")
//   rotary: Mistral's interleaved pairs (HF checkpoints are permuted at load)
// Batched LoRA (MultiLoRALinear's slot stacks): each row of a step may carry an
// adapter slot; see lora_deltas.
// Activations stay float32 from the embedding to the logits; with bf16 weights
// the GEMV inputs are rounded to bf16 for the AVX512-BF16 dot products (as torch's
// bf16 matmul reads bf16 activations); quantized weights multiply them in float32,
// or, with int8_dot, rounded to int8 per block of 32 (see Q8x).
// The vector code is AVX512 (and AVX512-BF16), or AVX2 + FMA; portable loops
// elsewhere.
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

using bf16 = uint16_t;

inline float bf2f(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 f2bf(float f) {  // round to nearest even, NaN kept a NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16>(u >> 16);
}

template <typename T> inline float to_f(T v);
template <> inline float to_f<float>(float v) { return v; }
template <> inline float to_f<bf16>(bf16 v) { return bf2f(v); }
template <typename T> inline T from_f(float v);
template <> inline float from_f<float>(float v) { return v; }
template <> inline bf16 from_f<bf16>(float v) { return f2bf(v); }

// --------------------------------------------------------------- vector width
// The GEMVs of quantized weights are written once over `vec`: 16 floats with
// AVX512, 8 with AVX2 + FMA (most laptops and AMD servers before Zen 4), and
// plain loops (vectorised by the compiler, or not) elsewhere.
#if defined(__AVX512F__)
#define GALERNE_VW 16
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vset1(float v) { return _mm512_set1_ps(v); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
// a * b - c rounded twice, as torch computes it: the compiler contracts a separate
// multiply and subtract into one fused multiply-add (one rounding) unless the
// product goes through an opaque statement first.
inline vec vmul_sub(vec a, vec b, vec c) {
  vec p = _mm512_mul_ps(a, b);
  __asm__("" : "+v"(p));
  return _mm512_sub_ps(p, c);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define GALERNE_VW 8
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vset1(float v) { return _mm256_set1_ps(v); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline vec vmul_sub(vec a, vec b, vec c) {
  vec p = _mm256_mul_ps(a, b);
  __asm__("" : "+x"(p));
  return _mm256_sub_ps(p, c);
}
#endif

// Scalar a * b - c with two roundings (see vmul_sub).
inline float mul_sub(float a, float b, float c) {
  float p = a * b;
  __asm__("" : "+m"(p));
  return p - c;
}

// ---------------------------------------------------------- quantized weights
// A matrix is float32, bf16, or one of galerne.quant's block schemes, which are
// llama.cpp's blocks byte for byte (galerne/quant/formats.py), one row of blocks
// per output row:
//   q8_0: 34 bytes per 32 weights: fp16 d, 32 int8; w = d q
//   q4_0: 18 bytes per 32: fp16 d, 16 bytes of nibbles (weight j low nibble of
//         byte j, weight j + 16 its high nibble); w = d (q - 8)
//   q4_k: 144 bytes per 256: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
//         mins, 4 chunks of 32 bytes (chunk c: sub-block 2c in the low nibbles,
//         2c + 1 in the high ones); w = d sc q - dmin m
// Activations stay float32 (but see Q8x below): the GEMVs decode each weight to the float torch's
// dequantize gives (same operations, same roundings) and multiply it as the
// float32 GEMV does, so a quantized model's logits are those of "dequantize, then
// matmul" up to the order of the sums. Weights are decoded by units of 32 (a
// q8_0 / q4_0 block; 64 for q4_k, two sub-blocks) in registers, and each decoded
// vector serves the MB sequences of a tile. (Per-block sums of x, to take q4_0's
// offset of 8 or q4_k's mins out of the inner loop, are not needed: the lookup
// table of a unit holds its 16 weights, offset or min included.)
enum Kind : int { F32 = 0, BF16 = 1, Q8_0 = 2, Q4_0 = 3, Q4_K = 4 };

constexpr int64_t kBlock[] = {1, 1, 32, 32, 256};       // weights per block
constexpr int64_t kBlockBytes[] = {4, 2, 34, 18, 144};  // bytes per block

inline int64_t row_bytes(Kind k, int64_t n) { return n / kBlock[k] * kBlockBytes[k]; }

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline float h2f(uint16_t h) {  // IEEE half to float, exactly
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (e == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (e == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      e = 113;
      while (!(man & 0x400u)) man <<= 1, --e;
      u = sign | (e << 23) | ((man & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((e + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Every half's float, looked up (256 KB): a block's scale read this way costs two
// loads (its bits, then a broadcast straight from the table) and no vector
// instruction, where a conversion in registers takes three, on the shuffle port
// that the nibble lookups (vpermps) and widenings (vpmovzx) already saturate.
// (llama.cpp's ggml_table_f32_f16, for the same reason.) Only the scales that
// occur are touched: a few KB of it stay in L2.
float kHalf[65536];
const bool kHalfReady = [] {
  for (uint32_t h = 0; h < 65536; ++h) kHalf[h] = h2f(static_cast<uint16_t>(h));
  return true;
}();

inline float half_at(const uint8_t* p) { return kHalf[load_u16(p)]; }

// A q4_k super-block's 8 sub-block scales and mins, multiplied by d and dmin
// (llama.cpp's get_scale_min_k4). The 6-bit fields are unpacked 4 at a time in
// 32-bit words (llama.cpp's kmask trick): byte by byte, the unpacking cost more
// scalar instructions than the super-block's 256 weights cost vector ones, on
// the same ports.
// The 6-bit fields as 16 bytes: the 8 scales, then the 8 mins.
inline void q4_k_scale_bytes(const uint8_t* blk, uint32_t u[4]) {
  std::memcpy(u, blk + 4, 12);
  constexpr uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
  u[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4);  // mins 4-7
  const uint32_t m03 = u[1] & low6;
  u[1] = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);  // scales 4-7
  u[2] = m03;
  u[0] &= low6;  // scales 0-3
}

inline void q4_k_scales(const uint8_t* blk, float ds[8], float dm[8]) {
  const float d = half_at(blk), dmin = half_at(blk + 2);
  uint32_t u[4];  // -> bytes: 8 scales, then 8 mins
  q4_k_scale_bytes(blk, u);
#if defined(__AVX2__)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
  _mm256_storeu_ps(ds, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))));
  _mm256_storeu_ps(dm, _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)))));
#else
  uint8_t b[16];
  std::memcpy(b, u, 16);
  for (int j = 0; j < 8; ++j) ds[j] = d * static_cast<float>(b[j]), dm[j] = dmin * static_cast<float>(b[8 + j]);
#endif
}

// One block's weights into out (32, or 256 for q4_k), in plain C++.
template <Kind K>
inline void block_scalar(const uint8_t* b, float* out) {
  if constexpr (K == Q8_0) {
    const float d = half_at(b);
    for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(static_cast<int8_t>(b[2 + i]));
  } else if constexpr (K == Q4_0) {
    const float d = half_at(b);
    for (int i = 0; i < 16; ++i) {
      out[i] = d * static_cast<float>((b[2 + i] & 0xF) - 8);
      out[i + 16] = d * static_cast<float>((b[2 + i] >> 4) - 8);
    }
  } else {
    float ds[8], dm[8], lo[16], hi[16];
    q4_k_scales(b, ds, dm);
    for (int c = 0; c < 4; ++c) {
      for (int k = 0; k < 16; ++k)
        lo[k] = mul_sub(ds[2 * c], static_cast<float>(k), dm[2 * c]),
        hi[k] = mul_sub(ds[2 * c + 1], static_cast<float>(k), dm[2 * c + 1]);
      const uint8_t* q = b + 16 + 32 * c;
      for (int i = 0; i < 32; ++i) out[64 * c + i] = lo[q[i] & 0xF], out[64 * c + 32 + i] = hi[q[i] >> 4];
    }
  }
}

#if defined(GALERNE_VW)
// Unit decoders: begin() at unit u of a block (ds, dm: the block's q4_k scales and
// mins), then piece(p) gives the unit's weights p * VW .. p * VW + VW - 1 as
// floats. A unit is 32 weights; 64 for q4_k: a chunk of 32 bytes, whose low
// nibbles are one sub-block and high nibbles the next, widened once for both.
template <Kind K>
struct Unit;
template <Kind K> constexpr int kUnit = K == Q4_K ? 64 : 32;

#if GALERNE_VW == 16
// With AVX512 a nibble becomes its weight in one instruction: vpermps looks up a
// 16-entry table (it reads the low 4 bits of each index), and the table holds the
// unit's 16 possible weights, scale and offset (or min) folded in.
inline __m512i bytes16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

template <>
struct Unit<Q8_0> {
  __m512 d;
  const uint8_t* q;
  void begin(const uint8_t* blk, int, const float*, const float*) { d = vset1(half_at(blk)), q = blk + 2; }
  vec piece(int p) const {
    return vmul(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * p)))));
  }
};

template <>
struct Unit<Q4_0> {
  __m512 tab;
  __m512i idx;
  void begin(const uint8_t* blk, int, const float*, const float*) {
    const __m512 k8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    tab = vmul(vset1(half_at(blk)), k8);  // d (k - 8), as torch's d * (q - 8)
    idx = bytes16(blk + 2);
  }
  vec piece(int p) const { return _mm512_permutexvar_ps(p ? _mm512_srli_epi32(idx, 4) : idx, tab); }
};

template <>
struct Unit<Q4_K> {
  __m512 lo, hi;  // the two sub-blocks' tables
  __m512i i0, i1;  // bytes 0-15 and 16-31 of the chunk, widened
  void begin(const uint8_t* blk, int u, const float* ds, const float* dm) {
    const __m512 k = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    lo = vmul_sub(vset1(ds[2 * u]), k, vset1(dm[2 * u]));  // as torch's (d sc) q - dmin m
    hi = vmul_sub(vset1(ds[2 * u + 1]), k, vset1(dm[2 * u + 1]));
    i0 = bytes16(blk + 16 + 32 * u), i1 = bytes16(blk + 32 + 32 * u);
  }
  vec piece(int p) const {
    const __m512i i = p & 1 ? i1 : i0;
    return p < 2 ? _mm512_permutexvar_ps(i, lo) : _mm512_permutexvar_ps(_mm512_srli_epi32(i, 4), hi);
  }
};
#else  // AVX2: 8 weights a piece, through integers
inline __m256i bytes8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

template <>
struct Unit<Q8_0> {
  __m256 d;
  const uint8_t* q;
  void begin(const uint8_t* blk, int, const float*, const float*) { d = vset1(half_at(blk)), q = blk + 2; }
  vec piece(int p) const {
    return vmul(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * p)))));
  }
};

template <>
struct Unit<Q4_0> {
  __m256 d;
  const uint8_t* q;
  void begin(const uint8_t* blk, int, const float*, const float*) { d = vset1(half_at(blk)), q = blk + 2; }
  vec piece(int p) const {  // pieces 0, 1: low nibbles of bytes 0-7, 8-15; 2, 3: their high nibbles
    const __m256i b = bytes8(q + 8 * (p & 1));
    const __m256i n = p < 2 ? _mm256_and_si256(b, _mm256_set1_epi32(0xF)) : _mm256_srli_epi32(b, 4);
    return vmul(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(n, _mm256_set1_epi32(8))));
  }
};

template <>
struct Unit<Q4_K> {
  __m256 s0, m0, s1, m1;  // the two sub-blocks' scales and mins
  const uint8_t* q;
  void begin(const uint8_t* blk, int u, const float* ds, const float* dm) {
    s0 = vset1(ds[2 * u]), m0 = vset1(dm[2 * u]), s1 = vset1(ds[2 * u + 1]), m1 = vset1(dm[2 * u + 1]);
    q = blk + 16 + 32 * u;
  }
  vec piece(int p) const {  // pieces 0-3: low nibbles of bytes 0-31; 4-7: their high nibbles
    const __m256i b = bytes8(q + 8 * (p & 3));
    if (p < 4) return vmul_sub(s0, _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xF))), m0);
    return vmul_sub(s1, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), m1);
  }
};
#endif
#endif  // GALERNE_VW

// A row of n weights of kind k into out, as torch's dequantize gives them.
inline void dequant_row(Kind k, const uint8_t* src, int64_t n, float* out) {
  if (k == F32) {
    std::memcpy(out, src, n * sizeof(float));
    return;
  }
  if (k == BF16) {
    const bf16* s = reinterpret_cast<const bf16*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = bf2f(s[i]);
    return;
  }
  auto run = [&](auto kind) {
    constexpr Kind K = decltype(kind)::value;
    for (int64_t b = 0; b < n / kBlock[K]; ++b) {
      const uint8_t* blk = src + b * kBlockBytes[K];
      float* o = out + b * kBlock[K];
#if defined(GALERNE_VW)
      float ds[8] = {}, dm[8] = {};
      if constexpr (K == Q4_K) q4_k_scales(blk, ds, dm);
      for (int u = 0; u < kBlock[K] / kUnit<K>; ++u) {
        Unit<K> dec;
        dec.begin(blk, u, ds, dm);
        for (int p = 0; p < kUnit<K> / GALERNE_VW; ++p) vstore(o + kUnit<K> * u + GALERNE_VW * p, dec.piece(p));
      }
#else
      block_scalar<K>(blk, o);
#endif
    }
  };
  if (k == Q8_0) run(std::integral_constant<Kind, Q8_0>{});
  else if (k == Q4_0) run(std::integral_constant<Kind, Q4_0>{});
  else run(std::integral_constant<Kind, Q4_K>{});
}

// ---------------------------------------------------------------- dot products
// tile<R, MB>: R weight rows (stride ld) against MB input vectors (stride ldx) of
// length n; out[mb * R + r]. xf holds the float32 inputs, xb their bf16 copies
// (read by the AVX512-BF16 path). Each weight vector loaded is used MB times from
// a register, and the R rows are R independent streams from memory, which a GEMV
// needs to reach the machine's bandwidth. The vector loops take what a register
// holds, the portable loops (vectorised by the compiler) the rest, or all of it
// on CPUs without AVX512. pf, where not null, is prefetched row by row as w is
// read: the rows PREFETCH_GROUPS groups ahead. A bf16 row is short (1.5 KB at
// dim 768), too short for the hardware prefetcher to ramp up before the next
// group starts: prefetching them took bf16 from 22 to 30 GB/s on 2 cores. Dense
// rows are prefetched into L2 (_MM_HINT_T1): a float32 step on cpu-125m went from
// 15.2 to 13.7 ms in 4 KB pages, 14.5 to 13.4 in 2 MB pages (2-core Xeon; into L1:
// 14.4 / 14.1 ms; the non-temporal hint: 37 ms). Quantized rows stay with L1: into
// L2 their steps were 4-10% slower.

template <int R, int MB>
inline void tile(const float* w, int64_t ld, const float* xf, const bf16*, int64_t ldx, int64_t n, float* out,
                 const float* pf) {
  int64_t i0 = 0;
#if defined(GALERNE_VW)
  vec a[MB][R];
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) a[mb][r] = vzero();
  for (; i0 + GALERNE_VW <= n; i0 += GALERNE_VW) {
    vec wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (pf && (i0 & 15) == 0) __builtin_prefetch(pf + r * ld + i0, 0, 2);  // a line (AVX2: every other vector)
      wv[r] = vload(w + r * ld + i0);
    }
#pragma GCC unroll 4
    for (int mb = 0; mb < MB; ++mb) {
      const vec x = vload(xf + mb * ldx + i0);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[mb][r] = vfma(wv[r], x, a[mb][r]);
    }
  }
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) out[mb * R + r] = vsum(a[mb][r]);
#else
  for (int k = 0; k < MB * R; ++k) out[k] = 0;
#endif
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) {
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = i0; i < n; ++i) s += w[r * ld + i] * xf[mb * ldx + i];
      out[mb * R + r] += s;
    }
}

template <int R, int MB>
inline void tile(const bf16* w, int64_t ld, const float* xf, const bf16* xb, int64_t ldx, int64_t n, float* out,
                 const bf16* pf) {
  int64_t i0 = 0;
#if defined(__AVX512BF16__)
  (void)xf;
  __m512 a[MB][R];
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) a[mb][r] = _mm512_setzero_ps();
  for (; i0 + 32 <= n; i0 += 32) {
    __m512bh wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (pf) __builtin_prefetch(pf + r * ld + i0, 0, 2);
      wv[r] = (__m512bh)_mm512_loadu_si512(w + r * ld + i0);
    }
#pragma GCC unroll 4
    for (int mb = 0; mb < MB; ++mb) {
      const __m512bh x = (__m512bh)_mm512_loadu_si512(xb + mb * ldx + i0);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[mb][r] = _mm512_dpbf16_ps(a[mb][r], wv[r], x);
    }
  }
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) {
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = i0; i < n; ++i) s += bf2f(w[r * ld + i]) * bf2f(xb[mb * ldx + i]);
      out[mb * R + r] = _mm512_reduce_add_ps(a[mb][r]) + s;
    }
#else
  (void)xb;
#if defined(GALERNE_VW) && GALERNE_VW == 8
  // AVX2: widening bf16 is a shift into the high half of each 32-bit lane.
  __m256 a[MB][R];
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) a[mb][r] = _mm256_setzero_ps();
  for (; i0 + 8 <= n; i0 += 8) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (pf && (i0 & 31) == 0) __builtin_prefetch(pf + r * ld + i0);
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ld + i0));
      wv[r] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
#pragma GCC unroll 4
    for (int mb = 0; mb < MB; ++mb) {
      const __m256 x = _mm256_loadu_ps(xf + mb * ldx + i0);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[mb][r] = _mm256_fmadd_ps(wv[r], x, a[mb][r]);
    }
  }
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) out[mb * R + r] = vsum(a[mb][r]);
#else
  (void)pf;
  for (int k = 0; k < MB * R; ++k) out[k] = 0;
#endif
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) {  // widening bf16 is a shift: this vectorises
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = i0; i < n; ++i) s += bf2f(w[r * ld + i]) * xf[mb * ldx + i];
      out[mb * R + r] += s;
    }
#endif
}

// Quantized rows (ld bytes apart) against float32 inputs: n is a multiple of the
// block (the Decoder checks). Per unit of 32 weights, the R rows' weights are
// decoded once and each piece serves the MB sequences from a register. pf: as the
// bf16 tile's, one prefetch per block and row (a few per cache line: cheaper than
// a test of whether the block starts a new line).
template <int R, int MB, Kind K>
inline void qtile(const uint8_t* w, int64_t ld, const float* x, int64_t ldx, int64_t n, float* out,
                  const uint8_t* pf) {
  constexpr int64_t BLOCK = kBlock[K], BYTES = kBlockBytes[K];
#if defined(GALERNE_VW)
  constexpr int UNIT = kUnit<K>, UNITS = BLOCK / UNIT, PIECES = UNIT / GALERNE_VW;
  vec a[MB][R];
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) a[mb][r] = vzero();
  for (int64_t b = 0; b < n / BLOCK; ++b) {
    float ds[R][8], dm[R][8];  // q4_k: the block's scales and mins
    for (int r = 0; r < R; ++r) {
      if (pf)
        for (int64_t o = 0; o < BYTES; o += 64) __builtin_prefetch(pf + r * ld + b * BYTES + o);
      if constexpr (K == Q4_K) q4_k_scales(w + r * ld + b * BYTES, ds[r], dm[r]);
    }
#pragma GCC unroll 8
    for (int u = 0; u < UNITS; ++u) {
      Unit<K> dec[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        dec[r].begin(w + r * ld + b * BYTES, u, ds[r], dm[r]);
#pragma GCC unroll 4
      for (int p = 0; p < PIECES; ++p) {
        vec wv[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) wv[r] = dec[r].piece(p);
        const float* xp = x + b * BLOCK + UNIT * u + GALERNE_VW * p;
#pragma GCC unroll 4
        for (int mb = 0; mb < MB; ++mb) {
          const vec xv = vload(xp + mb * ldx);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) a[mb][r] = vfma(wv[r], xv, a[mb][r]);
        }
      }
    }
  }
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) out[mb * R + r] = vsum(a[mb][r]);
#else
  (void)pf;
  float wf[BLOCK];
  for (int k = 0; k < MB * R; ++k) out[k] = 0;
  for (int r = 0; r < R; ++r)
    for (int64_t b = 0; b < n / BLOCK; ++b) {
      block_scalar<K>(w + r * ld + b * BYTES, wf);
      for (int mb = 0; mb < MB; ++mb) {
        const float* xp = x + mb * ldx + b * BLOCK;
        float s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < BLOCK; ++i) s += wf[i] * xp[i];
        out[mb * R + r] += s;
      }
    }
#endif
}

// Attention's small vectors: q . k over one head, and o += p v.
template <typename W>
inline float dot(const float* q, const W* k, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += q[i] * to_f(k[i]);
  return s;
}

template <typename W>
inline void axpy(float p, const W* v, float* o, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] += p * to_f(v[i]);
}

// Attention reads a head's rows block by block, a slot apart (1 KB at 4 kv heads
// x 64 floats): too sparse for the hardware prefetcher, and cold, since the
// weights streamed through after this layer last ran. While it scores a block,
// it asks for the next block's keys and this block's values (read after the
// softmax): half the attention's time on cpu-125m at 256 positions.
template <typename W>
inline void prefetch_block(const W* first, int64_t rows, int64_t stride, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(W)); b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(first + r * stride) + b);
}

// Softmax of a row in place. Scalar exp was a third of the attention's time;
// with AVX512 the exponentials go 16 at a time: exp(x) = 2^k e^f, k = round(x
// log2 e), |f| <= ln2/2, e^f by its Taylor series to degree 7 (relative error
// below 2e-8, under float32's own rounding).
inline void softmax(float* row, int64_t n) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, row[j]);
  float denom = 0;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vmx = _mm512_set1_ps(mx), lo = _mm512_set1_ps(-87.0f), log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(row + j), vmx), lo);
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(k, ln2_lo, _mm512_fnmadd_ps(k, ln2_hi, x));
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512 e = _mm512_scalef_ps(p, k);
    _mm512_storeu_ps(row + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  denom = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
  // The same in 8 lanes; 2^k built in the exponent bits (x >= -87: k >= -126, a
  // normal float), AVX2 having no scalef.
  const __m256 vmx = _mm256_set1_ps(mx), lo = _mm256_set1_ps(-87.0f), log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    __m256 x = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(row + j), vmx), lo);
    __m256 k = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(k, ln2_lo, _mm256_fnmadd_ps(k, ln2_hi, x));
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(two_k));
    _mm256_storeu_ps(row + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  denom = vsum(acc);
#endif
  for (; j < n; ++j) denom += (row[j] = std::exp(row[j] - mx));
  const float inv = 1.0f / denom;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) row[i] *= inv;
}

// ----------------------------------------------------------------------- GEMV
// y[m, col0 + r] (+)= sum_i W[r, i] x[m, i] for the rows of several matrices that
// share one input (q/k/v, or gate/up), their outputs side by side in y. Work is
// split in groups of R rows across the threads of the enclosing region; within a
// group, the batch goes by tiles of up to MB sequences.

constexpr int MB = 4;

// A matrix of the step: w, rows of ld bytes in its kind.
struct Weight {
  const uint8_t* w = nullptr;
  Kind kind = F32;
  int64_t ld = 0;
};

struct Mat {
  Weight wt;
  int64_t rows;
  int64_t col0;  // first output column in y
};

constexpr int64_t PREFETCH_GROUPS = 2;

// ------------------------------------------ int8 activations for block weights
// llama.cpp's way for q8_0, q4_0 and q4_k, when the Decoder (or linear) asks for it
// (int8_dot): the input of a GEMV is rounded to int8 per block of 32 inputs (256
// for q4_k; x ~ dx q, dx = max |x| / 127, q = round(x / dx), ties to even), and
// each block's dot product is an integer one, unsigned nibbles times signed q: 64
// products per AVX512-VNNI vpdpbusd, 32 per AVX2 vpmaddubsw. That is about half
// the instructions of decoding every weight to float, for the rounding of the
// activations (half a step, 0.4% of a block's largest value, per input);
// benchmarks/quality.py measures what it does to perplexity. The offsets come out
// of the integer sums: q4_0's w = d (k - 8) gives d dx (sum k q - 8 sum q), the
// 8 sum q folded into the vpdpbusd accumulator's start; q4_k's w = d sc k - dmin m
// gives, with one dx a super-block, d dx sum_j sc_j sum k q - dmin dx sum_j m_j
// sum q over its sub-blocks j. q8_0's signed weights: see qtile8_rows.
struct Q8x {
  // q8_0 and q4_0: one scale per block of 32 inputs.
  int8_t* q;      // (M, n): the rounded inputs
  int32_t* corr;  // (M, n / 4): per 4 inputs (one 32-bit lane of products), -sum q over their block
  float* dxe;     // (M, n / 4): per 4 inputs, their block's dx
  // q4_k: one scale per super-block of 256 (llama.cpp's q8_K), so that the 6-bit
  // sub-block scales multiply integer sums (vpdpwssd), one float multiply a super-block.
  int8_t* qk;     // (M, n)
  float* dk;      // (M, n / 256)
  int32_t* bk;    // (M, n / 32): sum of qk over each sub-block of 32 (for the mins)
};

// Room for the rounded inputs of `size` values (M rows of the widest input).
struct Q8Buffers {
  std::vector<int8_t> q, qk;
  std::vector<int32_t> corr, bk;
  std::vector<float> dxe, dk;
  Q8x x;
  explicit Q8Buffers(int64_t size)
      : q(size), qk(size), corr(size / 4), bk(size / 32), dxe(size / 4), dk(size / 256 + 1),
        x{q.data(), corr.data(), dxe.data(), qk.data(), dk.data(), bk.data()} {}
};

// x[0 .. 32 k) rounded with one scale per `block` inputs (32 or 256) into q; d[j]
// the j-th block's scale, sums[i] the sum of q over the i-th run of 32.
inline void round_blocks(const float* x, int64_t n, int64_t block, int8_t* q, float* d, int32_t* sums) {
  for (int64_t b = 0; b < n / block; ++b) {
    const float* xb = x + block * b;
    float amax = 0;
#pragma omp simd reduction(max : amax)
    for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float db = amax / 127.0f, id = db > 0 && std::isfinite(db) ? 1.0f / db : 0.0f;
    d[b] = db;
    for (int64_t k = 0; k < block / 32; ++k) {
      int32_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int i = 0; i < 32; ++i) {
        const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(xb[32 * k + i] * id)));
        q[block * b + 32 * k + i] = static_cast<int8_t>(v);
        s += static_cast<int32_t>(v);
      }
      sums[block / 32 * b + k] = s;
    }
  }
}

// Inside a parallel region: the M rows of x (n apart) rounded into buf as the
// block matrices among mats read them, when int8; otherwise nothing (nullptr: the
// float path).
inline const Q8x* quantize_for(const std::vector<Mat>& mats, bool int8, int64_t M, const float* x, int64_t n,
                               const Q8x& buf) {
  bool by32 = false, by256 = false;
  for (const Mat& m : mats) by32 = by32 || m.wt.kind == Q8_0 || m.wt.kind == Q4_0, by256 = by256 || m.wt.kind == Q4_K;
  if (!int8 || !(by32 || by256)) return nullptr;
#pragma omp for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    if (by32) {
      int32_t* corr = buf.corr + m * n / 4;
      float* dxe = buf.dxe + m * n / 4;
      round_blocks(x + m * n, n, 32, buf.q + m * n, dxe, corr);  // d and sums at each block's first entry
      for (int64_t b = n / 32 - 1; b >= 0; --b) {  // then spread over the block's 8 lanes (in place: backwards)
        const float d = dxe[b];
        const int32_t s = corr[b];
        for (int j = 7; j >= 0; --j) corr[8 * b + j] = -s, dxe[8 * b + j] = d;
      }
    }
    if (by256) round_blocks(x + m * n, n, 256, buf.qk + m * n, buf.dk + m * n / 256, buf.bk + m * n / 32);
  }
  return &buf;
}

#if GALERNE_VW == 16 && defined(__AVX512BW__)
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, u, s);
#else  // two products summed into int16 (15 x 127 x 2 < 32767), then pairs into int32
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

// acc + a.lo16 b.lo16 + a.hi16 b.hi16 in each 32-bit lane.
inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
#endif

// R quantized rows (ld bytes apart) against the rounded inputs m0 .. m0 + MB - 1 of
// x: out[mb * R + r]. AVX512 takes 64 weights a step (two q4_0 blocks, or a q4_k
// chunk: two sub-blocks), lanes 0-7 of the products one block and 8-15 the other.
template <int R, int MB, Kind K>
inline void qtile8_rows(const uint8_t* w, int64_t ld, const Q8x& x, int64_t m0, int64_t n, float* out, int ldo,
                        const uint8_t* pf) {
  static_assert(K == Q8_0 || K == Q4_0 || K == Q4_K, "int8 activations serve the block schemes");
  constexpr int64_t BLOCK = kBlock[K], BYTES = kBlockBytes[K];
  const int64_t nb = n / BLOCK, ld4 = n / 4, ld32 = n / 32;
  const int8_t* xq = x.q + m0 * n;
  const int32_t* xc = x.corr + m0 * ld4;
  const float* xd = x.dxe + m0 * ld4;
  const int8_t* kq = x.qk + m0 * n;  // q4_k's inputs
  const float* kd = x.dk + m0 * (n / 256);
  const int32_t* kb = x.bk + m0 * ld32;
#if GALERNE_VW == 16 && defined(__AVX512BW__)
  __m512 a[MB][R];
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) a[mb][r] = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  if constexpr (K == Q8_0 || K == Q4_0) {
    // Two blocks A, B of 32 a step, A's weights in bytes 0-31 of the vector, B's in
    // 32-63. A row's odd last block goes alone, lanes 8-15 zero.
    //   q4_0: [A, A, B, B] (16 bytes of nibbles each), the second and fourth shifted;
    //         the offset of 8 is the accumulator's start (corr: -sum q a lane).
    //   q8_0: signed weights times signed inputs. vpdpbusd takes the inputs as
    //         unsigned q + 128 (a flipped sign bit) and the weights as they are, which
    //         adds 128 sum w to each lane: the accumulator starts at -128 sum w, one
    //         vpdpbusd of the weights by 128s. (q8_0 weights are -127 .. 127, as
    //         llama.cpp's quantizer and galerne's write them.)
    [[maybe_unused]] constexpr __mmask32 high = 0xFF00FF00u;
    [[maybe_unused]] const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
    const uint8_t* pfr = pf ? pf : w;  // (without one, a redundant prefetch: no branch in the loop)
    auto step = [&](int64_t b, __mmask64 k64, __mmask16 k16, bool two) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const uint8_t* blk = w + r * ld + b * BYTES;
        __builtin_prefetch(pfr + r * ld + b * BYTES);
        if constexpr (K == Q8_0) __builtin_prefetch(pfr + r * ld + b * BYTES + 63);  // two blocks: 68 bytes
        __m512i v;
        if constexpr (K == Q4_0) {
          const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
          const __m256i hi = two ? _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + BYTES + 2)))
                                 : _mm256_setzero_si256();
          v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
          v = _mm512_and_si512(_mm512_mask_srli_epi16(v, high, v, 4), m4);
        } else {
          const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
          const __m256i hi = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + BYTES + 2)) : _mm256_setzero_si256();
          v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        }
        const __m512 dw = _mm512_insertf32x8(_mm512_set1_ps(half_at(blk)), _mm256_set1_ps(two ? half_at(blk + BYTES) : 0.0f), 1);
#if defined(__AVX512VNNI__)
        [[maybe_unused]] const __m512i corr8 = _mm512_sub_epi32(_mm512_setzero_si512(), dpbusd(_mm512_setzero_si512(), bias, v));
#else  // vpmaddubsw's int16 pairs would overflow on (q + 128) w: |w| times q with w's sign
        [[maybe_unused]] const __m512i av = _mm512_abs_epi8(v);
        [[maybe_unused]] const __mmask64 neg = _mm512_movepi8_mask(v);
#endif
#pragma GCC unroll 4
        for (int mb = 0; mb < MB; ++mb) {  // the inputs from L1 (in registers they would spill)
          const __m512i qx = _mm512_maskz_loadu_epi8(k64, xq + mb * n + 32 * b);
          const __m512 dx = _mm512_maskz_loadu_ps(k16, xd + mb * ld4 + 8 * b);
          __m512i isum;
          if constexpr (K == Q4_0) {
            isum = dpbusd(_mm512_maskz_loadu_epi32(k16, xc + mb * ld4 + 8 * b), v, qx);
          } else {
#if defined(__AVX512VNNI__)
            isum = dpbusd(corr8, _mm512_xor_si512(qx, bias), v);
#else
            isum = dpbusd(_mm512_setzero_si512(), av, _mm512_mask_sub_epi8(qx, neg, _mm512_setzero_si512(), qx));
#endif
          }
          a[mb][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, dx), a[mb][r]);
        }
      }
    };
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) step(b, ~0ull, 0xFFFF, true);
    if (b < nb) step(b, 0xFFFFFFFFull, 0x00FF, false);
  } else {
    // A super-block: per chunk c (sub-blocks 2c and 2c + 1 in lanes 0-7 and 8-15),
    // vpdpbusd's sums of nibbles times inputs, times the sub-blocks' 6-bit scales by
    // vpdpwssd (each sum fits 16 bits: 4 x 15 x 127), into one integer sum; the mins
    // times the inputs' sub-block sums likewise; then d dk and dmin dk, in float.
    constexpr __mmask32 high = 0xFFFF0000u;  // [chunk, chunk >> 4]: sub-block 2c, then 2c + 1
    __m512i idx[4];
    for (int c = 0; c < 4; ++c)
      idx[c] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(2 * c)), _mm256_set1_epi32(2 * c + 1), 1);
    const uint8_t* pfr = pf ? pf : w;
    for (int64_t b = 0; b < nb; ++b) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const uint8_t* blk = w + r * ld + b * BYTES;
        for (int64_t o = 0; o < BYTES; o += 64) __builtin_prefetch(pfr + r * ld + b * BYTES + o);
        uint32_t u[4];
        q4_k_scale_bytes(blk, u);
        const __m512i sm = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)));  // scales, mins
        const __m512i mn = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u + 2)));  // mins, 0s
        __m512i v[4], sc[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          v[c] = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * c)));
          v[c] = _mm512_and_si512(_mm512_mask_srli_epi16(v[c], high, v[c], 4), m4);
          sc[c] = _mm512_permutexvar_epi32(idx[c], sm);
        }
        const float d = half_at(blk), dmin = half_at(blk + 2);
#pragma GCC unroll 4
        for (int mb = 0; mb < MB; ++mb) {
          const int8_t* q = kq + mb * n + BLOCK * b;
          __m512i acc = _mm512_setzero_si512();
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c)
            acc = dpwssd(acc, dpbusd(_mm512_setzero_si512(), v[c], _mm512_loadu_si512(q + 64 * c)), sc[c]);
          // lanes 0-7: the mins times the sub-blocks' sums of inputs (each fits 16 bits)
          const __m512i bs = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + mb * ld32 + 8 * b)));
          const __m512i mins = dpwssd(_mm512_setzero_si512(), mn, bs);
          const float dx = kd[mb * (n / 256) + b];
          a[mb][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(d * dx), a[mb][r]);
          a[mb][r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mins), _mm512_set1_ps(dmin * dx), a[mb][r]);
        }
      }
    }
  }
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) out[mb * ldo + r] = _mm512_reduce_add_ps(a[mb][r]);
#elif GALERNE_VW == 8
  __m256 a[MB][R];
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) a[mb][r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  auto dot = [&](__m256i u, __m256i s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones); };
  if constexpr (K == Q8_0) {
    // Signed by signed through vpmaddubsw: |w| times q with w's sign (llama.cpp's way).
    for (int64_t b = 0; b < nb; ++b) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const uint8_t* blk = w + r * ld + b * BYTES;
        if (pf) __builtin_prefetch(pf + r * ld + b * BYTES);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        const __m256i av = _mm256_sign_epi8(v, v);
        const __m256 dw = _mm256_set1_ps(half_at(blk));
#pragma GCC unroll 4
        for (int mb = 0; mb < MB; ++mb) {
          const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + mb * n + 32 * b));
          const __m256 dx = _mm256_loadu_ps(xd + mb * ld4 + 8 * b);
          a[mb][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot(av, _mm256_sign_epi8(qx, v))), _mm256_mul_ps(dw, dx), a[mb][r]);
        }
      }
    }
  } else if constexpr (K == Q4_0) {
    for (int64_t b = 0; b < nb; ++b) {
      __m256i qx[MB], cr[MB];
      __m256 dx[MB];
#pragma GCC unroll 4
      for (int mb = 0; mb < MB; ++mb) {
        qx[mb] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + mb * n + 32 * b));
        cr[mb] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + mb * ld4 + 8 * b));
        dx[mb] = _mm256_loadu_ps(xd + mb * ld4 + 8 * b);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const uint8_t* blk = w + r * ld + b * BYTES;
        if (pf) __builtin_prefetch(pf + r * ld + b * BYTES);
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
        const __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(h, 4), h), m4);
        const __m256 dw = _mm256_set1_ps(half_at(blk));
#pragma GCC unroll 4
        for (int mb = 0; mb < MB; ++mb)
          a[mb][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(dot(v, qx[mb]), cr[mb])), _mm256_mul_ps(dw, dx[mb]),
                                     a[mb][r]);
      }
    }
  } else {
    // As AVX512's: vpmaddubsw's pairs (3810 at most) times the sub-block's scale in
    // both 16-bit halves of a lane (vpmaddwd), summed in integers over the super-block.
    for (int64_t b = 0; b < nb; ++b) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const uint8_t* blk = w + r * ld + b * BYTES;
        if (pf)
          for (int64_t o = 0; o < BYTES; o += 64) __builtin_prefetch(pf + r * ld + b * BYTES + o);
        uint32_t u[4];
        q4_k_scale_bytes(blk, u);
        uint8_t sb[16];
        std::memcpy(sb, u, 16);
        const __m256i mn = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sb + 8)));
        const float d = half_at(blk), dmin = half_at(blk + 2);
#pragma GCC unroll 4
        for (int mb = 0; mb < MB; ++mb) {
          const int8_t* q = kq + mb * n + BLOCK * b;
          __m256i acc = _mm256_setzero_si256();
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * c));
            const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            const __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * c)));
            const __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * c + 32)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p0, _mm256_set1_epi16(static_cast<int16_t>(sb[2 * c]))));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p1, _mm256_set1_epi16(static_cast<int16_t>(sb[2 * c + 1]))));
          }
          const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + mb * ld32 + 8 * b));
          const __m256i mins = _mm256_madd_epi16(mn, bs);  // the mins' upper halves are 0
          const float dx = kd[mb * (n / 256) + b];
          a[mb][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(d * dx), a[mb][r]);
          a[mb][r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(dmin * dx), a[mb][r]);
        }
      }
    }
  }
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) out[mb * ldo + r] = vsum(a[mb][r]);
#else  // portable: the same integer sums, one block at a time
  (void)pf;
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) {
      const int8_t* q = xq + mb * n;
      float s = 0;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = w + r * ld + b * BYTES;
        if constexpr (K == Q8_0) {
          int32_t acc = 0;
          for (int i = 0; i < 32; ++i) acc += static_cast<int8_t>(blk[2 + i]) * q[32 * b + i];
          s += half_at(blk) * xd[mb * ld4 + 8 * b] * static_cast<float>(acc);
        } else if constexpr (K == Q4_0) {
          int32_t acc = 8 * xc[mb * ld4 + 8 * b];
          for (int i = 0; i < 16; ++i) acc += (blk[2 + i] & 0xF) * q[32 * b + i] + (blk[2 + i] >> 4) * q[32 * b + 16 + i];
          s += half_at(blk) * xd[mb * ld4 + 8 * b] * static_cast<float>(acc);
        } else {
          uint32_t u[4];
          q4_k_scale_bytes(blk, u);
          uint8_t sb[16];
          std::memcpy(sb, u, 16);
          const int8_t* qk = kq + mb * n + BLOCK * b;
          int32_t acc = 0, mins = 0;
          for (int c = 0; c < 4; ++c) {
            int32_t lo = 0, hi = 0;
            for (int i = 0; i < 32; ++i)
              lo += (blk[16 + 32 * c + i] & 0xF) * qk[64 * c + i], hi += (blk[16 + 32 * c + i] >> 4) * qk[64 * c + 32 + i];
            acc += sb[2 * c] * lo + sb[2 * c + 1] * hi;
          }
          for (int j = 0; j < 8; ++j) mins += sb[8 + j] * kb[mb * ld32 + 8 * b + j];
          const float dx = kd[mb * (n / 256) + b];
          s += half_at(blk) * dx * static_cast<float>(acc) - half_at(blk + 2) * dx * static_cast<float>(mins);
        }
      }
      out[mb * ldo + r] = s;
    }
#endif
}

// A q4_0 tile of more than 2 sequences goes as two (4 rows x 4 sequences of
// accumulators, the inputs and a decoded row spill the 32 AVX512 registers; its
// rows decode in a few instructions): 2.6-2.9 ms instead of 2.9-3.2 for cpu-125m's
// output projection at 4 sequences, one thread. q4_k's rows cost more to decode:
// one tile. (Past one sequence, a
// product costs 4 instructions per 64 weights and sequence, as the float path's
// 4 FMAs, plus the loads of the rounded inputs: the int8 path's gain is at 1.)
template <int R, int MB, Kind K>
inline void qtile8(const uint8_t* w, int64_t ld, const Q8x& x, int64_t m0, int64_t n, float* out, const uint8_t* pf) {
  if constexpr (MB > 2 && K == Q4_0) {
    qtile8_rows<R, 2, K>(w, ld, x, m0, n, out, R, pf);
    qtile8_rows<R, MB - 2, K>(w, ld, x, m0 + 2, n, out + 2 * R, R, nullptr);
  } else {
    qtile8_rows<R, MB, K>(w, ld, x, m0, n, out, R, pf);
  }
}

// q8: the rounded inputs where the block matrices take them (then x, xb and ldx are
// not read; m0: the tile's first input row), or nullptr.
template <int R, int MBT, Kind K>
inline void tile_k(const uint8_t* w, int64_t ld, const float* x, const bf16* xb, int64_t ldx, int64_t n, float* out,
                   const uint8_t* pf, const Q8x* q8 = nullptr, int64_t m0 = 0) {
  if constexpr (K == Q8_0 || K == Q4_0 || K == Q4_K)
    if (q8) return qtile8<R, MBT, K>(w, ld, *q8, m0, n, out, pf);
  if constexpr (K == F32)
    tile<R, MBT>(reinterpret_cast<const float*>(w), ld / 4, x, xb, ldx, n, out, reinterpret_cast<const float*>(pf));
  else if constexpr (K == BF16)
    tile<R, MBT>(reinterpret_cast<const bf16*>(w), ld / 2, x, xb, ldx, n, out, reinterpret_cast<const bf16*>(pf));
  else
    qtile<R, MBT, K>(w, ld, x, ldx, n, out, pf);
}

template <int R, Kind K>
inline void tile_dispatch(int64_t mb, const uint8_t* w, int64_t ld, int64_t n, const float* x, const bf16* xb,
                          float* s, const uint8_t* pf, const Q8x* q8 = nullptr, int64_t m0 = 0) {
  switch (mb) {  // the tile sizes are template arguments: registers, not memory
    case 1: tile_k<R, 1, K>(w, ld, x, xb, n, n, s, pf, q8, m0); break;
    case 2: tile_k<R, 2, K>(w, ld, x, xb, n, n, s, pf, q8, m0); break;
    case 3: tile_k<R, 3, K>(w, ld, x, xb, n, n, s, pf, q8, m0); break;
    default: tile_k<R, MB, K>(w, ld, x, xb, n, n, s, pf, q8, m0); break;
  }
}

template <typename W> constexpr Kind kind_of = std::is_same_v<W, float> ? F32 : BF16;

// A dense matrix in the activations' dtype (LoRA's A): rows n elements apart.
template <int R, typename W>
inline void tile_dispatch(int64_t mb, const W* w, int64_t n, const float* x, const bf16* xb, float* s) {
  tile_dispatch<R, kind_of<W>>(mb, reinterpret_cast<const uint8_t*>(w), n * static_cast<int64_t>(sizeof(W)), n, x, xb,
                               s, nullptr);
}

// Rows r0 .. r0 + R - 1 of one matrix (fewer at its end) for the M sequences.
// One sequence (RM: R rows for M == 1, more streams) takes only 1-wide tiles.
template <int R, Kind K>
void group_rows(const Mat& mat, int64_t r0, int64_t M, const float* x, const bf16* xb, int64_t n, float* y,
                int64_t ldy, bool accumulate, const int64_t* rowmap, const Q8x* q8) {
  const int64_t rows = std::min<int64_t>(R, mat.rows - r0), ld = mat.wt.ld;
  const uint8_t* w = mat.wt.w + r0 * ld;
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t mb = std::min<int64_t>(MB, M - m0);
    float s[MB * R];
    // Prefetch once per group, with the first tile of sequences. Past the
    // matrix's end it is a hint about memory nobody reads: harmless.
    const uint8_t* pf = m0 == 0 ? w + PREFETCH_GROUPS * R * ld : nullptr;
    if (rows == R) {
      if (M == 1)
        tile_k<R, 1, K>(w, ld, x, xb, n, n, s, pf, q8, 0);
      else if constexpr (R <= 4)  // wider groups only serve M == 1
        tile_dispatch<R, K>(mb, w, ld, n, x + m0 * n, xb ? xb + m0 * n : nullptr, s, pf, q8, m0);
    } else {  // the matrix's last rows, one at a time
      for (int64_t r = 0; r < rows; ++r) {
        float t[MB];
        tile_dispatch<1, K>(mb, w + r * ld, ld, n, x + m0 * n, xb ? xb + m0 * n : nullptr, t, nullptr, q8, m0);
        for (int64_t k = 0; k < mb; ++k) s[k * R + r] = t[k];
      }
    }
    for (int64_t k = 0; k < mb; ++k) {
      float* out = y + (rowmap ? rowmap[m0 + k] : m0 + k) * ldy + mat.col0 + r0;
      for (int64_t r = 0; r < rows; ++r) out[r] = accumulate ? out[r] + s[k * R + r] : s[k * R + r];
    }
  }
}

template <int R>
void gemv_rows(const std::vector<Mat>& mats, int64_t M, const float* x, const bf16* xb, int64_t n, float* y,
               int64_t ldy, bool accumulate, const int64_t* rowmap, bool nowait, const Q8x* q8) {
  int64_t groups[4], total = 0;
  for (size_t j = 0; j < mats.size(); ++j) total += (mats[j].rows + R - 1) / R, groups[j] = total;
  auto group = [&](int64_t g) {
    size_t j = 0;
    while (g >= groups[j]) ++j;
    const Mat& mat = mats[j];
    const int64_t r0 = (g - (j ? groups[j - 1] : 0)) * R;
    switch (mat.wt.kind) {
      case F32: group_rows<R, F32>(mat, r0, M, x, xb, n, y, ldy, accumulate, rowmap, q8); break;
      case BF16: group_rows<R, BF16>(mat, r0, M, x, xb, n, y, ldy, accumulate, rowmap, q8); break;
      case Q8_0: group_rows<R, Q8_0>(mat, r0, M, x, xb, n, y, ldy, accumulate, rowmap, q8); break;
      case Q4_0: group_rows<R, Q4_0>(mat, r0, M, x, xb, n, y, ldy, accumulate, rowmap, q8); break;
      case Q4_K: group_rows<R, Q4_K>(mat, r0, M, x, xb, n, y, ldy, accumulate, rowmap, q8); break;
    }
  };
  if (nowait) {
#pragma omp for schedule(static) nowait
    for (int64_t g = 0; g < total; ++g) group(g);
  } else {
#pragma omp for schedule(static)
    for (int64_t g = 0; g < total; ++g) group(g);
  }
}

// Rows per group. One float32 sequence is bound by memory bandwidth: more row
// streams help. Otherwise 4 rows x 4 sequences of accumulators fit AVX512's 32
// vector registers; AVX2 has 16, so 2 rows there. Quantized rows are decoded
// into registers too: 8 of them spill, and one sequence ran 20% slower with 8
// (q4_0, cpu-125m, one thread) than with 4.
#if defined(GALERNE_VW) && GALERNE_VW == 8
constexpr int ROWS = 2, ROWS_ONE = 4;
#else
constexpr int ROWS = 4, ROWS_ONE = 8;
#endif

// rowmap, where not null, says which row of y each input row's outputs go to.
// nowait: no barrier at the end (the caller's next work-shared loop has one, and
// does not touch y before it: lora_deltas).
// q8: x rounded to int8 for the block matrices (quantize_for), or nullptr.
void gemv(const std::vector<Mat>& mats, int64_t M, const float* x, const bf16* xb, int64_t n, float* y, int64_t ldy,
          bool accumulate, const int64_t* rowmap = nullptr, bool nowait = false, const Q8x* q8 = nullptr) {
  bool wide = M == 1;
  for (const Mat& m : mats) wide = wide && (m.wt.kind == F32 || (q8 && m.wt.kind != BF16));
  if (wide)
    gemv_rows<ROWS_ONE>(mats, M, x, xb, n, y, ldy, accumulate, rowmap, nowait, q8);
  else
    gemv_rows<ROWS>(mats, M, x, xb, n, y, ldy, accumulate, rowmap, nowait, q8);
}

// ----------------------------------------------------------------------- LoRA
// Batched adapters (galerne.models.lora's MultiLoRALinear): an adapted matrix has,
// for each of S slots, A (R, n) and B (out, R) in the weights' dtype, R the largest
// rank (lower ranks zero-padded, alpha / r folded into B), and a row m of the step
// with slot s gets y_m += B[s] (A[s] x_m). The step orders its rows by slot, so the
// rows of one slot are contiguous (a Group) and read A[s] and B[s] once per tile.
//
// A x is R dot products of length n per row: the GEMV's tiles. B u is out dot
// products of length R (16): there a horizontal sum per output would cost as much
// as the FMAs of the base GEMV's whole row, so 16 rows of B are transposed in
// registers instead (16 outputs x R ranks -> R vectors of 16 outputs) and each row
// of the group adds sum_r u[r] * column r with R broadcast FMAs.

template <typename W>
struct Lora {
  const W* A;    // (S, R, n)
  const W* B;    // (S, out, R)
  int64_t R, out, col0;  // col0: the first output column in y
};

struct Group {
  int64_t slot, m0, cnt;  // rows m0 .. m0 + cnt - 1 of the (sorted) step use this slot
};

constexpr int64_t LORA_CHUNK = 64;  // outputs of B per work item

#if defined(__AVX512F__)
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];  // u[4i + c], lane L: rows 4i..4i+3 of column 4L + c
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 lo01 = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 hi01 = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512 lo23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 hi23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
    r[c] = _mm512_shuffle_f32x4(lo01, lo23, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + c] = _mm512_shuffle_f32x4(lo01, lo23, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + c] = _mm512_shuffle_f32x4(hi01, hi23, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + c] = _mm512_shuffle_f32x4(hi01, hi23, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

inline __m512 load_row(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load_row(const bf16* p, __mmask16 k) {  // widening bf16: a shift into the high half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
#endif

// y[m, o] += sum_r B[o, r] u[m, r] for o in [o0, o1) and the cnt rows from m0.
template <typename W>
void lora_b(const W* B, int64_t R, int64_t o0, int64_t o1, const float* u, int64_t ldu, int64_t m0, int64_t cnt,
            float* y, int64_t ldy) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  for (int64_t o = o0; o < o1; o += 16) {
    const int64_t no = std::min<int64_t>(16, o1 - o);
    const __mmask16 omask = static_cast<__mmask16>((1u << no) - 1);
    for (int64_t c0 = 0; c0 < R; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, R - c0);
      const __mmask16 cmask = static_cast<__mmask16>((1u << nc) - 1);
      __m512 t[16];
      for (int64_t i = 0; i < 16; ++i) t[i] = i < no ? load_row(B + (o + i) * R + c0, cmask) : _mm512_setzero_ps();
      transpose16(t);  // t[r]: B[o .. o + 15, c0 + r]
      for (int64_t m = m0; m < m0 + cnt; ++m) {
        float* yo = y + m * ldy + o;
        const float* um = u + m * ldu + c0;
        __m512 acc = _mm512_maskz_loadu_ps(omask, yo);
        for (int64_t r = 0; r < nc; ++r) acc = _mm512_fmadd_ps(t[r], _mm512_set1_ps(um[r]), acc);
        _mm512_mask_storeu_ps(yo, omask, acc);
      }
    }
  }
#else
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t m = m0; m < m0 + cnt; ++m) {
      const float* um = u + m * ldu;
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t r = 0; r < R; ++r) s += to_f(B[o * R + r]) * um[r];
      y[m * ldy + o] += s;
    }
#endif
}

// The deltas of up to 3 adapted matrices that read the same input x (n wide, its
// bf16 copy xb), added into y; u is scratch of (M, sum of their R). Two work-shared
// loops (u = A x, then y += B u), each ending in the region's barrier: the first
// reads only x, so the base GEMV before it runs without its own (nowait), and its
// barrier is the one that orders the base GEMV's writes of y before the second's.
template <typename W>
void lora_deltas(const std::vector<Lora<W>>& mats, const std::vector<Group>& groups, const float* x, const bf16* xb,
                 int64_t n, float* u, float* y, int64_t ldy) {
  const int nm = static_cast<int>(mats.size());
  const int64_t G = static_cast<int64_t>(groups.size());
  if (nm == 0 || G == 0) return;  // the same for every thread: no barrier skipped by some
  int64_t ucol[3], ldu = 0, a_end[3], a_total = 0, b_end[3], b_total = 0;
  for (int j = 0; j < nm; ++j) {
    ucol[j] = ldu, ldu += mats[j].R;
    a_total += (mats[j].R + 3) / 4, a_end[j] = a_total;
    b_total += (mats[j].out + LORA_CHUNK - 1) / LORA_CHUNK, b_end[j] = b_total;
  }
  // u[m, ucol_j + r] = A_j[s] x_m, by groups of 4 ranks.
#pragma omp for schedule(static)
  for (int64_t k = 0; k < G * a_total; ++k) {
    const Group& g = groups[k / a_total];
    const int64_t unit = k % a_total;
    int j = 0;
    while (unit >= a_end[j]) ++j;
    const Lora<W>& mat = mats[j];
    const int64_t r0 = (unit - (j ? a_end[j - 1] : 0)) * 4, rows = std::min<int64_t>(4, mat.R - r0);
    const W* a = mat.A + (g.slot * mat.R + r0) * n;
    for (int64_t m0 = g.m0; m0 < g.m0 + g.cnt; m0 += MB) {
      const int64_t mb = std::min<int64_t>(MB, g.m0 + g.cnt - m0);
      float s[MB * 4];
      if (rows == 4) {
        tile_dispatch<4>(mb, a, n, x + m0 * n, xb + m0 * n, s);
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          float t[MB];
          tile_dispatch<1>(mb, a + r * n, n, x + m0 * n, xb + m0 * n, t);
          for (int64_t i = 0; i < mb; ++i) s[i * 4 + r] = t[i];
        }
      }
      for (int64_t i = 0; i < mb; ++i)
        for (int64_t r = 0; r < rows; ++r)  // rounded to the weights' dtype, as torch's lora_A(x) is
          u[(m0 + i) * ldu + ucol[j] + r0 + r] = to_f(from_f<W>(s[i * 4 + r]));
    }
  }
  // y[m, col0_j + o] += B_j[s] u_m, by chunks of outputs.
#pragma omp for schedule(static)
  for (int64_t k = 0; k < G * b_total; ++k) {
    const Group& g = groups[k / b_total];
    const int64_t unit = k % b_total;
    int j = 0;
    while (unit >= b_end[j]) ++j;
    const Lora<W>& mat = mats[j];
    const int64_t o0 = (unit - (j ? b_end[j - 1] : 0)) * LORA_CHUNK, o1 = std::min(mat.out, o0 + LORA_CHUNK);
    lora_b(mat.B + g.slot * mat.out * mat.R, mat.R, o0, o1, u + ucol[j], ldu, g.m0, g.cnt, y + mat.col0, ldy);
  }
}

// ------------------------------------------------------------------ the step

// What the step reads besides its inputs: bound once, when the decoder is made.
struct Model {
  std::vector<torch::Tensor> weights;  // 9 per layer (see Decoder)
  torch::Tensor final_norm, out_w, emb, k_cache, v_cache;
  std::vector<int64_t> windows;        // per layer, 0 for none
  int64_t H, K, hd;
  double eps;
  std::vector<float> inv_freq;         // rotary frequencies, (hd / 2,)
  float rope_scale;                    // cos and sin are multiplied by it (YaRN's magnitude; 1 without)
  double q_beta;                       // llama-4 query scaling: q *= 1 + beta * log(1 + floor(pos / q_orig))
  int64_t q_orig;                      // (q_beta 0: none)
  std::vector<torch::Tensor> lora;     // 14 per layer or none: A, B of wq, wk, wv, wo, w1, w3, w2 (undefined: none)
  int64_t slots;                       // adapter slots of every stack (0 without LoRA)
  std::vector<Weight> mats;            // 9 per layer, as weights (the norms' entries unused)
  Weight out, embed;                   // the output projection, the embedding
  bool int8_dot = false;               // block matrices against int8-rounded inputs (see Q8x)
};

template <typename W>
void step_impl(const Model& model, const std::vector<int64_t>& tokens_in, const std::vector<int64_t>& pos_in,
               const std::vector<std::vector<int32_t>>& block_tables, const std::vector<int64_t>& slots,
               int64_t threads, float* logits) {
  const std::vector<torch::Tensor>& weights = model.weights;
  const std::vector<int64_t>& windows = model.windows;
  const int64_t H = model.H, K = model.K, hd = model.hd;
  const double eps = model.eps;
  const torch::Tensor &final_norm = model.final_norm, &out_w = model.out_w;
  const int64_t M = static_cast<int64_t>(tokens_in.size()), D = final_norm.size(0);
  const int64_t L = static_cast<int64_t>(windows.size());
  const int64_t F = weights[6].size(0);  // w1's rows: the hidden size
  const int64_t V = out_w.size(0);
  const int64_t bs = model.k_cache.size(2);
  // With adapters, the step's rows go in the order of their slots (stable), so that
  // the rows of a slot are contiguous; the logits go back to the caller's order.
  std::vector<int64_t> order(M);
  for (int64_t m = 0; m < M; ++m) order[m] = m;
  std::vector<Group> groups;
  if (!model.lora.empty()) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return slots[a] < slots[b]; });
    for (int64_t i = 0; i < M; ++i) {
      const int64_t s = slots[order[i]];
      if (s < 0) continue;
      if (groups.empty() || groups.back().slot != s) groups.push_back({s, i, 0});
      ++groups.back().cnt;
    }
  }
  bool sorted = true;
  for (int64_t m = 0; m < M; ++m) sorted = sorted && order[m] == m;
  const int64_t* rowmap = sorted ? nullptr : order.data();
  std::vector<int64_t> tokens(M), pos(M);
  for (int64_t m = 0; m < M; ++m) tokens[m] = tokens_in[order[m]], pos[m] = pos_in[order[m]];
  int64_t nb_per_seq = 1;
  for (const auto& t : block_tables) nb_per_seq = std::max<int64_t>(nb_per_seq, static_cast<int64_t>(t.size()));
  std::vector<int32_t> tables_flat(M * nb_per_seq, 0);  // padded block tables, (M, nb_per_seq)
  for (int64_t m = 0; m < M; ++m)
    std::copy(block_tables[order[m]].begin(), block_tables[order[m]].end(), tables_flat.begin() + m * nb_per_seq);
  const int32_t* tables = tables_flat.data();
  // The cache slot of position t in a sequence's block table.
  auto slot_of = [bs](const int32_t* table, int64_t t) { return static_cast<int64_t>(table[t / bs]) * bs + t % bs; };
  const int64_t qkv_w = (H + 2 * K) * hd, group = H / K;
  const int64_t widest = std::max({D, H * hd, F});

  std::vector<float> xn(M * widest), xq(M * qkv_w), att(M * H * hd), ff(M * 2 * F), h(M * D);
  std::vector<bf16> xb(M * widest);
  // The inputs rounded to int8 for block matrices (empty unless int8_dot).
  Q8Buffers q8buf(model.int8_dot ? M * widest : 0);
  // A GEMV of the step: its input rounded first where the matrices take int8.
  auto mm = [&](const std::vector<Mat>& mats, const float* x, int64_t n, float* y, int64_t ldy, bool accumulate,
                const int64_t* rows, bool nowait) {
    const Q8x* q8 = quantize_for(mats, model.int8_dot, M, x, n, q8buf.x);
    gemv(mats, M, x, xb.data(), n, y, ldy, accumulate, rows, nowait, q8);
  };
  for (int64_t m = 0; m < M; ++m)  // a quantized embedding: the token's row only, decoded
    dequant_row(model.embed.kind, model.embed.w + tokens[m] * model.embed.ld, D, h.data() + m * D);
  const int64_t max_ctx = *std::max_element(pos.begin(), pos.end()) + 1;  // a token sees itself
  std::vector<float> scores(static_cast<size_t>(threads) * group * max_ctx);
  W* kc = reinterpret_cast<W*>(model.k_cache.data_ptr());
  W* vc = reinterpret_cast<W*>(model.v_cache.data_ptr());
  const int64_t layer_stride = model.k_cache.stride(0), slot_stride = K * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // cos then sin of each position's angles, (M, hd): the same for every layer.
  std::vector<float> rope(M * hd), q_scale(M, 1.0f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t i = 0; i < hd / 2; ++i) {
      float a = static_cast<float>(pos[m]) * model.inv_freq[i];
      rope[m * hd + i] = std::cos(a) * model.rope_scale, rope[m * hd + hd / 2 + i] = std::sin(a) * model.rope_scale;
    }
    if (model.q_beta != 0.0) {
      // As galerne.models.layers.query_scale, in float32 (rounded to the weights' dtype there).
      const float steps = std::floor(static_cast<float>(pos[m]) / static_cast<float>(model.q_orig));
      q_scale[m] = to_f(from_f<W>(1.0f + static_cast<float>(model.q_beta) * std::log(1.0f + steps)));
    }
  }

  auto wp = [&](int64_t l, int j) { return model.mats[l * 9 + j]; };

  // The adapted matrices of each layer, by the input they read: wq wk wv, wo, w1 w3, w2.
  std::vector<std::vector<Lora<W>>> lqkv(L), lo(L), l13(L), l2(L);
  int64_t ldu = 1;
  if (!groups.empty()) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t col0[7] = {0, H * hd, (H + K) * hd, 0, 0, F, 0};
      std::vector<Lora<W>>* dst[7] = {&lqkv[l], &lqkv[l], &lqkv[l], &lo[l], &l13[l], &l13[l], &l2[l]};
      for (int j = 0; j < 7; ++j) {
        const torch::Tensor &a = model.lora[l * 14 + 2 * j], &b = model.lora[l * 14 + 2 * j + 1];
        if (!a.defined()) continue;
        dst[j]->push_back({reinterpret_cast<const W*>(a.data_ptr()), reinterpret_cast<const W*>(b.data_ptr()),
                           a.size(1), b.size(1), col0[j]});
      }
      for (auto* v : {&lqkv[l], &lo[l], &l13[l], &l2[l]}) {
        int64_t r = 0;
        for (const auto& mat : *v) r += mat.R;
        ldu = std::max(ldu, r);
      }
    }
  }
  std::vector<float> u(M * ldu);
  auto norm_w = [&](const torch::Tensor& t) { return reinterpret_cast<const W*>(t.data_ptr()); };

  // RMSNorm of h into xn (and its bf16 copy), one row per iteration.
  auto rms_norm = [&](const W* g) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const float* row = h.data() + m * D;
      float ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) ss += row[i] * row[i];
      float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      for (int64_t i = 0; i < D; ++i) {
        float v = row[i] * r * to_f(g[i]);
        xn[m * D + i] = v;
        xb[m * D + i] = f2bf(v);
      }
    }
  };

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    for (int64_t l = 0; l < L; ++l) {
      // weights per layer: attention_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2
      rms_norm(norm_w(weights[l * 9 + 0]));
      mm({{wp(l, 1), H * hd, 0}, {wp(l, 2), K * hd, H * hd}, {wp(l, 3), K * hd, (H + K) * hd}}, xn.data(), D, xq.data(),
         qkv_w, false, nullptr, !lqkv[l].empty());
      lora_deltas<W>(lqkv[l], groups, xn.data(), xb.data(), D, u.data(), xq.data(), qkv_w);  // before rotary

      // Rotary on the q and k heads; k and v heads into the cache at this token's slot.
#pragma omp for collapse(2) schedule(static)
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t head = 0; head < H + 2 * K; ++head) {
          float* v = xq.data() + m * qkv_w + head * hd;
          if (head < H + K) {
            const float* c = rope.data() + m * hd;
            const float* s = c + hd / 2;
            const float qs = head < H ? q_scale[m] : 1.0f;
            for (int64_t i = 0; i < hd / 2; ++i) {
              float x0 = v[2 * i], x1 = v[2 * i + 1];
              v[2 * i] = (x0 * c[i] - x1 * s[i]) * qs;
              v[2 * i + 1] = (x0 * s[i] + x1 * c[i]) * qs;
            }
          }
          if (head >= H) {
            const int64_t slot = slot_of(tables + m * nb_per_seq, pos[m]);
            W* dst = (head < H + K ? kc : vc) + l * layer_stride + slot * slot_stride + ((head - H) % K) * hd;
            for (int64_t i = 0; i < hd; ++i) dst[i] = from_f<W>(v[i]);
          }
        }
      }

      // Attention: one (sequence, kv head) per iteration, its query heads together,
      // over the positions the layer's window lets this token see (itself included).
      const int64_t window = windows[l];
#pragma omp for collapse(2) schedule(static)
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t kvh = 0; kvh < K; ++kvh) {
          const int64_t n_ctx = pos[m] + 1;
          const int64_t lo = window > 0 ? std::max<int64_t>(0, n_ctx - window) : 0, n = n_ctx - lo;
          const float* q = xq.data() + m * qkv_w + kvh * group * hd;  // group heads, back to back
          float* sc = scores.data() + static_cast<size_t>(tid) * group * max_ctx;
          const int32_t* table = tables + m * nb_per_seq;
          const W* kbase = kc + l * layer_stride + kvh * hd;
          const W* vbase = vc + l * layer_stride + kvh * hd;
          for (int64_t t = lo; t < n_ctx;) {  // block by block: one table lookup per block
            const int64_t stop = std::min(n_ctx, (t / bs + 1) * bs);
            const W* kr = kbase + slot_of(table, t) * slot_stride;
            if (t == lo) prefetch_block(kr, stop - t, slot_stride, hd);
            if (stop < n_ctx) prefetch_block(kbase + slot_of(table, stop) * slot_stride, bs, slot_stride, hd);
            prefetch_block(vbase + slot_of(table, t) * slot_stride, stop - t, slot_stride, hd);
            for (; t < stop; ++t, kr += slot_stride)
              for (int64_t g = 0; g < group; ++g) sc[g * n + t - lo] = dot(q + g * hd, kr, hd) * scale;
          }
          for (int64_t g = 0; g < group; ++g) softmax(sc + g * n, n);
          float* o = att.data() + m * H * hd + kvh * group * hd;
          std::fill(o, o + group * hd, 0.0f);
          for (int64_t t = lo; t < n_ctx;) {
            const int64_t stop = std::min(n_ctx, (t / bs + 1) * bs);
            const W* vr = vbase + slot_of(table, t) * slot_stride;
            for (; t < stop; ++t, vr += slot_stride)
              for (int64_t g = 0; g < group; ++g) axpy(sc[g * n + t - lo], vr, o + g * hd, hd);
          }
          bf16* ob = xb.data() + m * H * hd + kvh * group * hd;
          for (int64_t i = 0; i < group * hd; ++i) ob[i] = f2bf(o[i]);
        }
      }

      mm({{wp(l, 4), D, 0}}, att.data(), H * hd, h.data(), D, true, nullptr, !lo[l].empty());
      lora_deltas<W>(lo[l], groups, att.data(), xb.data(), H * hd, u.data(), h.data(), D);
      rms_norm(norm_w(weights[l * 9 + 5]));
      mm({{wp(l, 6), F, 0}, {wp(l, 7), F, F}}, xn.data(), D, ff.data(), 2 * F, false, nullptr, !l13[l].empty());
      lora_deltas<W>(l13[l], groups, xn.data(), xb.data(), D, u.data(), ff.data(), 2 * F);

      // SwiGLU: silu(gate) * up, the input of w2 (and its bf16 copy).
#pragma omp for collapse(2) schedule(static)
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t i = 0; i < F; ++i) {
          const float g = ff[m * 2 * F + i];
          const float v = g / (1.0f + std::exp(-g)) * ff[m * 2 * F + F + i];
          xn[m * F + i] = v;
          xb[m * F + i] = f2bf(v);
        }
      }
      mm({{wp(l, 8), D, 0}}, xn.data(), F, h.data(), D, true, nullptr, !l2[l].empty());
      lora_deltas<W>(l2[l], groups, xn.data(), xb.data(), F, u.data(), h.data(), D);
    }
    rms_norm(norm_w(final_norm));
    mm({{model.out, V, 0}}, xn.data(), D, logits, V, false, rowmap, false);
  }
}

}  // namespace

// The decoder of one model and KV cache. step() runs a batch of M sequences that
// each add one token and returns the float32 logits (M, vocab).
//   weights: 9 tensors per layer: attention_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2
//   windows: per layer, 0 for none
//   lora: empty, or 14 per layer: A, B of wq, wk, wv, wo, w1, w3, w2, each
//         (S, R, in) and (S, out, R) in the activations' dtype, or empty where
//         the matrix has no adapter (see lora_deltas); step()'s slots pick one per row
//   schemes: empty (every matrix dense), or one code per weight then out_w, emb
//         (9 L + 2): 0 dense (float32 or bfloat16, whatever the activations),
//         1 q8_0, 2 q4_0, 3 q4_k: (rows, row bytes) uint8 blocks
// The norms and the cache are in the activations' dtype (float32 or bfloat16).
// The caller (galerne/kernels/cpu.py) checks that the model qualifies: contiguous
// CPU tensors, no biases.
class Decoder {
 public:
  Decoder(std::vector<torch::Tensor> weights, torch::Tensor final_norm, torch::Tensor out_w, torch::Tensor emb,
          torch::Tensor k_cache, torch::Tensor v_cache, std::vector<int64_t> windows, int64_t n_heads,
          int64_t n_kv_heads, int64_t head_dim, double eps, torch::Tensor inv_freq, double rope_scale, double q_beta,
          int64_t q_orig, std::vector<torch::Tensor> lora, std::vector<int64_t> schemes, bool int8_dot)
      : m_{std::move(weights), final_norm, out_w, emb, k_cache, v_cache, std::move(windows),
           n_heads, n_kv_heads, head_dim, eps, std::vector<float>(head_dim / 2), static_cast<float>(rope_scale),
           q_beta, q_orig, {}, 0, {}, {}, {}, int8_dot} {
    // Computed by galerne.models.layers.rotary_inv_freq (plain or YaRN), float32.
    TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat32 && inv_freq.is_contiguous() && inv_freq.numel() == head_dim / 2,
                "Decoder: inv_freq must be head_dim / 2 contiguous float32 values");
    std::copy(inv_freq.data_ptr<float>(), inv_freq.data_ptr<float>() + head_dim / 2, m_.inv_freq.begin());
    TORCH_CHECK(q_beta == 0.0 || q_orig > 0, "Decoder: query scaling needs a positive original context");
    TORCH_CHECK(m_.weights.size() == 9 * m_.windows.size(), "Decoder: 9 weights per layer");
    TORCH_CHECK(n_heads % n_kv_heads == 0 && head_dim % 2 == 0, "Decoder: bad head shape");
    const auto dtype = final_norm.scalar_type();  // the activations'
    TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "Decoder: float32 or bfloat16 norms");
    const int64_t L = static_cast<int64_t>(m_.windows.size());
    for (int64_t l = 0; l < L; ++l)
      for (int j : {0, 5}) TORCH_CHECK(m_.weights[l * 9 + j].scalar_type() == dtype, "Decoder: norms of one dtype");
    for (const auto& t : {final_norm, k_cache, v_cache})
      TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous(), "Decoder: norms and cache of one dtype, contiguous");
    TORCH_CHECK(schemes.empty() || static_cast<int64_t>(schemes.size()) == 9 * L + 2,
                "Decoder: schemes: one per weight, then the output's and the embedding's");
    if (schemes.empty()) schemes.assign(9 * L + 2, 0);
    const int64_t D = final_norm.size(0), HD = n_heads * head_dim, KD = n_kv_heads * head_dim;
    const int64_t F = m_.weights.empty() ? 0 : m_.weights[6].size(0);
    // Each matrix's (rows, in features), by its index in a layer's nine.
    const int64_t rows[9] = {0, HD, KD, KD, D, 0, F, F, D}, ins[9] = {0, D, D, D, HD, 0, D, D, F};
    m_.mats.resize(9 * L);
    for (int64_t l = 0; l < L; ++l)
      for (int j : {1, 2, 3, 4, 6, 7, 8})
        m_.mats[l * 9 + j] = weight(m_.weights[l * 9 + j], schemes[l * 9 + j], rows[j], ins[j]);
    m_.out = weight(out_w, schemes[9 * L], out_w.size(0), D);
    m_.embed = weight(emb, schemes[9 * L + 1], emb.size(0), D);
    TORCH_CHECK(lora.empty() || static_cast<int64_t>(lora.size()) == 14 * L, "Decoder: lora: 14 tensors per layer");
    int64_t slots = -1;
    for (int64_t l = 0; l < L && !lora.empty(); ++l) {
      for (int j = 0; j < 7; ++j) {
        torch::Tensor &a = lora[l * 14 + 2 * j], &b = lora[l * 14 + 2 * j + 1];
        const bool has_a = a.defined() && a.numel() > 0, has_b = b.defined() && b.numel() > 0;
        TORCH_CHECK(has_a == has_b, "Decoder: lora: A and B come together");
        if (!has_a) {
          a = b = torch::Tensor();
          continue;
        }
        const torch::Tensor& w = m_.weights[l * 9 + (j < 4 ? 1 + j : 2 + j)];
        TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(1) == b.size(2) &&
                        a.size(2) == ins[j < 4 ? 1 + j : 2 + j] && b.size(1) == w.size(0),
                    "Decoder: lora: A (S, R, in) and B (S, out, R) of the matrix's shape");
        TORCH_CHECK(a.scalar_type() == dtype && b.scalar_type() == dtype && a.is_contiguous() && b.is_contiguous(),
                    "Decoder: lora: contiguous, in the weights' dtype");
        TORCH_CHECK(slots < 0 || a.size(0) == slots, "Decoder: lora: one number of slots for every stack");
        slots = a.size(0);
      }
    }
    if (slots > 0) m_.lora = std::move(lora), m_.slots = slots;  // none adapted: as without
  }

  torch::Tensor step(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                     const std::vector<std::vector<int32_t>>& block_tables, int64_t threads,
                     std::vector<int64_t> slots) const {
    const int64_t M = static_cast<int64_t>(tokens.size()), vocab = m_.emb.size(0);
    TORCH_CHECK(M > 0 && positions.size() == tokens.size() && block_tables.size() == tokens.size(),
                "Decoder.step: one position and one block table per token");
    if (slots.empty()) slots.assign(M, -1);
    TORCH_CHECK(static_cast<int64_t>(slots.size()) == M, "Decoder.step: one slot per token (or none)");
    for (int64_t s : slots)
      TORCH_CHECK(s >= -1 && s < m_.slots, "Decoder.step: adapter slot ", s, " out of range (", m_.slots, " slots)");
    for (int64_t m = 0; m < M; ++m) {
      TORCH_CHECK(tokens[m] >= 0 && tokens[m] < vocab, "Decoder.step: token id out of range");
      const int64_t need = positions[m] / m_.k_cache.size(2) + 1;
      TORCH_CHECK(positions[m] >= 0 && static_cast<int64_t>(block_tables[m].size()) >= need,
                  "Decoder.step: the block table does not reach the position");
    }
    pybind11::gil_scoped_release no_gil;
    // One logits buffer, reused: a fresh (M, vocab) tensor each step costs page
    // faults on every step. The rows returned are valid until the next step.
    if (logits_.size(0) < M) logits_ = torch::empty({M, vocab}, torch::TensorOptions().dtype(torch::kFloat32));
    float* out = logits_.data_ptr<float>();
    if (m_.final_norm.scalar_type() == torch::kBFloat16)
      step_impl<bf16>(m_, tokens, positions, block_tables, slots, threads, out);
    else
      step_impl<float>(m_, tokens, positions, block_tables, slots, threads, out);
    return logits_.narrow(0, 0, M);
  }

 private:
  // A matrix of `rows` rows of n weights, as the kernel reads it; checked.
  static Weight weight(const torch::Tensor& t, int64_t scheme, int64_t rows, int64_t n) {
    TORCH_CHECK(scheme >= 0 && scheme <= 3, "Decoder: scheme code ", scheme, " (0 dense, 1 q8_0, 2 q4_0, 3 q4_k)");
    Kind k = F32;
    if (scheme == 0) {
      TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16,
                  "Decoder: a dense weight is float32 or bfloat16");
      k = t.scalar_type() == torch::kFloat32 ? F32 : BF16;
    } else {
      TORCH_CHECK(t.scalar_type() == torch::kUInt8, "Decoder: a quantized weight is uint8 blocks");
      k = static_cast<Kind>(Q8_0 + scheme - 1);
      TORCH_CHECK(n % kBlock[k] == 0, "Decoder: rows of ", n, " weights are not whole blocks of ", kBlock[k]);
    }
    TORCH_CHECK(t.is_contiguous() && t.dim() == 2 && t.size(0) == rows && t.size(1) == (k <= BF16 ? n : row_bytes(k, n)),
                "Decoder: a weight of shape ", t.sizes(), " where ", rows, " rows of ", n, " weights were expected");
    return {static_cast<const uint8_t*>(t.data_ptr()), k, row_bytes(k, n)};
  }

  Model m_;
  mutable torch::Tensor logits_ = torch::empty({0, 0});
};

namespace {
Kind checked_blocks(const torch::Tensor& q, const std::string& scheme, int64_t in_features, const char* what) {
  Kind k = F32;
  if (scheme == "q8_0") k = Q8_0;
  else if (scheme == "q4_0") k = Q4_0;
  else if (scheme == "q4_k") k = Q4_K;
  else TORCH_CHECK(false, what, ": no kernel for scheme ", scheme);
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.dim() == 2 && q.is_contiguous(), what, ": 2-D contiguous uint8");
  TORCH_CHECK(in_features > 0 && in_features % kBlock[k] == 0 && q.size(1) == row_bytes(k, in_features),
              what, ": ", scheme, " rows of ", in_features, " weights are ", row_bytes(k, in_features), " bytes, got ",
              q.size(1));
  return k;
}
}  // namespace

// Prefill multiplies by the dense weight: a quantized matrix decoded on every
// thread, row by row (writing the float32 result is most of the time).
torch::Tensor dequantize(torch::Tensor q, const std::string& scheme, int64_t in_features, int64_t threads) {
  const Kind k = checked_blocks(q, scheme, in_features, "dequantize");
  const int64_t rows = q.size(0), ld = q.size(1);
  torch::Tensor out = torch::empty({rows, in_features}, torch::TensorOptions().dtype(torch::kFloat32));
  const uint8_t* src = q.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  pybind11::gil_scoped_release no_gil;
#pragma omp parallel for num_threads(std::max<int64_t>(1, threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) dequant_row(k, src + r * ld, in_features, dst + r * in_features);
  return out;
}

// x (M, in) float32 times a quantized matrix's transpose, by the decode step's
// GEMV: for a few rows (the logits of a prefill's last tokens) this reads the
// blocks once where dequantize-then-matmul writes and reads the whole float32
// matrix (100 MB for a 32768 x 768 output projection).
torch::Tensor linear(torch::Tensor x, torch::Tensor q, const std::string& scheme, int64_t in_features,
                     int64_t threads, bool int8_dot) {
  const Kind k = checked_blocks(q, scheme, in_features, "linear");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() && x.size(1) == in_features,
              "linear: x must be contiguous float32 (rows, ", in_features, ")");
  const int64_t M = x.size(0), rows = q.size(0);
  torch::Tensor out = torch::empty({M, rows}, torch::TensorOptions().dtype(torch::kFloat32));
  if (M == 0) return out;
  const std::vector<Mat> mats{{{q.data_ptr<uint8_t>(), k, q.size(1)}, rows, 0}};
  const float* xp = x.data_ptr<float>();
  float* y = out.data_ptr<float>();
  Q8Buffers q8buf(int8_dot ? M * in_features : 0);
  pybind11::gil_scoped_release no_gil;
#pragma omp parallel num_threads(std::max<int64_t>(1, threads))
  {
    const Q8x* q8 = quantize_for(mats, int8_dot, M, xp, in_features, q8buf.x);
    gemv(mats, M, xp, nullptr, in_features, y, rows, false, nullptr, false, q8);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Decoder>(m, "Decoder", pybind11::module_local())
      .def(pybind11::init<std::vector<torch::Tensor>, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                          torch::Tensor, std::vector<int64_t>, int64_t, int64_t, int64_t, double, torch::Tensor, double,
                          double, int64_t, std::vector<torch::Tensor>, std::vector<int64_t>, bool>(),
           pybind11::arg("weights"), pybind11::arg("final_norm"), pybind11::arg("out_w"), pybind11::arg("emb"),
           pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("windows"), pybind11::arg("n_heads"),
           pybind11::arg("n_kv_heads"), pybind11::arg("head_dim"), pybind11::arg("eps"), pybind11::arg("inv_freq"),
           pybind11::arg("rope_scale"), pybind11::arg("q_beta"), pybind11::arg("q_orig"), pybind11::arg("lora"),
           pybind11::arg("schemes") = std::vector<int64_t>{}, pybind11::arg("int8_dot") = false)
      .def("step", &Decoder::step, "One decode step of every layer; float32 logits (M, vocab)",
           pybind11::arg("tokens"), pybind11::arg("positions"), pybind11::arg("block_tables"),
           pybind11::arg("threads"), pybind11::arg("slots") = std::vector<int64_t>{});
  m.def("dequantize", &dequantize,
        "(rows, row bytes) uint8 blocks of a scheme (q8_0, q4_0, q4_k) -> (rows, in_features) float32, as "
        "galerne.quant.dequantize gives them",
        pybind11::arg("q"), pybind11::arg("scheme"), pybind11::arg("in_features"), pybind11::arg("threads"));
  m.def("linear", &linear, "x (rows, in) float32 @ W.T for W in uint8 blocks of a scheme: float32 (rows, out)",
        pybind11::arg("x"), pybind11::arg("q"), pybind11::arg("scheme"), pybind11::arg("in_features"),
        pybind11::arg("threads"), pybind11::arg("int8_dot") = false);
}
