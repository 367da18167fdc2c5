// jaxtrain: work sharing on XLA's intra-op thread pool, for the FFI handlers
// (_cpu_kernels.cc, _onednn_gemm.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxtrain {

// `total` chunks, taken by whichever thread asks next.
struct Chunks {
  explicit Chunks(int n) : total(n) {}
  const int total;
  std::atomic<int> next{0};
  int done = 0;  // guarded by mu
  std::mutex mu;
  std::condition_variable cv;
};

// Takes chunks until none is left; f is only dereferenced for a chunk taken,
// which the caller of ParallelFor is still waiting for, so a pool task that
// starts late never touches the caller's (possibly gone) stack.
template <typename F>
void RunChunks(Chunks& c, const F* f) {
  for (int i; (i = c.next.fetch_add(1)) < c.total;) {
    (*f)(i);
    std::lock_guard<std::mutex> lock(c.mu);
    if (++c.done == c.total) c.cv.notify_all();
  }
}

// f(0) ... f(n - 1) on this thread and on up to pool.num_threads() - 1 pool
// threads; each thread takes its chunks through run(chunks, &f) (RunChunks,
// or a wrapper that sets the thread up first). Only chunks already started
// elsewhere are waited for, never queued tasks, so a busy pool cannot
// deadlock it: a late task finds nothing left and returns.
template <typename F, typename Run>
void ParallelFor(xla::ffi::ThreadPool& pool, int n, const F& f, Run run) {
  const int helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  auto chunks = std::make_shared<Chunks>(n);
  for (int t = 0; t < helpers; ++t) {
    pool.Schedule([chunks, fp = &f, run]() {
      if (chunks->next.load() >= chunks->total) return;
      run(*chunks, fp);
    });
  }
  run(*chunks, &f);
  std::unique_lock<std::mutex> lock(chunks->mu);
  chunks->cv.wait(lock, [&] { return chunks->done == chunks->total; });
}

}  // namespace jaxtrain
