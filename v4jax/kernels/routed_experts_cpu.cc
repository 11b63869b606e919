// Routed-expert SwiGLU FFNs of a few (token, slot) rows, reading the chosen experts' weights in place.
//
// out[t, k] = W2[e]ᵀ · swiglu(W1[e]ᵀ x[t], W3[e]ᵀ x[t]),  e = expert[t, k]  (float32; ids outside [0, E) give 0)
//   x [T, D], expert [T, K] int32, w1 / w3 [E, D, M], w2 [E, M, D]  ->  out [T, K, D]
// swiglu(g, u) = silu(min(g, L)) · clip(u, −L, L) with L = `limit` (+inf: no clamp).
// The second handler also runs a shared expert sw1 / sw3 [D, S], sw2 [S, D] on every token in the same call:
//   -> out [T, K + 1, D], out[t, K] = sw2ᵀ · swiglu(sw1ᵀ x[t], sw3ᵀ x[t]).
//
// XLA:CPU copies a dynamically sliced expert matrix before its matrix-vector product; this kernel streams the
// chosen experts' rows straight from the stacked weights. Rows are grouped by FFN (each chosen expert; the
// shared one), and each FFN's weights are read once for all of its rows (up to 4 rows share each weight row
// while it is in L1). Each FFN's work is cut into `split` gate/up tasks (a contiguous block of D rows of W1
// and W3: partial sums of g and u) and `split` down tasks (a block of M rows of W2: a partial sum of the
// output), so that both threads stream at full speed to the end of the call whatever the number of experts.
// Tasks are shared out over XLA's intra-op thread pool from one counter, gate/up tasks first: the caller
// takes tasks too and waits only for tasks that another thread has already taken (never for a queued one),
// so it cannot deadlock on a busy pool.
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

// The rows that run through one FFN (a chosen expert's, or the shared one) and where their partial sums go.
struct Group {
  const float* w1;  // [D, M]
  const float* w3;  // [D, M]
  const float* w2;  // [M, D]
  int64_t m, split;
  int64_t first, last;               // its rows: order[first, last)
  int64_t gate_up_base, partial_base;  // offsets of its rows' partial sums in Work::gate_up / Work::partial
};

// One call's tasks: every group's `split` gate/up tasks (a contiguous block of D rows of W1 and W3: partial
// sums of g and u), then every group's `split` down tasks (a block of M rows of W2: a partial sum of the
// output), taken in that order from one counter; a down task needs its group's gate/up tasks finished
// (taken long before it, except at the end).
struct Work {
  const float* x;  // [T, D]
  int64_t d, slots;  // out [T, slots, D]: out row r is token r / slots
  float limit;
  std::vector<int64_t> order;  // the out rows of every group, group after group
  std::vector<Group> groups;
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (group, chunk) of the gate/up tasks; downs likewise
  std::vector<float> gate_up;  // per group and row: [split, 2, M] partial sums over a D chunk
  std::vector<float> partial;  // per group and row: [split, D] partial sums over an M chunk
  int64_t gate_up_size = 0, partial_size = 0;  // their sizes once every group is added
  std::unique_ptr<std::atomic<int64_t>[]> gate_up_done;  // [groups] finished gate/up tasks
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mu;
  std::condition_variable all_done;

  void AddGroup(const float* w1, const float* w3, const float* w2, int64_t m, int64_t split, int64_t first,
                int64_t last) {
    const int64_t rows = last - first;
    for (int64_t c = 0; c < split; ++c) tasks.emplace_back(groups.size(), c);
    groups.push_back(Group{w1, w3, w2, m, split, first, last, gate_up_size, partial_size});
    gate_up_size += rows * split * 2 * m;
    partial_size += rows * split * d;
  }

  void GateUp(const Group& grp, int64_t c) {
    const int64_t d = this->d, m = grp.m, i0 = c * d / grp.split, i1 = (c + 1) * d / grp.split;
    for (int64_t r0 = grp.first; r0 < grp.last; r0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, grp.last - r0));
      const float* xr[kBlock];
      float* g[kBlock];
      float* u[kBlock];
      for (int r = 0; r < n; ++r) {
        xr[r] = x + (order[r0 + r] / slots) * d;
        g[r] = gate_up.data() + grp.gate_up_base + ((r0 + r - grp.first) * grp.split + c) * 2 * m;
        u[r] = g[r] + m;
        std::fill(g[r], g[r] + 2 * m, 0.0f);
      }
      switch (n) {
        case 1: GateUpRows<1>(xr, g, u, grp.w1, grp.w3, i0, i1, m); break;
        case 2: GateUpRows<2>(xr, g, u, grp.w1, grp.w3, i0, i1, m); break;
        case 3: GateUpRows<3>(xr, g, u, grp.w1, grp.w3, i0, i1, m); break;
        default: GateUpRows<kBlock>(xr, g, u, grp.w1, grp.w3, i0, i1, m);
      }
    }
  }

  void Down(const Group& grp, int64_t c) {
    const int64_t d = this->d, m = grp.m, split = grp.split, j0 = c * m / split, j1 = (c + 1) * m / split;
    const float limit = this->limit;
    std::vector<float> h(kBlock * (j1 - j0));
    for (int64_t r0 = grp.first; r0 < grp.last; r0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, grp.last - r0));
      const float* hr[kBlock];
      float* y[kBlock];
      for (int r = 0; r < n; ++r) {
        const int64_t i = r0 + r - grp.first;  // the row's index in its group
        const float* parts = gate_up.data() + grp.gate_up_base + i * split * 2 * m;
        float* hrow = h.data() + r * (j1 - j0);
        for (int64_t j = j0; j < j1; ++j) {  // h = swiglu(Σ_chunks g, Σ_chunks u)
          float gj = 0.0f, uj = 0.0f;
          for (int64_t s = 0; s < split; ++s) {
            gj += parts[s * 2 * m + j];
            uj += parts[s * 2 * m + m + j];
          }
          gj = std::min(gj, limit);
          uj = std::min(std::max(uj, -limit), limit);
          hrow[j - j0] = gj / (1.0f + std::exp(-gj)) * uj;
        }
        hr[r] = hrow;
        y[r] = partial.data() + grp.partial_base + (i * split + c) * d;
        std::fill(y[r], y[r] + d, 0.0f);
      }
      switch (n) {
        case 1: DownRows<1>(hr, y, grp.w2, j0, j1, d); break;
        case 2: DownRows<2>(hr, y, grp.w2, j0, j1, d); break;
        case 3: DownRows<3>(hr, y, grp.w2, j0, j1, d); break;
        default: DownRows<kBlock>(hr, y, grp.w2, j0, j1, d);
      }
    }
  }

  int64_t NumTasks() const { return 2 * static_cast<int64_t>(tasks.size()); }

  void Run() {
    const int64_t half = tasks.size(), total = 2 * half;
    for (int64_t t = next.fetch_add(1); t < total; t = next.fetch_add(1)) {
      const auto [group, chunk] = tasks[t % half];
      if (t < half) {
        GateUp(groups[group], chunk);
        gate_up_done[group].fetch_add(1, std::memory_order_release);
      } else {
        while (gate_up_done[group].load(std::memory_order_acquire) < groups[group].split) std::this_thread::yield();
        Down(groups[group], chunk);
      }
      if (finished.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};
// Runs every task of `work` on the caller and `pool` (the tasks share ownership of `work`: a helper may
// start after the caller has finished them all), then writes each row's Σ over its chunks to out [rows, D]
// (rows of no group, the padding ids, to zero).
void Execute(const std::shared_ptr<Work>& work, ffi::ThreadPool& pool, float* out, int64_t rows) {
  const int64_t total = work->NumTasks(), d = work->d;
  work->gate_up.resize(work->gate_up_size);
  work->partial.resize(work->partial_size);
  work->gate_up_done.reset(new std::atomic<int64_t>[work->groups.size()]);
  for (size_t g = 0; g < work->groups.size(); ++g) work->gate_up_done[g].store(0);
  if (static_cast<int64_t>(work->order.size()) < rows) std::fill(out, out + rows * d, 0.0f);  // padding rows
  if (total == 0) return;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  {
    std::unique_lock<std::mutex> lock(work->mu);
    work->all_done.wait(lock, [&] { return work->finished.load() == total; });
  }
  for (const Group& grp : work->groups) {
    for (int64_t i = 0; i < grp.last - grp.first; ++i) {
      float* __restrict y = out + work->order[grp.first + i] * d;
      const float* part = work->partial.data() + grp.partial_base + i * grp.split * d;
      std::copy(part, part + d, y);
      for (int64_t s = 1; s < grp.split; ++s)
        for (int64_t j = 0; j < d; ++j) y[j] += part[s * d + j];
    }
  }
}

bool SameShape(ffi::Span<const int64_t> a, std::initializer_list<int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// Whether the routed operands have the shapes both handlers need, and `split` fits them.
ffi::Error CheckRouted(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::S32>& expert, ffi::Buffer<ffi::F32>& w1,
                       ffi::Buffer<ffi::F32>& w3, ffi::Buffer<ffi::F32>& w2, int64_t split) {
  const auto xd = x.dimensions(), ed = expert.dimensions(), wd = w1.dimensions();
  if (xd.size() != 2 || ed.size() != 2 || wd.size() != 3 || ed[0] != xd[0] || wd[1] != xd[1] ||
      !SameShape(w3.dimensions(), {wd[0], wd[1], wd[2]}) || !SameShape(w2.dimensions(), {wd[0], wd[2], wd[1]})) {
    return ffi::Error::InvalidArgument("routed_experts: expected x [T, D], expert [T, K], w1 = w3 [E, D, M], "
                                       "w2 [E, M, D]");
  }
  if (split < 1 || split > std::min(wd[1], wd[2]))
    return ffi::Error::InvalidArgument("routed_experts: split must lie in [1, min(D, M)]");
  return ffi::Error::Success();
}

// The routed rows of out [T, slots, D] (slot k < K of token t runs expert[t, k]) grouped by expert into
// `work` (operands checked by `CheckRouted`); `slots` is K, or K + 1 when the last slot holds the shared one.
void AddRoutedGroups(Work& work, ffi::Buffer<ffi::S32>& expert, ffi::Buffer<ffi::F32>& w1,
                     ffi::Buffer<ffi::F32>& w3, ffi::Buffer<ffi::F32>& w2, int64_t split) {
  const auto ed = expert.dimensions(), wd = w1.dimensions();
  const int64_t t = ed[0], k = ed[1], num_experts = wd[0], d = wd[1], m = wd[2];
  const int32_t* ids = expert.typed_data();
  std::vector<int64_t> start(num_experts + 1, 0);  // counting sort of the valid rows by expert
  for (int64_t r = 0; r < t * k; ++r)
    if (ids[r] >= 0 && ids[r] < num_experts) ++start[ids[r] + 1];
  for (int64_t e = 0; e < num_experts; ++e) start[e + 1] += start[e];
  const int64_t first = work.order.size();
  work.order.resize(first + start[num_experts]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t r = 0; r < t * k; ++r)
    if (ids[r] >= 0 && ids[r] < num_experts) work.order[first + fill[ids[r]]++] = (r / k) * work.slots + r % k;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (start[e + 1] == start[e]) continue;
    work.AddGroup(w1.typed_data() + e * d * m, w3.typed_data() + e * d * m, w2.typed_data() + e * m * d, m, split,
                  first + start[e], first + start[e + 1]);
  }
}

std::shared_ptr<Work> NewWork(ffi::Buffer<ffi::F32>& x, int64_t slots, float limit) {
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->d = x.dimensions()[1];
  work->slots = slots;
  work->limit = limit;
  return work;
}

ffi::Error RoutedExperts(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> expert,
                         ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w3, ffi::Buffer<ffi::F32> w2,
                         ffi::ResultBuffer<ffi::F32> out, float limit, int64_t split) {
  if (auto err = CheckRouted(x, expert, w1, w3, w2, split); err.failure()) return err;
  const int64_t slots = expert.dimensions()[1];
  auto work = NewWork(x, slots, limit);
  AddRoutedGroups(*work, expert, w1, w3, w2, split);
  Execute(work, pool, out->typed_data(), x.dimensions()[0] * slots);
  return ffi::Error::Success();
}

// The same plus a shared expert (sw1 / sw3 [D, S], sw2 [S, D]) for every token: out [T, K + 1, D] with the
// shared FFN's output in the last slot. The shared rows are one more group, so the shared weights stream on
// both threads alongside the routed experts'.
ffi::Error RoutedAndSharedExperts(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> expert,
                                  ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w3, ffi::Buffer<ffi::F32> w2,
                                  ffi::Buffer<ffi::F32> sw1, ffi::Buffer<ffi::F32> sw3, ffi::Buffer<ffi::F32> sw2,
                                  ffi::ResultBuffer<ffi::F32> out, float limit, int64_t split,
                                  int64_t shared_split) {
  if (auto err = CheckRouted(x, expert, w1, w3, w2, split); err.failure()) return err;
  const int64_t t = x.dimensions()[0], d = x.dimensions()[1], slots = expert.dimensions()[1] + 1;
  const auto sd = sw1.dimensions();
  if (sd.size() != 2 || sd[0] != d || !SameShape(sw3.dimensions(), {d, sd[1]}) ||
      !SameShape(sw2.dimensions(), {sd[1], d})) {
    return ffi::Error::InvalidArgument("routed_experts: expected shared sw1 = sw3 [D, S], sw2 [S, D]");
  }
  if (shared_split < 1 || shared_split > std::min(d, sd[1]))
    return ffi::Error::InvalidArgument("routed_experts: shared_split must lie in [1, min(D, S)]");
  auto work = NewWork(x, slots, limit);
  work->order.resize(t);  // the shared group first: its rows are every token's last slot
  for (int64_t i = 0; i < t; ++i) work->order[i] = i * slots + slots - 1;
  if (t) work->AddGroup(sw1.typed_data(), sw3.typed_data(), sw2.typed_data(), sd[1], shared_split, 0, t);
  AddRoutedGroups(*work, expert, w1, w3, w2, split);
  Execute(work, pool, out->typed_data(), t * slots);
  return ffi::Error::Success();
}

// The binding both handlers start with: the thread pool, then x, expert, w1, w3, w2.
auto BindRoutedArgs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(V4jaxRoutedExpertsF32, RoutedExperts,
                              BindRoutedArgs().Ret<ffi::Buffer<ffi::F32>>().Attr<float>("limit").Attr<int64_t>("split"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(V4jaxRoutedAndSharedExpertsF32, RoutedAndSharedExperts,
                              BindRoutedArgs()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("limit")
                                  .Attr<int64_t>("split")
                                  .Attr<int64_t>("shared_split"));
