// Routed-expert SwiGLU FFNs of a few (token, slot) rows, reading the chosen experts' weights in place.
//
// out[t, k] = W2[e]ᵀ · swiglu(W1[e]ᵀ x[t], W3[e]ᵀ x[t]),  e = expert[t, k]  (float32; ids outside [0, E) give 0)
//   x [T, D], expert [T, K] int32, w1 / w3 [E, D, M], w2 [E, M, D]  ->  out [T, K, D]
// swiglu(g, u) = silu(min(g, L)) · clip(u, −L, L) with L = `limit` (+inf: no clamp).
//
// XLA:CPU copies a dynamically sliced expert matrix before its matrix-vector product; this kernel streams the
// chosen experts' rows straight from the stacked weights. Rows are grouped by expert, and each expert's
// weights are read once for all of its rows (up to 4 rows share each weight row while it is in L1). Each
// expert's work is cut into `split` gate/up tasks (a contiguous block of D rows of W1 and W3: partial sums of
// g and u) and `split` down tasks (a block of M rows of W2: a partial sum of the output), so that both threads
// stream at full speed to the end of the call whatever the number of experts. Tasks are shared out over
// XLA's intra-op thread pool from one counter, gate/up tasks first: the caller takes tasks too and waits only
// for tasks that another thread has already taken (never for a queued one), so it cannot deadlock on a busy
// pool.
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

constexpr int kBlock = 4;  // rows that share each weight row while it is in L1

// gate/up of n ≤ kBlock rows over the weight rows [i0, i1): g[r] += x[r][i] · W1[i, :], u[r] likewise with W3.
template <int N>
void GateUpRows(const float* const* x, float* const* g, float* const* u, const float* w1, const float* w3,
                int64_t i0, int64_t i1, int64_t m) {
  for (int64_t i = i0; i < i1; ++i) {
    const float* __restrict a = w1 + i * m;
    const float* __restrict b = w3 + i * m;
    float xi[N];
    for (int r = 0; r < N; ++r) xi[r] = x[r][i];
#pragma GCC ivdep
    for (int64_t j = 0; j < m; ++j) {
      const float aj = a[j], bj = b[j];
      for (int r = 0; r < N; ++r) {
        g[r][j] += xi[r] * aj;
        u[r][j] += xi[r] * bj;
      }
    }
  }
}

// down of n ≤ kBlock rows over the weight rows [j0, j1): y[r] += h[r][j − j0] · W2[j, :].
template <int N>
void DownRows(const float* const* h, float* const* y, const float* w2, int64_t j0, int64_t j1, int64_t d) {
  for (int64_t j = j0; j < j1; ++j) {
    const float* __restrict w = w2 + j * d;
    float hj[N];
    for (int r = 0; r < N; ++r) hj[r] = h[r][j - j0];
#pragma GCC ivdep
    for (int64_t i = 0; i < d; ++i) {
      const float wi = w[i];
      for (int r = 0; r < N; ++r) y[r][i] += hj[r] * wi;
    }
  }
}

// One call's tasks. The valid rows are grouped by expert (`order`, `group_start`): a group's tasks read its
// expert's weights once for all its rows. Tasks: groups · split gate/up tasks, then groups · split down
// tasks, taken in that order from one counter; a down task needs its group's gate/up tasks finished (taken
// long before it, except at the end).
struct Work {
  Problem p;
  int64_t split;
  std::vector<int64_t> order;        // valid rows, sorted by expert
  std::vector<int64_t> group_start;  // [groups + 1] offsets into order
  std::vector<float> gate_up;        // [rows, split, 2, M] partial sums over a D chunk
  std::vector<float> partial;        // [rows, split, D] partial sums over an M chunk
  std::unique_ptr<std::atomic<int64_t>[]> gate_up_done;  // [groups] finished gate/up tasks
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mu;
  std::condition_variable all_done;

  int64_t Groups() const { return static_cast<int64_t>(group_start.size()) - 1; }

  void GateUp(int64_t group, int64_t c) {
    const int64_t d = p.d, m = p.m, i0 = c * d / split, i1 = (c + 1) * d / split;
    const int64_t e = p.expert[order[group_start[group]]];
    const float* w1 = p.w1 + e * d * m;
    const float* w3 = p.w3 + e * d * m;
    for (int64_t r0 = group_start[group]; r0 < group_start[group + 1]; r0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, group_start[group + 1] - r0));
      const float* x[kBlock];
      float* g[kBlock];
      float* u[kBlock];
      for (int r = 0; r < n; ++r) {
        x[r] = p.x + (order[r0 + r] / p.k) * d;
        g[r] = gate_up.data() + (order[r0 + r] * split + c) * 2 * m;
        u[r] = g[r] + m;
        std::fill(g[r], g[r] + 2 * m, 0.0f);
      }
      switch (n) {
        case 1: GateUpRows<1>(x, g, u, w1, w3, i0, i1, m); break;
        case 2: GateUpRows<2>(x, g, u, w1, w3, i0, i1, m); break;
        case 3: GateUpRows<3>(x, g, u, w1, w3, i0, i1, m); break;
        default: GateUpRows<kBlock>(x, g, u, w1, w3, i0, i1, m);
      }
    }
  }

  void Down(int64_t group, int64_t c) {
    const int64_t d = p.d, m = p.m, j0 = c * m / split, j1 = (c + 1) * m / split;
    const float* w2 = p.w2 + static_cast<int64_t>(p.expert[order[group_start[group]]]) * m * d;
    std::vector<float> h(kBlock * (j1 - j0));
    for (int64_t r0 = group_start[group]; r0 < group_start[group + 1]; r0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, group_start[group + 1] - r0));
      const float* hr[kBlock];
      float* y[kBlock];
      for (int r = 0; r < n; ++r) {
        const int64_t row = order[r0 + r];
        const float* parts = gate_up.data() + row * split * 2 * m;
        float* hrow = h.data() + r * (j1 - j0);
        for (int64_t j = j0; j < j1; ++j) {  // h = swiglu(Σ_chunks g, Σ_chunks u)
          float gj = 0.0f, uj = 0.0f;
          for (int64_t s = 0; s < split; ++s) {
            gj += parts[s * 2 * m + j];
            uj += parts[s * 2 * m + m + j];
          }
          gj = std::min(gj, p.limit);
          uj = std::min(std::max(uj, -p.limit), p.limit);
          hrow[j - j0] = gj / (1.0f + std::exp(-gj)) * uj;
        }
        hr[r] = hrow;
        y[r] = partial.data() + (row * split + c) * d;
        std::fill(y[r], y[r] + d, 0.0f);
      }
      switch (n) {
        case 1: DownRows<1>(hr, y, w2, j0, j1, d); break;
        case 2: DownRows<2>(hr, y, w2, j0, j1, d); break;
        case 3: DownRows<3>(hr, y, w2, j0, j1, d); break;
        default: DownRows<kBlock>(hr, y, w2, j0, j1, d);
      }
    }
  }

  void Run() {
    const int64_t half = Groups() * split, tasks = 2 * half;
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
      if (t < half) {
        GateUp(t / split, t % split);
        gate_up_done[t / split].fetch_add(1, std::memory_order_release);
      } else {
        const int64_t group = (t - half) / split;
        while (gate_up_done[group].load(std::memory_order_acquire) < split) std::this_thread::yield();
        Down(group, (t - half) % split);
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
  work->split = split;
  const int64_t num_experts = w1d[0];
  std::vector<int64_t> count(num_experts + 1, 0);  // counting sort of the valid rows by expert
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t e = work->p.expert[r];
    if (e >= 0 && e < num_experts) ++count[e + 1];
  }
  work->group_start.push_back(0);
  for (int64_t e = 0; e < num_experts; ++e) {
    if (count[e + 1]) work->group_start.push_back(work->group_start.back() + count[e + 1]);
    count[e + 1] += count[e];
  }
  work->order.resize(work->group_start.back());
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t e = work->p.expert[r];
    if (e >= 0 && e < num_experts) work->order[count[e]++] = r;
  }
  work->gate_up.resize(rows * split * 2 * m);
  work->partial.assign(rows * split * d, 0.0f);  // padding rows keep zeros
  const int64_t groups = work->Groups(), tasks = 2 * groups * split;
  work->gate_up_done.reset(new std::atomic<int64_t>[groups]);
  for (int64_t g = 0; g < groups; ++g) work->gate_up_done[g].store(0);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  {
    std::unique_lock<std::mutex> lock(work->mu);
    work->all_done.wait(lock, [&] { return work->finished.load() == tasks; });
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
