// jaxtrain: bfloat16 matrix products on CPU through oneDNN, as an XLA FFI handler
// (see jaxtrain/cpu/onednn.py).
//
// JaxtrainBf16Gemm: C = op(A) op(B) for 2-D bfloat16 A and B, float32 C (float32
// accumulation), op an optional transpose given by the trans_a / trans_b
// attributes. oneDNN's matmul runs on CPUs with AVX512-BF16 (or AMX) at about twice
// the float32 rate. The product is cut into one band of C's rows (or columns, when
// C is wider than tall) per thread of XLA's intra-op pool, and each band runs as a
// single-threaded oneDNN matmul on that thread: no OpenMP threads compete with
// XLA's for the cores. Primitives are created once per band shape and kept.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"
#include "_thread_pool.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A single-threaded matmul for one band: op(A) [m, k] with strides (as0, as1),
// op(B) [k, n] with strides (bs0, bs1), C [m, n] with row stride ldc.
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct Primitive {
  dnnl::matmul matmul;
  memory::desc a, b, c, scratch;
};

const Primitive& Get(const Key& key) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Primitive>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  const auto [m, n, k, as0, as1, bs0, bs1, ldc] = key;
  memory::desc a({m, k}, memory::data_type::bf16, memory::dims{as0, as1});
  memory::desc b({k, n}, memory::data_type::bf16, memory::dims{bs0, bs1});
  memory::desc c({m, n}, memory::data_type::f32, memory::dims{ldc, 1});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per-thread buffers: bands run concurrently
  dnnl::matmul::primitive_desc pd(Engine(), a, b, c, attr);
  auto p = std::make_unique<Primitive>(Primitive{dnnl::matmul(pd), a, b, c, pd.scratchpad_desc()});
  return *cache.emplace(key, std::move(p)).first->second;
}

void RunBand(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t as0, int64_t as1, const uint16_t* b,
             int64_t bs0, int64_t bs1, float* c, int64_t ldc) {
  omp_set_num_threads(1);  // this thread's oneDNN calls stay on this thread
  const Primitive& p = Get(Key{m, n, k, as0, as1, bs0, bs1, ldc});
  thread_local dnnl::stream stream(Engine());
  thread_local std::vector<uint8_t> scratch;
  if (scratch.size() < p.scratch.get_size()) scratch.resize(p.scratch.get_size());
  memory am(p.a, Engine(), const_cast<uint16_t*>(a)), bm(p.b, Engine(), const_cast<uint16_t*>(b));
  memory cm(p.c, Engine(), c), sm(p.scratch, Engine(), scratch.data());
  p.matmul.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm},
                            {DNNL_ARG_SCRATCHPAD, sm}});
  stream.wait();
}

ffi::Error Bf16GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                        ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != 2 || db.size() != 2) return ffi::Error::InvalidArgument("jaxtrain bf16 gemm: operands must be 2-D");
  const int64_t ar = da[0], ac = da[1], br = db[0], bc = db[1];
  const int64_t m = trans_a ? ac : ar, k = trans_a ? ar : ac;
  const int64_t n = trans_b ? br : bc, kb = trans_b ? bc : br;
  if (k != kb) return ffi::Error::InvalidArgument("jaxtrain bf16 gemm: contraction sizes differ");
  const auto* pa = reinterpret_cast<const uint16_t*>(a.untyped_data());
  const auto* pb = reinterpret_cast<const uint16_t*>(b.untyped_data());
  float* pc = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(pc, pc + m * n, 0.0f);
    return ffi::Error::Success();
  }
  // Strides of op(A) [m, k] and op(B) [k, n] over the row-major storage.
  const int64_t as0 = trans_a ? 1 : ac, as1 = trans_a ? ac : 1;
  const int64_t bs0 = trans_b ? 1 : bc, bs1 = trans_b ? bc : 1;
  const int parts = std::max<int>(1, static_cast<int>(pool.num_threads()));
  const bool rows = m >= n;
  const int64_t len = rows ? m : n;
  const int64_t band = ((len + parts - 1) / parts + 15) / 16 * 16;
  const int bands = static_cast<int>((len + band - 1) / band);
  std::string error;
  std::mutex error_mu;
  auto run = [&](int i) {
    const int64_t lo = i * band, size = std::min(len, lo + band) - lo;
    try {
      if (rows)
        RunBand(size, n, k, pa + lo * as0, as0, as1, pb, bs0, bs1, pc + lo * n, n);
      else
        RunBand(m, size, k, pa, as0, as1, pb + lo * bs1, bs0, bs1, pc + lo, n);
    } catch (const dnnl::error& e) {
      std::lock_guard<std::mutex> lock(error_mu);
      error = e.what();
    }
  };
  if (bands == 1)
    run(0);
  else
    jaxtrain::ParallelFor(pool, bands, run, [](jaxtrain::Chunks& c, const decltype(run)* f) { jaxtrain::RunChunks(c, f); });
  if (!error.empty()) return ffi::Error::Internal("jaxtrain bf16 gemm: oneDNN: " + error);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainBf16Gemm, Bf16GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
