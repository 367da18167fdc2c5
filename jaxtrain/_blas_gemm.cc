// jaxtrain: float32 (batched) matrix products on CPU as an XLA FFI handler.
//
// C = op(A) op(B) over the last two axes (row-major, any number of leading
// batch axes), op an optional transpose given by the trans_a / trans_b
// attributes, as one CBLAS call: cblas_sgemm, or cblas_sgemm_batch_strided
// when there are batch axes and the library has it. The functions' addresses
// are handed in at load time (jaxtrain_gemm_set), so this file needs no BLAS
// headers or link flags; the BLAS runs with its own threads.
#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

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

extern "C" void jaxtrain_gemm_set(void* sgemm, void* sgemm_batch_strided) {
  g_sgemm = reinterpret_cast<sgemm_fn>(sgemm);
  g_sgemm_batch = reinterpret_cast<sgemm_batch_strided_fn>(sgemm_batch_strided);
}

namespace {

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

ffi::Error GemmImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                    bool trans_a, bool trans_b) {
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
  if (batch == 1) {
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainGemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
