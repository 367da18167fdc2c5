// jaxtrain: float32 CPU kernels as XLA FFI handlers (see jaxtrain/blas.py).
//
// JaxtrainGemm: C = op(A) op(B) over the last two axes (row-major, any number of leading
// batch axes), op an optional transpose given by the trans_a / trans_b
// attributes: cblas_sgemm, or cblas_sgemm_batch_strided when there are batch
// axes and the library has it. The functions' addresses are handed in at load
// time (jaxtrain_gemm_set), so this file needs no BLAS headers or link flags.
// With MKL a 2-D product runs as one single-threaded sgemm per thread of XLA's
// pool, on bands of C; otherwise the BLAS runs with its own threads.
//
// JaxtrainAttentionFwd / JaxtrainAttentionBwd: causal softmax attention of
// one head at a time, read from and written to the fused [B, T, 3, N, H]
// q/k/v layout (no transposes), in row blocks of kRows queries: only keys
// at or before a query are multiplied, the softmax never leaves the cache,
// and the backward recomputes the probabilities from the saved log-sum-exp
// (as FlashAttention does) instead of storing [B, N, T, T]. Heads are spread
// over XLA's intra-op thread pool. The products are AVX-512 register tiles
// where the build has AVX-512 and the head size is a multiple of 16, else
// single-threaded BLAS calls (MKL_Set_Num_Threads_Local).
//
// JaxtrainGeluFwd / JaxtrainGeluBwd: h = gelu(y + b) (exact, erf-based) and
// its backward du = dh * gelu'(y + b), db = sum of du over rows, each in one
// pass over memory.
//
// JaxtrainLayerNormFwd / JaxtrainLayerNormBwd: LayerNorm over the last axis
// (saving each row's mean and 1/std), and its backward with the scale and
// bias gradients summed in the same pass.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "_thread_pool.h"

namespace ffi = xla::ffi;

extern "C" {
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int,
                         const float*, int, float, float*, int);
typedef void (*sgemm_batch_strided_fn)(int, int, int, int, int, int, float,
                                       const float*, int, int, const float*, int,
                                       int, float, float*, int, int, int);
}

static sgemm_fn g_sgemm = nullptr;
static sgemm_batch_strided_fn g_sgemm_batch = nullptr;

typedef int (*set_threads_local_fn)(int);
static set_threads_local_fn g_set_threads_local = nullptr;

extern "C" void jaxtrain_gemm_set(void* sgemm, void* sgemm_batch_strided, void* set_threads_local) {
  g_sgemm = reinterpret_cast<sgemm_fn>(sgemm);
  g_sgemm_batch = reinterpret_cast<sgemm_batch_strided_fn>(sgemm_batch_strided);
  g_set_threads_local = reinterpret_cast<set_threads_local_fn>(set_threads_local);
}

namespace {

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

// ---------------------------------------------------------------------------
// Work sharing on XLA's intra-op thread pool.

template <typename F>
void RunChunksWithSequentialBlas(jaxtrain::Chunks& c, const F* f) {
  const int previous = g_set_threads_local(1);
  jaxtrain::RunChunks(c, f);
  g_set_threads_local(previous);
}

// f(0) ... f(n - 1) on this thread and on up to pool.num_threads() - 1 pool
// threads, each chunk run with single-threaded BLAS (jaxtrain::ParallelFor).
// Without a way to make the BLAS single-threaded per thread (a library other
// than MKL), the chunks run here, one after another, with the BLAS's own
// threads; so does a single chunk.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int n, const F& f) {
  if (g_set_threads_local == nullptr || n <= 1) {
    for (int i = 0; i < n; ++i) f(i);
    return;
  }
  jaxtrain::ParallelFor(pool, n, f, [](jaxtrain::Chunks& c, const F* fp) { RunChunksWithSequentialBlas(c, fp); });
}

// A scratch buffer per thread, reused across calls.
float* Scratch(int which, size_t n) {
  thread_local std::vector<float> buffers[8];
  if (buffers[which].size() < n) buffers[which].resize(n);
  return buffers[which].data();
}

// ---------------------------------------------------------------------------
// Matrix products.

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                    ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("jaxtrain gemm: no sgemm was set");
  auto da = a.dimensions(), db = b.dimensions();
  const size_t r = da.size();
  if (r < 2 || db.size() != r) return ffi::Error::InvalidArgument("jaxtrain gemm: operand ranks differ or are < 2");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < r; ++i) {
    if (da[i] != db[i]) return ffi::Error::InvalidArgument("jaxtrain gemm: batch dimensions differ");
    batch *= da[i];
  }
  const int64_t ar = da[r - 2], ac = da[r - 1], br = db[r - 2], bc = db[r - 1];
  const int64_t m = trans_a ? ac : ar, k = trans_a ? ar : ac;
  const int64_t n = trans_b ? br : bc, kb = trans_b ? bc : br;
  if (k != kb) return ffi::Error::InvalidArgument("jaxtrain gemm: contraction sizes differ");
  // CBLAS takes 32-bit sizes and strides (the LP64 interface).
  const int64_t kMax = 2147483647;
  if (ar * ac > kMax || br * bc > kMax || m * n > kMax || batch > kMax)
    return ffi::Error::InvalidArgument("jaxtrain gemm: a matrix has more than 2^31 - 1 elements");
  const float* pa = a.typed_data();
  const float* pb = b.typed_data();
  float* pc = c->typed_data();
  if (m == 0 || n == 0 || batch == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum; BLAS may leave C unwritten
    std::fill(pc, pc + batch * m * n, 0.0f);
    return ffi::Error::Success();
  }
  const int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
  if (batch == 1 && g_set_threads_local != nullptr && pool.num_threads() > 1) {
    // One single-threaded sgemm per thread of XLA's pool, each on a band of C's rows (or
    // columns, when C is wider than tall). Measured against one call with MKL's own threads,
    // alternating in one process: 3.5% faster GPT steps (the pool's threads are already
    // awake, and two products that XLA runs side by side no longer put 4 threads on 2 cores).
    const int parts = static_cast<int>(pool.num_threads());
    const bool rows = m >= n;
    const int64_t len = rows ? m : n;
    const int64_t band = ((len + parts - 1) / parts + 15) / 16 * 16;
    ParallelFor(pool, static_cast<int>((len + band - 1) / band), [&](int i) {
      const int64_t lo = i * band, size = std::min(len, lo + band) - lo;
      if (rows)
        g_sgemm(kRowMajor, ta, tb, size, n, k, 1.0f, trans_a ? pa + lo : pa + lo * ac, ac, pb, bc, 0.0f,
                pc + lo * n, n);
      else
        g_sgemm(kRowMajor, ta, tb, m, size, k, 1.0f, pa, ac, trans_b ? pb + lo * bc : pb + lo, bc, 0.0f,
                pc + lo, n);
    });
  } else if (batch == 1) {
    g_sgemm(kRowMajor, ta, tb, m, n, k, 1.0f, pa, ac, pb, bc, 0.0f, pc, n);
  } else if (g_sgemm_batch != nullptr) {
    g_sgemm_batch(kRowMajor, ta, tb, m, n, k, 1.0f, pa, ac, ar * ac, pb, bc, br * bc, 0.0f, pc, n, m * n,
                  static_cast<int>(batch));
  } else {
    for (int64_t i = 0; i < batch; ++i)
      g_sgemm(kRowMajor, ta, tb, m, n, k, 1.0f, pa + i * ar * ac, ac, pb + i * br * bc, bc, 0.0f,
              pc + i * m * n, n);
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Elementwise math, written so that the compiler vectorises the loops.

// e^x to ~2 float ulp: x = n ln2 + r, |r| <= ln2 / 2, degree-7 Taylor
// polynomial for e^r, 2^n put into the exponent bits. Clamped to
// [-87, 88], where e^x is a normal float.
inline float Exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // round to nearest by adding and taking away 1.5 * 2^23 (vectorises, unlike std::floor)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// Phi(u), the standard normal CDF, through erfc(|u| / sqrt 2) by the
// Chebyshev fit of Numerical Recipes' erfcc (relative error < 1.2e-7 for all
// arguments), on the tail side so that Phi keeps its relative accuracy for
// negative u.
inline float NormalCdf(float u) {
  const float z = std::fabs(u) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.5f * z);
  // Horner's scheme, highest coefficient first
  float poly = 0.17087277f;
  for (const float c : {-0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f, -0.18628806f, 0.09678418f,
                        0.37409196f, 1.00002368f, -1.26551223f})
    poly = poly * t + c;
  const float half_tail = 0.5f * t * Exp(poly - z * z);  // Phi(-|u|)
  return u >= 0.0f ? 1.0f - half_tail : half_tail;
}

// ---------------------------------------------------------------------------
// Causal attention on the fused [B, T, 3, N, H] layout.

constexpr int64_t kRows = 64;  // queries per block

struct AttentionShape {
  int64_t B, T, N, H, C;
  int64_t blocks() const { return (T + kRows - 1) / kRows; }
};

ffi::Error AttentionShapeOf(ffi::Buffer<ffi::F32>& qkv, AttentionShape* s) {
  auto d = qkv.dimensions();
  if (d.size() != 5 || d[2] != 3)
    return ffi::Error::InvalidArgument("jaxtrain attention: qkv must be [B, T, 3, N, H]");
  *s = AttentionShape{d[0], d[1], d[3], d[4], d[3] * d[4]};
  if (s->T * 3 * s->C > 2147483647)
    return ffi::Error::InvalidArgument("jaxtrain attention: a sequence is too long for 32-bit BLAS strides");
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Register-tiled products for the attention kernels (AVX-512).
//
// The attention products are small (64 queries x up to T keys x head size),
// and MKL spends much of each call packing its operands: 78-129 GFLOP/s
// single-threaded on them against ~150 on large products. These tiles read
// A by broadcasts and B by rows straight from where they lie, and each row
// tile stops at the last key it can see, so the causal mask also saves the
// upper half of the diagonal blocks.

#if defined(__AVX512F__)
constexpr int kTileRows = 6;   // rows of C per tile
constexpr int kTileCols = 64;  // columns of C per tile: 4 vectors, so 24 accumulators

// C[R, 16 NV] = alpha A B (+ C if accumulate) over k < K. A(r, k) is a[r * sam + k * sak];
// row k of B starts at b + k * ldb and is contiguous.
template <int R, int NV>
void Tile(int64_t K, const float* a, int64_t sam, int64_t sak, const float* b, int64_t ldb, float* c,
          int64_t ldc, float alpha, bool accumulate) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * sam + k * sak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* p = c + r * ldc + 16 * v;
      __m512 x = _mm512_mul_ps(scale, acc[r][v]);
      if (accumulate) x = _mm512_add_ps(x, _mm512_loadu_ps(p));
      _mm512_storeu_ps(p, x);
    }
}

using TileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, float,
                        bool);

template <int R>
constexpr TileFn kTileRow[4] = {Tile<R, 1>, Tile<R, 2>, Tile<R, 3>, Tile<R, 4>};
constexpr const TileFn* kTiles[kTileRows] = {kTileRow<1>, kTileRow<2>, kTileRow<3>,
                                             kTileRow<4>, kTileRow<5>, kTileRow<6>};

// C[M, N] = alpha A B (+ C), N a multiple of 16. limits(m0, rows, &k0, &k1, &n1):
// the row tile starting at m0 needs only k in [k0, k1) and columns below n1 (a
// multiple of 16); its columns from n1 on are not written. The loops run over
// chunks of kChunk rows of B, then 64-column panels, then row tiles, so that
// the 64 x 64 block of B in use stays in L1 while every row tile reads it.
constexpr int64_t kChunk = 64;

template <typename Limits>
void Product(int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t sam, int64_t sak,
             const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate, const Limits& limits) {
  for (int64_t c0 = 0; c0 < std::max<int64_t>(K, 1); c0 += kChunk) {
    const int64_t c1 = std::min(K, c0 + kChunk);
    for (int64_t n0 = 0; n0 < N; n0 += kTileCols) {
      for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, M - m0));
        int64_t k0 = 0, k1 = K, n1 = N;
        limits(m0, rows, &k0, &k1, &n1);
        k0 = std::max(k0, c0), k1 = std::min(k1, c1);
        // the first chunk writes every tile (zeros where its range starts later), the others add
        if (n1 <= n0 || (c0 > 0 && k1 <= k0)) continue;
        const int nv = static_cast<int>(std::min<int64_t>(kTileCols, n1 - n0) / 16);
        kTiles[rows - 1][nv - 1](std::max<int64_t>(k1 - k0, 0), a + m0 * sam + k0 * sak, sam, sak,
                                 b + k0 * ldb + n0, ldb, c + m0 * ldc + n0, ldc, alpha, accumulate || c0 > 0);
      }
    }
  }
}
#endif

inline int64_t RoundUp16(int64_t n) { return (n + 15) / 16 * 16; }

#if defined(__AVX512F__)
// dst[t * H + h] = src[t * lds + h] for t < T: rows of one head gathered into a
// contiguous block. One tight loop over the rows, so that the cache misses of
// the first touch overlap instead of stalling the products one by one.
// H is a multiple of 16 here; vector moves inline (GCC turns a plain loop into a memmove call per row).
void CopyRows(const float* src, int64_t lds, int64_t T, int64_t H, float* dst) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; h += 16) _mm512_storeu_ps(dst + t * H + h, _mm512_loadu_ps(src + t * lds + h));
}

// row[valid, valid + 16) = 0 (within the row's n floats): past a query's last key, the products read
// at most 5 keys further (a row tile's width - 1), and the vectorised softmax wrote up to 15 further.
inline void ZeroPastDiagonal(float* row, int64_t valid, int64_t n) {
  const int64_t end = std::min(valid + 16, n);
  for (int64_t j = valid; j < end; ++j) row[j] = 0.0f;
}

// dst[h * ldd + t] = src[t * H + h] (contiguous [T, H] rows in), and 0 for T <= t < RoundUp16(T),
// the last columns a product reads (ldd >= RoundUp16(T)).
void Transpose(const float* src, int64_t T, int64_t H, float* dst, int64_t ldd) {
  for (int64_t h = 0; h < H; ++h) std::fill(dst + h * ldd + T, dst + h * ldd + RoundUp16(T), 0.0f);
  for (int64_t t0 = 0; t0 < T; t0 += 16) {  // 16 rows at a time: contiguous runs in dst
    const int64_t n = std::min<int64_t>(16, T - t0);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < n; ++t) dst[h * ldd + t0 + t] = src[(t0 + t) * H + h];
  }
}

// One head's forward with the register tiles: q, k, v rows at stride ld, y rows at stride C.
// Query blocks [blk0, blk1) only (the keys they see are gathered, no more).
void AttentionFwdHeadTiles(const AttentionShape& s, float scale, const float* q, float* y, float* lse,
                           int64_t blk0, int64_t blk1) {
  const int64_t T = s.T, H = s.H, C = s.C, ld = 3 * C, Tp = RoundUp16(T);
  const int64_t seen = std::min(T, blk1 * kRows);  // keys of these blocks
  float* kc = Scratch(4, seen * H);
  float* vc = Scratch(5, seen * H);
  float* kt = Scratch(2, H * Tp);
  float* qc = Scratch(6, kRows * H);
  float* inv = Scratch(7, kRows);
  CopyRows(q + C, ld, seen, H, kc);
  CopyRows(q + 2 * C, ld, seen, H, vc);
  Transpose(kc, seen, H, kt, Tp);
  for (int64_t r0 = blk0 * kRows; r0 < seen; r0 += kRows) {
    const int64_t rows = std::min(kRows, T - r0), keys = r0 + rows;
    float* p = Scratch(0, rows * Tp);
    CopyRows(q + r0 * ld, ld, rows, H, qc);
    // S = scale Q K^T, each row tile up to its last visible key
    Product(rows, RoundUp16(keys), H, scale, qc, H, 1, kt, Tp, p, Tp, false,
            [&](int64_t m0, int r, int64_t* k0, int64_t* k1, int64_t* n1) {
              *k0 = 0, *k1 = H, *n1 = RoundUp16(r0 + m0 + r);
            });
    for (int64_t i = 0; i < rows; ++i) {
      float* row = p + i * Tp;
      // whole vectors: the masked keys up to the tile's edge count e^-87 each, then become 0
      const int64_t valid = r0 + i + 1, vend = RoundUp16(valid);
      std::fill(row + valid, row + vend, -HUGE_VALF);
      float m = row[0];
#pragma omp simd reduction(max : m)
      for (int64_t j = 1; j < vend; ++j) m = row[j] > m ? row[j] : m;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < vend; ++j) {
        row[j] = Exp(row[j] - m);
        sum += row[j];
      }
      inv[i] = 1.0f / sum;
      ZeroPastDiagonal(row, valid, Tp);
      lse[r0 + i] = m + std::log(sum);
    }
    // O = P V over the keys each row tile sees, P unnormalised: each row of O is then divided by its sum
    Product(rows, H, keys, 1.0f, p, Tp, 1, vc, H, y + r0 * C, C, false,
            [&](int64_t m0, int r, int64_t* k0, int64_t* k1, int64_t* n1) { *k0 = 0, *k1 = r0 + m0 + r, *n1 = H; });
    for (int64_t i = 0; i < rows; ++i) {
      float* out = y + (r0 + i) * C;
      const float scale_i = inv[i];
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) out[h] *= scale_i;
    }
  }
}

// One head's backward with the register tiles; dq, dk, dv rows at stride ld, y and dy at stride C.
void AttentionBwdHeadTiles(const AttentionShape& s, float scale, const float* q, const float* y,
                           const float* lse, const float* dy, float* dq) {
  const int64_t T = s.T, H = s.H, C = s.C, ld = 3 * C, Tp = RoundUp16(T);
  float* dk = dq + C;
  float* dv = dq + 2 * C;
  float* kc = Scratch(4, T * H);
  float* kt = Scratch(2, H * Tp);
  float* vt = Scratch(3, H * Tp);
  float* qc = Scratch(5, T * H);
  float* dyc = Scratch(6, T * H);
  float* dots = Scratch(7, T);
  CopyRows(q + 2 * C, ld, T, H, qc);  // V, through qc on its way to vt
  Transpose(qc, T, H, vt, Tp);
  CopyRows(q + C, ld, T, H, kc);
  Transpose(kc, T, H, kt, Tp);
  CopyRows(q, ld, T, H, qc);
  CopyRows(dy, C, T, H, dyc);
  for (int64_t t = 0; t < T; ++t) {  // sum_j P_tj dP_tj = dO_t . O_t
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t h = 0; h < H; ++h) dot += dyc[t * H + h] * y[t * C + h];
    dots[t] = dot;
  }
  for (int64_t r0 = 0; r0 < T; r0 += kRows) {
    const int64_t rows = std::min(kRows, T - r0), keys = r0 + rows;
    float* p = Scratch(0, rows * Tp);
    float* ds = Scratch(1, rows * Tp);
    const auto visible = [&](int64_t m0, int r, int64_t* k0, int64_t* k1, int64_t* n1) {
      *k0 = 0, *k1 = H, *n1 = RoundUp16(r0 + m0 + r);
    };
    // P from the saved log-sum-exp; dP = dO V^T.
    Product(rows, RoundUp16(keys), H, scale, qc + r0 * H, H, 1, kt, Tp, p, Tp, false, visible);
    Product(rows, RoundUp16(keys), H, 1.0f, dyc + r0 * H, H, 1, vt, Tp, ds, Tp, false, visible);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = r0 + i, valid = t + 1;
      const float l = lse[t], dot = dots[t];
      float* prow = p + i * Tp;
      float* drow = ds + i * Tp;
      const int64_t vend = RoundUp16(valid);  // whole vectors, the masked keys zeroed after
#pragma omp simd
      for (int64_t j = 0; j < vend; ++j) {
        const float pj = Exp(prow[j] - l);
        prow[j] = pj;
        drow[j] = pj * (drow[j] - dot) * scale;
      }
      ZeroPastDiagonal(prow, valid, Tp);
      ZeroPastDiagonal(drow, valid, Tp);
    }
    // dQ = dS K (dS already holds the scale) over the keys each row tile sees
    Product(rows, H, keys, 1.0f, ds, Tp, 1, kc, H, dq + r0 * ld, ld, false,
            [&](int64_t m0, int r, int64_t* k0, int64_t* k1, int64_t* n1) { *k0 = 0, *k1 = r0 + m0 + r, *n1 = H; });
    // dK += dS^T Q and dV += P^T dO: the earlier keys add to what the earlier blocks wrote, this
    // block's own keys (first seen here) are written, each key tile over the queries that see it
    const auto seen_by = [&](int64_t m0, int r, int64_t* k0, int64_t* k1, int64_t* n1) {
      *k0 = std::max<int64_t>(0, m0 - r0), *k1 = rows, *n1 = H;
    };
    const auto seen_by_own = [&](int64_t m0, int r, int64_t* k0, int64_t* k1, int64_t* n1) {
      *k0 = m0, *k1 = rows, *n1 = H;
    };
    Product(r0, H, rows, 1.0f, ds, 1, Tp, qc + r0 * H, H, dk, ld, true, seen_by);
    Product(r0, H, rows, 1.0f, p, 1, Tp, dyc + r0 * H, H, dv, ld, true, seen_by);
    Product(rows, H, rows, 1.0f, ds + r0, 1, Tp, qc + r0 * H, H, dk + r0 * ld, ld, false, seen_by_own);
    Product(rows, H, rows, 1.0f, p + r0, 1, Tp, dyc + r0 * H, H, dv + r0 * ld, ld, false, seen_by_own);
  }
}
#endif

ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse, float scale) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("jaxtrain attention: no sgemm was set");
  AttentionShape s;
  if (auto e = AttentionShapeOf(qkv, &s); e.failure()) return e;
  const int64_t T = s.T, N = s.N, H = s.H, C = s.C, ld = 3 * C, nb = s.blocks();
  const float* pqkv = qkv.typed_data();
  float* py = out->typed_data();
  float* plse = lse->typed_data();
  if (s.B * N * T == 0) return ffi::Error::Success();
#if defined(__AVX512F__)
  if (H % 16 == 0) {
    // A task per head when there are enough heads to keep the pool busy; else a task per query
    // block, largest first, each gathering the keys it sees (which repeats some of that work).
    const bool per_block = s.B * N < 2 * static_cast<int64_t>(pool.num_threads()) && nb > 1;
    ParallelFor(pool, static_cast<int>(per_block ? s.B * N * nb : s.B * N), [&](int task) {
      const int64_t bn = per_block ? task % (s.B * N) : task;
      const int64_t blk0 = per_block ? nb - 1 - task / (s.B * N) : 0, blk1 = per_block ? blk0 + 1 : nb;
      const int64_t b = bn / N, n = bn % N;
      AttentionFwdHeadTiles(s, scale, pqkv + b * T * ld + n * H, py + b * T * C + n * H, plse + bn * T, blk0,
                            blk1);
    });
    return ffi::Error::Success();
  }
#endif
  ParallelFor(pool, static_cast<int>(s.B * N * nb), [&](int task) {
    // Largest blocks first: they take longest, and the small ones fill the gaps at the end.
    const int64_t bn = task % (s.B * N), blk = nb - 1 - task / (s.B * N);
    const int64_t b = bn / N, n = bn % N;
    const int64_t r0 = blk * kRows, rows = std::min(kRows, T - r0), keys = r0 + rows;
    const float* q = pqkv + b * T * ld + n * H;
    const float* k = q + C;
    const float* v = q + 2 * C;
    float* p = Scratch(0, rows * keys);
    g_sgemm(kRowMajor, kNoTrans, kTrans, rows, keys, H, scale, q + r0 * ld, ld, k, ld, 0.0f, p, keys);
    for (int64_t i = 0; i < rows; ++i) {
      float* row = p + i * keys;
      const int64_t valid = r0 + i + 1;  // keys 0 .. t
      float m = row[0];
#pragma omp simd reduction(max : m)
      for (int64_t j = 1; j < valid; ++j) m = row[j] > m ? row[j] : m;  // 5x faster than std::max here
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < valid; ++j) {
        row[j] = Exp(row[j] - m);
        sum += row[j];
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < valid; ++j) row[j] *= inv;
      std::fill(row + valid, row + keys, 0.0f);
      plse[bn * T + r0 + i] = m + std::log(sum);
    }
    g_sgemm(kRowMajor, kNoTrans, kNoTrans, rows, H, keys, 1.0f, p, keys, v, ld, 0.0f,
            py + (b * T + r0) * C + n * H, C);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> out,
                            ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                            ffi::ResultBuffer<ffi::F32> dqkv, float scale) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("jaxtrain attention: no sgemm was set");
  AttentionShape s;
  if (auto e = AttentionShapeOf(qkv, &s); e.failure()) return e;
  const int64_t T = s.T, N = s.N, H = s.H, C = s.C, ld = 3 * C, nb = s.blocks();
  const float* pqkv = qkv.typed_data();
  const float* py = out.typed_data();
  const float* plse = lse.typed_data();
  const float* pdy = dout.typed_data();
  float* pd = dqkv->typed_data();
  if (s.B * N * T == 0) return ffi::Error::Success();
#if defined(__AVX512F__)
  if (H % 16 == 0) {
    ParallelFor(pool, static_cast<int>(s.B * N), [&](int bn) {
      const int64_t b = bn / N, n = bn % N;
      AttentionBwdHeadTiles(s, scale, pqkv + b * T * ld + n * H, py + b * T * C + n * H, plse + bn * T,
                            pdy + b * T * C + n * H, pd + b * T * ld + n * H);
    });
    return ffi::Error::Success();
  }
#endif
  ParallelFor(pool, static_cast<int>(s.B * N), [&](int bn) {
    const int64_t b = bn / N, n = bn % N;
    const float* q = pqkv + b * T * ld + n * H;
    const float* k = q + C;
    const float* v = q + 2 * C;
    const float* y = py + b * T * C + n * H;
    const float* dy = pdy + b * T * C + n * H;
    float* dq = pd + b * T * ld + n * H;
    float* dk = dq + C;
    float* dv = dq + 2 * C;
    for (int64_t t = 0; t < T; ++t) {
      std::fill(dk + t * ld, dk + t * ld + H, 0.0f);
      std::fill(dv + t * ld, dv + t * ld + H, 0.0f);
    }
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t r0 = blk * kRows, rows = std::min(kRows, T - r0), keys = r0 + rows;
      float* p = Scratch(0, rows * keys);
      float* ds = Scratch(1, rows * keys);
      // P from the saved log-sum-exp; dP = dO V^T.
      g_sgemm(kRowMajor, kNoTrans, kTrans, rows, keys, H, scale, q + r0 * ld, ld, k, ld, 0.0f, p, keys);
      g_sgemm(kRowMajor, kNoTrans, kTrans, rows, keys, H, 1.0f, dy + r0 * C, C, v, ld, 0.0f, ds, keys);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = r0 + i, valid = t + 1;
        const float l = plse[bn * T + t];
        float dot = 0.0f;  // sum_j P_tj dP_tj = dO_t . O_t
#pragma omp simd reduction(+ : dot)
        for (int64_t h = 0; h < H; ++h) dot += dy[t * C + h] * y[t * C + h];
        float* prow = p + i * keys;
        float* drow = ds + i * keys;
#pragma omp simd
        for (int64_t j = 0; j < valid; ++j) {
          const float pj = Exp(prow[j] - l);
          prow[j] = pj;
          drow[j] = pj * (drow[j] - dot) * scale;
        }
        std::fill(prow + valid, prow + keys, 0.0f);
        std::fill(drow + valid, drow + keys, 0.0f);
      }
      // dQ = dS K, dK += dS^T Q, dV += P^T dO (dS already holds the scale).
      g_sgemm(kRowMajor, kNoTrans, kNoTrans, rows, H, keys, 1.0f, ds, keys, k, ld, 0.0f, dq + r0 * ld, ld);
      g_sgemm(kRowMajor, kTrans, kNoTrans, keys, H, rows, 1.0f, ds, keys, q + r0 * ld, ld, 1.0f, dk, ld);
      g_sgemm(kRowMajor, kTrans, kNoTrans, keys, H, rows, 1.0f, p, keys, dy + r0 * C, C, 1.0f, dv, ld);
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Bias + exact GELU on [M, F] rows.

constexpr int64_t kGeluRows = 32;  // rows per chunk

// [M, F] rows and a [F] vector (bias or scale); what names the kernel in the error.
ffi::Error RowsShapeOf(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& v, const char* what, int64_t* m,
                       int64_t* f) {
  auto d = x.dimensions();
  auto dv = v.dimensions();
  if (d.size() != 2 || dv.size() != 1 || dv[0] != d[1])
    return ffi::Error::InvalidArgument(std::string("jaxtrain ") + what + ": needs rows [M, F] and a vector [F]");
  *m = d[0];
  *f = d[1];
  return ffi::Error::Success();
}

// out[j] = the sum over chunks c of partial[c * stride + j], j < n, added in chunk
// order: the same result for any number of threads.
void SumChunks(const float* partial, int chunks, int64_t stride, int64_t n, float* out) {
  std::fill(out, out + n, 0.0f);
  for (int c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < n; ++j) out[j] += partial[c * stride + j];
}

ffi::Error GeluFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> bias,
                       ffi::ResultBuffer<ffi::F32> h) {
  int64_t M, F;
  if (auto e = RowsShapeOf(y, bias, "gelu", &M, &F); e.failure()) return e;
  const float* py = y.typed_data();
  const float* pb = bias.typed_data();
  float* ph = h->typed_data();
  ParallelFor(pool, static_cast<int>((M + kGeluRows - 1) / kGeluRows), [&](int c) {
    const int64_t end = std::min(M, (c + 1) * kGeluRows) * F;
    for (int64_t r = c * kGeluRows * F; r < end; r += F) {
#pragma omp simd
      for (int64_t j = 0; j < F; ++j) {
        const float u = py[r + j] + pb[j];
        ph[r + j] = u * NormalCdf(u);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error GeluBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> bias,
                       ffi::Buffer<ffi::F32> dh, ffi::ResultBuffer<ffi::F32> du,
                       ffi::ResultBuffer<ffi::F32> dbias) {
  int64_t M, F;
  if (auto e = RowsShapeOf(y, bias, "gelu", &M, &F); e.failure()) return e;
  const float* py = y.typed_data();
  const float* pb = bias.typed_data();
  const float* pdh = dh.typed_data();
  float* pdu = du->typed_data();
  float* pdb = dbias->typed_data();
  const int chunks = static_cast<int>((M + kGeluRows - 1) / kGeluRows);
  // Per-chunk column sums (SumChunks)
  std::vector<float> partial(static_cast<size_t>(chunks) * F);
  ParallelFor(pool, chunks, [&](int c) {
    float* acc = partial.data() + static_cast<int64_t>(c) * F;
    std::fill(acc, acc + F, 0.0f);
    const int64_t end = std::min(M, (c + 1) * kGeluRows) * F;
    for (int64_t r = c * kGeluRows * F; r < end; r += F) {
#pragma omp simd
      for (int64_t j = 0; j < F; ++j) {
        const float u = py[r + j] + pb[j];
        // gelu'(u) = Phi(u) + u phi(u)
        const float g = pdh[r + j] * (NormalCdf(u) + u * Exp(-0.5f * u * u) * 0.39894228040143268f);
        pdu[r + j] = g;
        acc[j] += g;
      }
    }
  });
  SumChunks(partial.data(), chunks, F, F, pdb);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// LayerNorm over the last axis of [M, C] rows.

constexpr int64_t kNormRows = 16;  // rows per chunk

ffi::Error LayerNormFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  int64_t M, C;
  if (auto e = RowsShapeOf(x, scale, "layer_norm", &M, &C); e.failure()) return e;
  if (C == 0) return ffi::Error::InvalidArgument("jaxtrain layer_norm: rows are empty");
  const float* px = x.typed_data();
  const float* pg = scale.typed_data();
  const float* pb = bias.typed_data();
  float* py = y->typed_data();
  float* pm = mean->typed_data();
  float* pr = rstd->typed_data();
  ParallelFor(pool, static_cast<int>((M + kNormRows - 1) / kNormRows), [&](int c) {
    for (int64_t i = c * kNormRows; i < std::min(M, (c + 1) * kNormRows); ++i) {
      const float* xr = px + i * C;
      float* yr = py + i * C;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < C; ++j) sum += xr[j];
      const float mu = sum / C;
      float sq = 0.0f;  // two passes over a row in cache: no cancellation in E[x^2] - E[x]^2
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < C; ++j) sq += (xr[j] - mu) * (xr[j] - mu);
      const float r = 1.0f / std::sqrt(sq / C + eps);
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) yr[j] = (xr[j] - mu) * r * pg[j] + pb[j];
      pm[i] = mu;
      pr[i] = r;
    }
  });
  return ffi::Error::Success();
}

ffi::Error LayerNormBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                            ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                            ffi::ResultBuffer<ffi::F32> dbias) {
  int64_t M, C;
  if (auto e = RowsShapeOf(x, scale, "layer_norm", &M, &C); e.failure()) return e;
  const float* px = x.typed_data();
  const float* pg = scale.typed_data();
  const float* pm = mean.typed_data();
  const float* pr = rstd.typed_data();
  const float* pdy = dy.typed_data();
  float* pdx = dx->typed_data();
  const int chunks = static_cast<int>((M + kNormRows - 1) / kNormRows);
  // Per-chunk sums of dy * xhat and of dy (SumChunks)
  std::vector<float> partial(static_cast<size_t>(chunks) * 2 * C);
  ParallelFor(pool, chunks, [&](int c) {
    float* acc_g = partial.data() + static_cast<int64_t>(c) * 2 * C;
    float* acc_b = acc_g + C;
    std::fill(acc_g, acc_g + 2 * C, 0.0f);
    for (int64_t i = c * kNormRows; i < std::min(M, (c + 1) * kNormRows); ++i) {
      const float* xr = px + i * C;
      const float* dyr = pdy + i * C;
      float* dxr = pdx + i * C;
      const float* gamma = pg;  // a local copy: read through the lambda's capture, the loop stayed scalar
      const float mu = pm[i], r = pr[i];
      float s1 = 0.0f, s2 = 0.0f;  // sums of g = dy * scale and of g * xhat
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t j = 0; j < C; ++j) {
        const float g = dyr[j] * gamma[j];
        s1 += g;
        s2 += g * ((xr[j] - mu) * r);
      }
      const float m1 = s1 / C, m2 = s2 / C;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const float xhat = (xr[j] - mu) * r;
        acc_g[j] += dyr[j] * xhat;
        acc_b[j] += dyr[j];
        dxr[j] = r * (dyr[j] * gamma[j] - m1 - xhat * m2);
      }
    }
  });
  SumChunks(partial.data(), chunks, 2 * C, C, dscale->typed_data());
  SumChunks(partial.data() + C, chunks, 2 * C, C, dbias->typed_data());
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------
// AdamW: one pass over a parameter's gradient, value and moments.

// Hyper-parameters, in the order of the hp operand (fused_optim.py fills it).
enum { kNorm, kMaxNorm, kB1, kB2, kEps, kEpsRoot, kDecay, kLr, kBc1, kBc2, kApply, kNumHp };
constexpr int64_t kAdamChunk = 16384;

// One chunk [lo, hi): optax's clip_by_global_norm, scale_by_adam,
// add_decayed_weights, scale_by_learning_rate and apply_updates, operation by
// operation; sums[0] += u^2, sums[1] += p'^2 (in double).
template <bool kClip, bool kDecayed>
void AdamWChunk(const float* g, const float* p, const float* mu, const float* nu, const float* hp, float* po,
                float* muo, float* nuo, int64_t lo, int64_t hi, double* sums) {
  const float norm = hp[kNorm], max_norm = hp[kMaxNorm], b1 = hp[kB1], b2 = hp[kB2], eps = hp[kEps];
  const float eps_root = hp[kEpsRoot], wd = hp[kDecay], step = -1.0f * hp[kLr], bc1 = hp[kBc1], bc2 = hp[kBc2];
  const float c1 = 1.0f - b1, c2 = 1.0f - b2;
  const bool apply = hp[kApply] != 0.0f;
  double su = 0.0, sp = 0.0;
#pragma omp simd reduction(+ : su, sp)
  for (int64_t i = lo; i < hi; ++i) {
    // All loads first: the outputs may be the inputs' own buffers.
    const float gi = g[i], pi = p[i], mi = mu[i], vi = nu[i];
    const float gc = kClip ? (gi / norm) * max_norm : gi;
    const float m = c1 * gc + b1 * mi;
    const float v = c2 * (gc * gc) + b2 * vi;
    float u = (m / bc1) / (std::sqrt(v / bc2 + eps_root) + eps);
    if (kDecayed) u = u + wd * pi;
    u = step * u;
    const float pn = apply ? pi + u : pi;
    po[i] = pn;
    muo[i] = apply ? m : mi;
    nuo[i] = apply ? v : vi;
    su += static_cast<double>(u) * u;
    sp += static_cast<double>(pn) * pn;
  }
  sums[0] += su;
  sums[1] += sp;
}

ffi::Error AdamWImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> p,
                     ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> hp,
                     ffi::ResultBuffer<ffi::F32> p_out, ffi::ResultBuffer<ffi::F32> mu_out,
                     ffi::ResultBuffer<ffi::F32> nu_out, ffi::ResultBuffer<ffi::F32> sums, bool decayed) {
  const int64_t n = g.element_count();
  if (p.element_count() != n || mu.element_count() != n || nu.element_count() != n || hp.element_count() != kNumHp)
    return ffi::Error::InvalidArgument("jaxtrain adamw: gradient, parameter and moments differ in size, or hp "
                                       "is not [11]");
  const float* h = hp.typed_data();
  // optax's clip_by_global_norm: t if norm < max_norm else (t / norm) * max_norm; max_norm <= 0: no clip.
  const bool clip = h[kMaxNorm] > 0.0f && !(h[kNorm] < h[kMaxNorm]);
  auto kernel = clip ? (decayed ? AdamWChunk<true, true> : AdamWChunk<true, false>)
                     : (decayed ? AdamWChunk<false, true> : AdamWChunk<false, false>);
  const int chunks = static_cast<int>(std::max<int64_t>(1, (n + kAdamChunk - 1) / kAdamChunk));
  std::vector<double> partial(2 * static_cast<size_t>(chunks), 0.0);
  const float *pg = g.typed_data(), *pp = p.typed_data(), *pm = mu.typed_data(), *pv = nu.typed_data();
  float *po = p_out->typed_data(), *pmo = mu_out->typed_data(), *pvo = nu_out->typed_data();
  auto run = [&](int c) {
    kernel(pg, pp, pm, pv, h, po, pmo, pvo, c * kAdamChunk, std::min(n, (c + 1) * kAdamChunk), &partial[2 * c]);
  };
  ParallelFor(pool, chunks, run);
  double su = 0.0, sp = 0.0;
  for (int c = 0; c < chunks; ++c) su += partial[2 * c], sp += partial[2 * c + 1];
  sums->typed_data()[0] = static_cast<float>(su);
  sums->typed_data()[1] = static_cast<float>(sp);
  return ffi::Error::Success();
}

}  // namespace

// Bindings: each handler's arguments, results and attributes, in order.
using F32 = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainGemm, GemmImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>()  // a, b
                                  .Ret<F32>()             // c
                                  .Attr<bool>("trans_a").Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainAttentionFwd, AttentionFwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()              // qkv [B, T, 3, N, H]
                                  .Ret<F32>().Ret<F32>()   // out [B, T, N, H], lse [B, N, T]
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainAttentionBwd, AttentionBwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()  // qkv, out, lse, dout
                                  .Ret<F32>()                                   // dqkv
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainGeluFwd, GeluFwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>()  // y [M, F], bias [F]
                                  .Ret<F32>());           // h

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainGeluBwd, GeluBwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>()  // y, bias, dh
                                  .Ret<F32>().Ret<F32>());           // dy, dbias

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainLayerNormFwd, LayerNormFwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>()  // x [M, C], scale [C], bias [C]
                                  .Ret<F32>().Ret<F32>().Ret<F32>()  // y, mean [M], rstd [M]
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainLayerNormBwd, LayerNormBwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()  // x, scale, mean, rstd, dy
                                  .Ret<F32>().Ret<F32>().Ret<F32>());  // dx, dscale, dbias

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainAdamW, AdamWImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()  // grad, param, mu, nu
                                  .Arg<F32>()                                   // hp [11]
                                  .Ret<F32>().Ret<F32>().Ret<F32>()             // param, mu, nu (aliased)
                                  .Ret<F32>()                                   // [sum u^2, sum param^2]
                                  .Attr<bool>("decayed"));
