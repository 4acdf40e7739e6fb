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
//   k_cache, v_cache: (layers, num_blocks, block_size, K, hd), the weights' dtype
//   weights: nn.Linear's (out, in), row-major, untouched (no repacking: LoRA
//            merges, exports and the torch path see the same tensors)
//   rotary: Mistral's interleaved pairs (HF checkpoints are permuted at load)
// Batched LoRA (MultiLoRALinear's slot stacks): each row of a step may carry an
// adapter slot; see lora_deltas.
// Activations stay float32 from the embedding to the logits; with bf16 weights
// the GEMV inputs are rounded to bf16 for the AVX512-BF16 dot products (as torch's
// bf16 matmul reads bf16 activations).
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
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
// group starts: prefetching them took bf16 from 22 to 30 GB/s on 2 cores.

template <int R, int MB>
inline void tile(const float* w, int64_t ld, const float* xf, const bf16*, int64_t ldx, int64_t n, float* out,
                 const float*) {  // float32 streams fill the bandwidth without prefetches (measured)
  int64_t i0 = 0;
#if defined(__AVX512F__)
  __m512 a[MB][R];
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) a[mb][r] = _mm512_setzero_ps();
  for (; i0 + 16 <= n; i0 += 16) {
    __m512 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(w + r * ld + i0);
#pragma GCC unroll 4
    for (int mb = 0; mb < MB; ++mb) {
      const __m512 x = _mm512_loadu_ps(xf + mb * ldx + i0);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[mb][r] = _mm512_fmadd_ps(wv[r], x, a[mb][r]);
    }
  }
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) out[mb * R + r] = _mm512_reduce_add_ps(a[mb][r]);
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
#if defined(__AVX512BF16__)
  (void)xf;
  int64_t i0 = 0;
  __m512 a[MB][R];
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) a[mb][r] = _mm512_setzero_ps();
  for (; i0 + 32 <= n; i0 += 32) {
    __m512bh wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (pf) __builtin_prefetch(pf + r * ld + i0);
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
  (void)xb, (void)pf;
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; ++r) {  // widening bf16 is a shift: this vectorises
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < n; ++i) s += bf2f(w[r * ld + i]) * xf[mb * ldx + i];
      out[mb * R + r] = s;
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

template <typename W>
struct Mat {
  const W* w;
  int64_t rows;
  int64_t col0;  // first output column in y
};

constexpr int64_t PREFETCH_GROUPS = 2;

template <int R, typename W>
inline void tile_dispatch(int64_t mb, const W* w, int64_t n, const float* x, const bf16* xb, float* s, const W* pf) {
  switch (mb) {  // the tile sizes are template arguments: registers, not memory
    case 1: tile<R, 1>(w, n, x, xb, n, n, s, pf); break;
    case 2: tile<R, 2>(w, n, x, xb, n, n, s, pf); break;
    case 3: tile<R, 3>(w, n, x, xb, n, n, s, pf); break;
    default: tile<R, MB>(w, n, x, xb, n, n, s, pf); break;
  }
}

template <int R, typename W>
void gemv_rows(const std::vector<Mat<W>>& mats, int64_t M, const float* x, const bf16* xb, int64_t n, float* y,
               int64_t ldy, bool accumulate, const int64_t* rowmap, bool nowait) {
  int64_t groups[4], total = 0;
  for (size_t j = 0; j < mats.size(); ++j) total += (mats[j].rows + R - 1) / R, groups[j] = total;
  auto group = [&](int64_t g) {
    size_t j = 0;
    while (g >= groups[j]) ++j;
    const Mat<W>& mat = mats[j];
    const int64_t r0 = (g - (j ? groups[j - 1] : 0)) * R;
    const int64_t rows = std::min<int64_t>(R, mat.rows - r0);
    const W* w = mat.w + r0 * n;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m0);
      float s[MB * R];
      // Prefetch once per group, with the first tile of sequences. Past the
      // matrix's end it is a hint about memory nobody reads: harmless.
      const W* pf = m0 == 0 ? w + PREFETCH_GROUPS * R * n : nullptr;
      if (rows == R) {
        tile_dispatch<R>(mb, w, n, x + m0 * n, xb + m0 * n, s, pf);
      } else {  // the matrix's last rows, one at a time
        for (int64_t r = 0; r < rows; ++r) {
          float t[MB];
          tile_dispatch<1>(mb, w + r * n, n, x + m0 * n, xb + m0 * n, t, static_cast<const W*>(nullptr));
          for (int64_t k = 0; k < mb; ++k) s[k * R + r] = t[k];
        }
      }
      for (int64_t k = 0; k < mb; ++k) {
        float* out = y + (rowmap ? rowmap[m0 + k] : m0 + k) * ldy + mat.col0 + r0;
        for (int64_t r = 0; r < rows; ++r) out[r] = accumulate ? out[r] + s[k * R + r] : s[k * R + r];
      }
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

// rowmap, where not null, says which row of y each input row's outputs go to.
// nowait: no barrier at the end (the caller's next work-shared loop has one, and
// does not touch y before it: lora_deltas).
template <typename W>
void gemv(const std::vector<Mat<W>>& mats, int64_t M, const float* x, const bf16* xb, int64_t n, float* y,
          int64_t ldy, bool accumulate, const int64_t* rowmap = nullptr, bool nowait = false) {
  // One float32 sequence is bound by memory bandwidth: more row streams help.
  // Otherwise 4 rows x 4 sequences of accumulators fit the 32 vector registers.
  if (M == 1 && std::is_same_v<W, float>)
    gemv_rows<8>(mats, M, x, xb, n, y, ldy, accumulate, rowmap, nowait);
  else
    gemv_rows<4>(mats, M, x, xb, n, y, ldy, accumulate, rowmap, nowait);
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
        tile_dispatch<4>(mb, a, n, x + m0 * n, xb + m0 * n, s, static_cast<const W*>(nullptr));
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          float t[MB];
          tile_dispatch<1>(mb, a + r * n, n, x + m0 * n, xb + m0 * n, t, static_cast<const W*>(nullptr));
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
  const int64_t M = static_cast<int64_t>(tokens_in.size()), D = model.emb.size(1);
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
  const W* emb = reinterpret_cast<const W*>(model.emb.data_ptr());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < D; ++i) h[m * D + i] = to_f(emb[tokens[m] * D + i]);
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

  auto wp = [&](int64_t l, int j) { return reinterpret_cast<const W*>(weights[l * 9 + j].data_ptr()); };

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
      gemv<W>({{wp(l, 1), H * hd, 0}, {wp(l, 2), K * hd, H * hd}, {wp(l, 3), K * hd, (H + K) * hd}}, M, xn.data(),
              xb.data(), D, xq.data(), qkv_w, false, nullptr, !lqkv[l].empty());
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

      gemv<W>({{wp(l, 4), D, 0}}, M, att.data(), xb.data(), H * hd, h.data(), D, true, nullptr, !lo[l].empty());
      lora_deltas<W>(lo[l], groups, att.data(), xb.data(), H * hd, u.data(), h.data(), D);
      rms_norm(norm_w(weights[l * 9 + 5]));
      gemv<W>({{wp(l, 6), F, 0}, {wp(l, 7), F, F}}, M, xn.data(), xb.data(), D, ff.data(), 2 * F, false, nullptr,
              !l13[l].empty());
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
      gemv<W>({{wp(l, 8), D, 0}}, M, xn.data(), xb.data(), F, h.data(), D, true, nullptr, !l2[l].empty());
      lora_deltas<W>(l2[l], groups, xn.data(), xb.data(), F, u.data(), h.data(), D);
    }
    rms_norm(norm_w(final_norm));
    gemv<W>({{reinterpret_cast<const W*>(out_w.data_ptr()), V, 0}}, M, xn.data(), xb.data(), D,
            logits, V, false, rowmap);
  }
}

}  // namespace

// The decoder of one model and KV cache. step() runs a batch of M sequences that
// each add one token and returns the float32 logits (M, vocab).
//   weights: 9 tensors per layer: attention_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2
//   windows: per layer, 0 for none
//   lora: empty, or 14 per layer: A, B of wq, wk, wv, wo, w1, w3, w2, each
//         (S, R, in) and (S, out, R) in the weights' dtype, or empty where the
//         matrix has no adapter (see lora_deltas); step()'s slots pick one per row
// The caller (galerne/kernels/cpu.py) checks that the model qualifies: contiguous
// CPU tensors, one dtype (float32 or bfloat16) for weights and cache, no biases.
class Decoder {
 public:
  Decoder(std::vector<torch::Tensor> weights, torch::Tensor final_norm, torch::Tensor out_w, torch::Tensor emb,
          torch::Tensor k_cache, torch::Tensor v_cache, std::vector<int64_t> windows, int64_t n_heads,
          int64_t n_kv_heads, int64_t head_dim, double eps, torch::Tensor inv_freq, double rope_scale, double q_beta,
          int64_t q_orig, std::vector<torch::Tensor> lora)
      : m_{std::move(weights), final_norm, out_w, emb, k_cache, v_cache, std::move(windows),
           n_heads, n_kv_heads, head_dim, eps, std::vector<float>(head_dim / 2), static_cast<float>(rope_scale),
           q_beta, q_orig, {}, 0} {
    // Computed by galerne.models.layers.rotary_inv_freq (plain or YaRN), float32.
    TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat32 && inv_freq.is_contiguous() && inv_freq.numel() == head_dim / 2,
                "Decoder: inv_freq must be head_dim / 2 contiguous float32 values");
    std::copy(inv_freq.data_ptr<float>(), inv_freq.data_ptr<float>() + head_dim / 2, m_.inv_freq.begin());
    TORCH_CHECK(q_beta == 0.0 || q_orig > 0, "Decoder: query scaling needs a positive original context");
    TORCH_CHECK(m_.weights.size() == 9 * m_.windows.size(), "Decoder: 9 weights per layer");
    TORCH_CHECK(n_heads % n_kv_heads == 0 && head_dim % 2 == 0, "Decoder: bad head shape");
    const auto dtype = out_w.scalar_type();
    TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "Decoder: float32 or bfloat16 weights");
    for (const auto& t : m_.weights) TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous(), "Decoder: weights");
    for (const auto& t : {final_norm, emb, k_cache, v_cache})
      TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous(), "Decoder: one dtype, contiguous");
    const int64_t L = static_cast<int64_t>(m_.windows.size());
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
                        a.size(2) == w.size(1) && b.size(1) == w.size(0),
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
    if (m_.out_w.scalar_type() == torch::kBFloat16)
      step_impl<bf16>(m_, tokens, positions, block_tables, slots, threads, out);
    else
      step_impl<float>(m_, tokens, positions, block_tables, slots, threads, out);
    return logits_.narrow(0, 0, M);
  }

 private:
  Model m_;
  mutable torch::Tensor logits_ = torch::empty({0, 0});
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Decoder>(m, "Decoder", pybind11::module_local())
      .def(pybind11::init<std::vector<torch::Tensor>, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                          torch::Tensor, std::vector<int64_t>, int64_t, int64_t, int64_t, double, torch::Tensor, double,
                          double, int64_t, std::vector<torch::Tensor>>())
      .def("step", &Decoder::step, "One decode step of every layer; float32 logits (M, vocab)",
           pybind11::arg("tokens"), pybind11::arg("positions"), pybind11::arg("block_tables"),
           pybind11::arg("threads"), pybind11::arg("slots") = std::vector<int64_t>{});
}
