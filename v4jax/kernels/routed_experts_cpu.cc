// Routed-expert SwiGLU FFNs of a few (token, slot) rows, reading each row's expert weights in place.
//
// out[t, k] = W2[e]ᵀ · swiglu(W1[e]ᵀ x[t], W3[e]ᵀ x[t]),  e = expert[t, k]  (float32; ids outside [0, E) give 0)
//   x [T, D], expert [T, K] int32, w1 / w3 [E, D, M], w2 [E, M, D]  ->  out [T, K, D]
// swiglu(g, u) = silu(min(g, L)) · clip(u, −L, L) with L = `limit` (+inf: no clamp).
//
// XLA:CPU copies a dynamically sliced expert matrix before its matrix-vector product; this kernel streams the
// chosen experts' rows straight from the stacked weights. Rows are shared out over XLA's intra-op thread pool:
// the caller claims rows too and waits only for rows that another thread has already claimed (never for a
// queued task), so it cannot deadlock on a busy pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
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
  float* out;
  int64_t num_experts, k, d, m;
  float limit;
};

// One (token, slot) row: out[r] = FFN_e(x[r / K]).
void ExpertRow(const Problem& p, int64_t r, std::vector<float>& scratch) {
  float* y = p.out + r * p.d;
  const int32_t e = p.expert[r];
  if (e < 0 || e >= p.num_experts) {
    std::fill(y, y + p.d, 0.0f);
    return;
  }
  const int64_t d = p.d, m = p.m;
  const float* x = p.x + (r / p.k) * d;
  const float* w1 = p.w1 + static_cast<int64_t>(e) * d * m;
  const float* w3 = p.w3 + static_cast<int64_t>(e) * d * m;
  const float* w2 = p.w2 + static_cast<int64_t>(e) * m * d;
  scratch.assign(2 * m, 0.0f);
  float* __restrict g = scratch.data();
  float* __restrict u = g + m;
  for (int64_t i = 0; i < d; ++i) {  // gate and up: one pass over the rows of W1 and W3
    const float xi = x[i];
    const float* __restrict a = w1 + i * m;
    const float* __restrict b = w3 + i * m;
    for (int64_t j = 0; j < m; ++j) {
      g[j] += xi * a[j];
      u[j] += xi * b[j];
    }
  }
  for (int64_t j = 0; j < m; ++j) {
    const float gj = std::min(g[j], p.limit);
    const float uj = std::min(std::max(u[j], -p.limit), p.limit);
    g[j] = gj / (1.0f + std::exp(-gj)) * uj;
  }
  std::fill(y, y + d, 0.0f);
  for (int64_t j = 0; j < m; ++j) {  // down: y += h[j] · W2[j, :]
    const float hj = g[j];
    const float* __restrict c = w2 + j * d;
    for (int64_t i = 0; i < d; ++i) y[i] += hj * c[i];
  }
}

struct Work {
  Problem problem;
  int64_t rows;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mu;
  std::condition_variable all_done;

  void Run() {
    std::vector<float> scratch;
    for (int64_t r = next.fetch_add(1); r < rows; r = next.fetch_add(1)) {
      ExpertRow(problem, r, scratch);
      if (finished.fetch_add(1) + 1 == rows) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

ffi::Error RoutedExperts(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> expert,
                         ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w3, ffi::Buffer<ffi::F32> w2,
                         ffi::ResultBuffer<ffi::F32> out, float limit) {
  const auto xd = x.dimensions(), ed = expert.dimensions(), w1d = w1.dimensions(), w2d = w2.dimensions(),
             w3d = w3.dimensions();
  if (xd.size() != 2 || ed.size() != 2 || w1d.size() != 3 || w2d.size() != 3 || w3d.size() != 3 ||
      ed[0] != xd[0] || w1d[1] != xd[1] || w2d[2] != xd[1] || w2d[1] != w1d[2] || w2d[0] != w1d[0] ||
      w3d[0] != w1d[0] || w3d[1] != w1d[1] || w3d[2] != w1d[2]) {
    return ffi::Error::InvalidArgument("routed_experts: expected x [T, D], expert [T, K], w1 = w3 [E, D, M], "
                                       "w2 [E, M, D]");
  }
  auto work = std::make_shared<Work>();
  work->problem = Problem{x.typed_data(), expert.typed_data(), w1.typed_data(), w3.typed_data(),
                          w2.typed_data(), out->typed_data(), w1d[0], ed[1], xd[1], w1d[2], limit};
  work->rows = ed[0] * ed[1];
  if (work->rows == 0) return ffi::Error::Success();
  const int64_t helpers = std::min(pool.num_threads(), work->rows) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->all_done.wait(lock, [&] { return work->finished.load() == work->rows; });
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
                                  .Attr<float>("limit"));
