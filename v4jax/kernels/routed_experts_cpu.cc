// Routed-expert SwiGLU FFNs of a few (token, slot) rows, reading each row's expert weights in place.
//
// out[t, k] = W2[e]ᵀ · swiglu(W1[e]ᵀ x[t], W3[e]ᵀ x[t]),  e = expert[t, k]  (float32; ids outside [0, E) give 0)
//   x [T, D], expert [T, K] int32, w1 / w3 [E, D, M], w2 [E, M, D]  ->  out [T, K, D]
// swiglu(g, u) = silu(min(g, L)) · clip(u, −L, L) with L = `limit` (+inf: no clamp).
//
// XLA:CPU copies a dynamically sliced expert matrix before its matrix-vector product; this kernel streams the
// chosen experts' rows straight from the stacked weights. Each row's work is cut into `split` gate/up tasks
// (a contiguous block of D rows of W1 and W3 each: partial sums of g and u) and `split` down tasks (a block
// of M rows of W2: a partial sum of the output), so that both threads stream at full speed to the end of the
// call whatever the number of rows. Tasks are shared out over XLA's intra-op thread pool from one counter,
// gate/up tasks first: the caller takes tasks too and waits only for tasks that another thread has already
// taken (never for a queued one), so it cannot deadlock on a busy pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;
  const int32_t* expert;
  const float* w1;
  const float* w3;
  const float* w2;
  int64_t num_experts, k, d, m;
  float limit;
};

// One call's tasks: rows · split gate/up tasks, then rows · split down tasks, taken in that order from one
// counter. A down task needs its row's gate/up tasks finished (taken long before it, except at the end).
struct Work {
  Problem p;
  int64_t rows, split;
  std::vector<float> gate_up;   // [rows, split, 2, M] partial sums over a D chunk
  std::vector<float> partial;   // [rows, split, D] partial sums over an M chunk
  std::unique_ptr<std::atomic<int64_t>[]> gate_up_done;  // [rows] finished gate/up tasks
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mu;
  std::condition_variable all_done;

  bool Valid(int64_t r) const { return p.expert[r] >= 0 && p.expert[r] < p.num_experts; }

  void GateUp(int64_t r, int64_t c) {
    const int64_t d = p.d, m = p.m, i0 = c * d / split, i1 = (c + 1) * d / split;
    float* __restrict g = gate_up.data() + (r * split + c) * 2 * m;
    float* __restrict u = g + m;
    std::fill(g, g + 2 * m, 0.0f);
    if (!Valid(r)) return;
    const int64_t e = p.expert[r];
    const float* x = p.x + (r / p.k) * d;
    const float* w1 = p.w1 + e * d * m;
    const float* w3 = p.w3 + e * d * m;
    for (int64_t i = i0; i < i1; ++i) {
      const float xi = x[i];
      const float* __restrict a = w1 + i * m;
      const float* __restrict b = w3 + i * m;
      for (int64_t j = 0; j < m; ++j) {
        g[j] += xi * a[j];
        u[j] += xi * b[j];
      }
    }
  }

  void Down(int64_t r, int64_t c) {
    const int64_t d = p.d, m = p.m, j0 = c * m / split, j1 = (c + 1) * m / split;
    float* __restrict y = partial.data() + (r * split + c) * d;
    std::fill(y, y + d, 0.0f);
    if (!Valid(r)) return;
    const float* w2 = p.w2 + static_cast<int64_t>(p.expert[r]) * m * d;
    const float* parts = gate_up.data() + r * split * 2 * m;
    for (int64_t j = j0; j < j1; ++j) {
      float gj = 0.0f, uj = 0.0f;
      for (int64_t s = 0; s < split; ++s) {
        gj += parts[s * 2 * m + j];
        uj += parts[s * 2 * m + m + j];
      }
      gj = std::min(gj, p.limit);
      uj = std::min(std::max(uj, -p.limit), p.limit);
      const float hj = gj / (1.0f + std::exp(-gj)) * uj;
      const float* __restrict w = w2 + j * d;
      for (int64_t i = 0; i < d; ++i) y[i] += hj * w[i];
    }
  }

  void Run() {
    const int64_t tasks = 2 * rows * split;
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
      if (t < rows * split) {
        GateUp(t / split, t % split);
        gate_up_done[t / split].fetch_add(1, std::memory_order_release);
      } else {
        const int64_t r = (t - rows * split) / split;
        while (gate_up_done[r].load(std::memory_order_acquire) < split) std::this_thread::yield();
        Down(r, (t - rows * split) % split);
      }
      if (finished.fetch_add(1) + 1 == tasks) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

ffi::Error RoutedExperts(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> expert,
                         ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w3, ffi::Buffer<ffi::F32> w2,
                         ffi::ResultBuffer<ffi::F32> out, float limit, int64_t split) {
  const auto xd = x.dimensions(), ed = expert.dimensions(), w1d = w1.dimensions(), w2d = w2.dimensions(),
             w3d = w3.dimensions();
  if (xd.size() != 2 || ed.size() != 2 || w1d.size() != 3 || w2d.size() != 3 || w3d.size() != 3 ||
      ed[0] != xd[0] || w1d[1] != xd[1] || w2d[2] != xd[1] || w2d[1] != w1d[2] || w2d[0] != w1d[0] ||
      w3d[0] != w1d[0] || w3d[1] != w1d[1] || w3d[2] != w1d[2]) {
    return ffi::Error::InvalidArgument("routed_experts: expected x [T, D], expert [T, K], w1 = w3 [E, D, M], "
                                       "w2 [E, M, D]");
  }
  if (split < 1) return ffi::Error::InvalidArgument("routed_experts: split must be at least 1");
  const int64_t rows = ed[0] * ed[1], d = xd[1], m = w1d[2];
  if (rows == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work>();
  work->p = Problem{x.typed_data(), expert.typed_data(), w1.typed_data(), w3.typed_data(),
                    w2.typed_data(), w1d[0], ed[1], d, m, limit};
  work->rows = rows;
  work->split = split;
  work->gate_up.resize(rows * split * 2 * m);
  work->partial.resize(rows * split * d);
  work->gate_up_done.reset(new std::atomic<int64_t>[rows]);
  for (int64_t r = 0; r < rows; ++r) work->gate_up_done[r].store(0);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), 2 * rows * split) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  {
    std::unique_lock<std::mutex> lock(work->mu);
    work->all_done.wait(lock, [&] { return work->finished.load() == 2 * rows * split; });
  }
  float* out_data = out->typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict y = out_data + r * d;
    const float* part = work->partial.data() + r * split * d;
    std::copy(part, part + d, y);
    for (int64_t s = 1; s < split; ++s)
      for (int64_t i = 0; i < d; ++i) y[i] += part[s * d + i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(V4jaxRoutedExpertsF32, RoutedExperts,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("limit")
                                  .Attr<int64_t>("split"));
