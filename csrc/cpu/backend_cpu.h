// The CPU backend: the primitives of backend.h over host memory, OpenBLAS (blas_cpu.h) and plain loops.
// One instance per thread (cpu_backend()), so that concurrent layers on different threads never share scratch.
// Failures throw before the commit; inputs were validated by the bindings before the step was called.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../backend.h"
#include "../factored_step.h"
#include "../host_device.h"
#include "../state.h"
#include "blas_cpu.h"
#include "kernels_cpu.h"
#include "thread_pool_cpu.h"

namespace sparsetarget::cpu {

template <class T>
struct Inverse {
  T* inverse;    // where the inverse is (the scratch given to invert)
  double rcond;  // reciprocal condition estimate; 0 when singular
};

// The Woodbury system S^T factored for solve_system: LU factors of S with their pivots, or for a small system its
// explicit inverse S^-T.
template <class T>
struct SystemFactors {
  T* factors;         // the LU factors (in S^T's buffer), or the inverse when pivots is null
  const int* pivots;  // getrf's interchanges (1-based), or null
  double rcond;       // 1 / (max(1, ||S^T||) max(1, ||S^-T||)); 0 when singular
};

struct TargetOrder {};  // the CPU walks targets in CSR order; overlaps sort their own entries

class CpuBackend {
 public:
  static constexpr std::int64_t kTileRows = 2048;  // rows of V per tile in passes over V

  // A slot larger than this is released by release_large_scratch(): reallocating it costs little next to the
  // O(m^2 d) work of a minibatch that needs it.
  static constexpr std::size_t kKeepScratchBytes = std::size_t{64} << 20;

  template <class T>
  T* scratch(int slot, std::size_t n) {
    if (slot >= static_cast<int>(slots_.size())) slots_.resize(static_cast<std::size_t>(slot) + 1);
    auto& buf = slots_[slot];
    const std::size_t words = (n * sizeof(T) + sizeof(double) - 1) / sizeof(double);
    if (buf.size() < words) buf.resize(words);
    return reinterpret_cast<T*>(buf.data());
  }

  void release_large_scratch() {
    for (auto& buf : slots_)
      if (buf.size() * sizeof(double) > kKeepScratchBytes) std::vector<double>().swap(buf);
  }

  // ---- dense products
  template <class T>
  void gemm(Op oa, Op ob, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
            int ldc) {
    blas::gemm<T>(oa, ob, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  template <class T>
  void gemv(Op oa, int m, int n, T alpha, const T* a, int lda, const T* x, T beta, T* y) {
    blas::gemv<T>(oa, m, n, alpha, a, lda, x, beta, y);
  }
  template <class T>
  void mirror_upper(int n, T* c, int ldc) {
    blas::mirror_upper<T>(n, c, ldc);
  }
  template <class T>
  void sym_rank2k(int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c, int ldc) {
    blas::sym_rank2k<T>(n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  template <class T>
  void gram(int n, int k, T alpha, const T* a, int lda, T* c, int ldc) {
    blas::gram<T>(n, k, alpha, a, lda, c, ldc);
  }

  // ---- elementwise
  template <class F>
  void for_each(std::size_t n, const F& f) {
    for_ranges(n, loop_parts(n), [&](std::size_t lo, std::size_t hi) {
      for (std::size_t i = lo; i < hi; ++i) f(i);
    });
  }
  // Rows split over the core's threads when there is enough work (the functors are elementwise; row_work, when
  // larger than cols, is what one call f(i, 0) of a functor that loops by itself reads).
  template <class F>
  void for_rows(int rows, int cols, const F& f, std::size_t row_work = 0) {
    const std::size_t work = std::max<std::size_t>(static_cast<std::size_t>(std::max(cols, 1)), row_work);
    const int parts = std::min(rows, loop_parts(static_cast<std::size_t>(rows) * work));
    const auto run = [&](int lo, int hi) {
      for (int i = lo; i < hi; ++i) {
#pragma omp simd
        for (int j = 0; j < cols; ++j) f(i, j);
      }
    };
    if (parts <= 1) {
      run(0, rows);
      return;
    }
    parallel_for(parts, [&](int p) {
      run(static_cast<int>(std::int64_t{rows} * p / parts), static_cast<int>(std::int64_t{rows} * (p + 1) / parts));
    });
  }
  // f and g at the same time on two of the core's threads (each runs its own products single-threaded), then
  // shared(part, parts) for the parts of a third job of about shared_flops, each taken by whichever thread is free
  // first (so that an uneven f and g leave no thread idle). With a single thread, or when the shared job is too small
  // to split: f, g, then shared(0, 1) on the calling thread. An exception is rethrown once the parts running at the
  // time have ended; the rest may not run.
  template <class F, class G, class S>
  void concurrently(const F& f, const G& g, const S& shared, double shared_flops) {
    const int parts = blas::parts_for(shared_flops) > 1 ? kMaxSharedParts : 1;
    if (pool_threads() < 2 || parts < 2) {
      f();
      g();
      shared(0, 1);
      return;
    }
    std::atomic<int> next{0};
    parallel_for(2, [&](int part) {
      if (part == 0)
        f();
      else
        g();
      for (int i; (i = next.fetch_add(1)) < parts;) shared(i, parts);
    });
  }
  template <class T>
  void copy(const T* src, T* dst, std::size_t n) {
    std::copy(src, src + n, dst);
  }
  template <class T>
  void fill(T* dst, std::size_t n, T value) {
    std::fill(dst, dst + n, value);
  }
  template <class T>
  void scale(T* x, std::size_t n, double a) {
    const T s = static_cast<T>(a);
#pragma omp simd
    for (std::size_t i = 0; i < n; ++i) x[i] *= s;
  }
  template <class T>
  void row_dots(const T* a, const T* b, int m, int d, T* out) {
    for (int j = 0; j < m; ++j) out[j] = dot_row(row_ptr(a, j, d), row_ptr(b, j, d), d);
  }
  template <class T>
  void norm2(const T* x, std::size_t n, double* out) {
    *out = std::sqrt(sum_squares(x, n));
  }

  // The inverse of a (n x n, overwritten by its LU factors) into inverse. With floor_one, rcond = 1 / (max(1, ||a||)
  // max(1, ||a^-1||)) (infinity norms; docs/algorithm.md §5.7), else LAPACK's estimate.
  template <class T>
  Inverse<T> invert(int n, T* a, T* inverse, bool floor_one) {
    if (!floor_one) return {inverse, blas::invert_into<T>(n, a, inverse)};
    const double norm = blas::inf_norm(n, a);
    const bool regular = blas::invert_into<T>(n, a, inverse, false) > 0;  // the bound below needs no estimate
    return {inverse, regular ? floor_one_rcond(norm, blas::inf_norm(n, inverse)) : 0.0};
  }
  // 1 / (max(1, ||a||) max(1, ||a^-1||)), 0 for an infinite or NaN norm (docs/algorithm.md §5.7).
  static double floor_one_rcond(double norm, double inverse_norm) {
    if (!(norm < kInfinity) || !(inverse_norm < kInfinity)) return 0.0;  // std::max would drop a NaN
    return 1.0 / (std::max(1.0, norm) * std::max(1.0, inverse_norm));
  }
  static constexpr double kInfinity = std::numeric_limits<double>::infinity();

  // The Woodbury system S^T (n x n, row-major, overwritten) factored for solve_system on rhs_cols columns, with
  // rcond as invert's floor_one gives it (from LU factors: with ||S^-T|| estimated by gecon; docs/algorithm.md §5.7;
  // tests/test_exactness.py and test_reliability.py size their systems to take each path). The explicit inverse
  // costs 2 n^3 more than the factors, whose blocked substitution costs more than the inverse's product (smaller
  // GEMMs): on one thread the factors win from about n > rhs_cols / 4 (whole steps, OpenBLAS's AVX2 kernel on an
  // EPYC: 0-3 % faster at d = 256, m = 128-200 and d = 512, m = 200). With more threads the inverse runs beside the
  // Gram matrix (concurrently) and splits over the threads with the product: there the inverse stays.
  static constexpr int kSystemLuRows = 96;
  template <class T>
  SystemFactors<T> factor_system(int n, int rhs_cols, T* st, T* scratch) {
    if (n < kSystemLuRows || 4 * n <= rhs_cols || pool_threads() > 1) {
      const Inverse<T> inv = invert(n, st, scratch, true);
      return {inv.inverse, nullptr, inv.rcond};
    }
    pivots_.resize(static_cast<std::size_t>(n));
    const double norm = blas::inf_norm(n, st);
    return {st, pivots_.data(), floor_one_rcond(norm, blas::lu_factor_transposed(n, st, pivots_.data(), norm))};
  }
  // out (n x cols, row-major, leading dimension ld) <- alpha S^-T rhs, from factor_system's result.
  template <class T>
  void solve_system(const SystemFactors<T>& f, int n, int cols, T alpha, const T* rhs, T* out, int ld) {
    if (!f.pivots) {
      gemm(Op::N, Op::N, n, cols, n, alpha, f.factors, n, rhs, ld, T(0), out, ld);
      return;
    }
    for (int i = 0; i < n; ++i) {  // copied and scaled, then solved in place
      const T* src = rhs + static_cast<std::ptrdiff_t>(i) * ld;
      T* dst = out + static_cast<std::ptrdiff_t>(i) * ld;
#pragma omp simd
      for (int j = 0; j < cols; ++j) dst[j] = alpha * src[j];
    }
    blas::lu_solve_transposed(n, cols, f.factors, f.pivots, out, ld);
  }

  // ---- failures: thrown before anything is written
  void require_rcond(double rcond, double min_rcond) {
    if (rcond > 0 && rcond >= min_rcond) return;  // an exactly singular factor is refused even at min_rcond 0
    char msg[256];
    std::snprintf(msg, sizeof msg,
                  "the update factor M = (1 - lr*weight_decay) I - lr H^T diag(2 dL/dq) H is singular or nearly so "
                  "(reciprocal condition %.3g < min_rcond %.3g): lower lr; the layer is unchanged",
                  rcond, min_rcond);
    throw SingularUpdateError(msg);
  }
  template <class T>
  void require_finite(const T* x, std::size_t n, const char* what) {
    std::atomic<bool> finite{true};
    for_ranges(n, loop_parts(n), [&](std::size_t lo, std::size_t hi) {
      if (!all_finite(x + lo, hi - lo)) finite.store(false);
    });
    if (!finite.load())
      throw std::domain_error(std::string("the step produced non-finite values in ") + what +
                              " (overflow: lower lr or check the loss derivatives); the layer is unchanged");
  }
  template <class T>
  void require_finite_input(const T*, std::size_t, const char*) {}  // checked by the bindings
  template <class T>
  void require_finite_staged(const T*, std::size_t) {}  // in place: the factors were checked before

  // ---- the sparse parts
  template <class TV, class TS>
  void gather_outputs(const TV* V, std::int64_t /*D*/, int d, const TS* UH, const TS* Hw, const Targets& t, TS* A) {
    for_ranges(static_cast<std::size_t>(t.m), sparse_parts(t, d), [&](std::size_t lo, std::size_t hi) {
      for (auto j = static_cast<std::int64_t>(lo); j < static_cast<std::int64_t>(hi); ++j) {
        const TS* uh = row_ptr(UH, j, d);
        for (std::int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e)
          A[e] = dot_row(row_ptr(V, t.indices[e], d), uh, d) + Hw[j];
      }
    });
  }
  // Zv_j = sum_k z_jk V[k], z_sum_j = sum_k z_jk
  template <class TV, class TS>
  void combine_target_rows(const TV* V, std::int64_t /*D*/, int d, const Targets& t, const TS* dA, TS* Zv,
                           TS* z_sum) {
    for_ranges(static_cast<std::size_t>(t.m), sparse_parts(t, d), [&](std::size_t lo, std::size_t hi) {
      std::fill(Zv + lo * d, Zv + hi * d, TS(0));
      for (auto j = static_cast<std::int64_t>(lo); j < static_cast<std::int64_t>(hi); ++j) {
        TS* zv = row_ptr(Zv, j, d);
        TS zs = 0;
        for (std::int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e) {
          zs += dA[e];
          if (dA[e] != TS(0)) axpy_row(dA[e], row_ptr(V, t.indices[e], d), zv, d);
        }
        z_sum[j] = zs;
      }
    });
  }
  template <class TS>
  void target_row_sums(const Targets& t, std::int64_t /*D*/, const TS* dA, TS* z_sum) {
    for (std::int64_t j = 0; j < t.m; ++j) {
      TS zs = 0;
      for (std::int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e) zs += dA[e];
      z_sum[j] = zs;
    }
  }
  TargetOrder order_targets(const Targets&, std::int64_t) { return {}; }
  // G_ij += sum over target entries of rows i and j that share an index of z z' (duplicates included), grouping
  // entries by index: O(nnz log nnz + sum_k n_k^2).
  template <class TS>
  void add_target_overlaps(const Targets& t, std::int64_t /*D*/, const TS* dA, const TargetOrder&, TS* G) {
    const auto entries = entries_by_index(t, dA);
    const std::ptrdiff_t m = static_cast<std::ptrdiff_t>(t.m);
    for_index_groups(entries, [&](std::size_t lo, std::size_t hi) {
      for (std::size_t a = lo; a < hi; ++a)
        for (std::size_t b = lo; b < hi; ++b) G[entries[a].row * m + entries[b].row] += entries[a].z * entries[b].z;
    });
  }
  // T (m x d) = S H with S_ij the overlaps above: per index k, y_k = sum of z_f H[row f] over its entries, then
  // T[row e] += z_e y_k. O(nnz log nnz + nnz d), whatever the number of rows sharing an index.
  template <class TS>
  void target_overlaps_times(const Targets& t, std::int64_t /*D*/, const TS* dA, const TargetOrder&, const TS* H,
                             int d, TS* T) {
    std::fill(T, T + static_cast<std::size_t>(t.m) * d, TS(0));
    const auto entries = entries_by_index(t, dA);
    std::vector<TS> y(static_cast<std::size_t>(d));
    for_index_groups(entries, [&](std::size_t lo, std::size_t hi) {
      std::fill(y.begin(), y.end(), TS(0));
      for (std::size_t f = lo; f < hi; ++f) axpy_row(entries[f].z, row_ptr(H, entries[f].row, d), y.data(), d);
      for (std::size_t e = lo; e < hi; ++e) axpy_row(entries[e].z, y.data(), row_ptr(T, entries[e].row, d), d);
    });
  }
  // V[k] += alpha sum over entries e with index k of z_e X[row(e)], in CSR order.
  template <class TV, class TS>
  void scatter_rows(TV* V, std::int64_t /*D*/, int d, const Targets& t, const TS* dA, const TargetOrder&, const TS* X,
                    TS alpha) {
    for (std::int64_t j = 0; j < t.m; ++j) {
      const TS* x = row_ptr(X, j, d);
      for (std::int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e)
        if (dA[e] != TS(0)) axpy_row(alpha * dA[e], x, row_ptr(V, t.indices[e], d), d);
    }
  }

  // ---- the commit: in place
  template <class T>
  T* stage(T* dst, std::size_t, int, bool) {
    return dst;
  }
  template <class T>
  void commit(const T*, T*, std::size_t) {}
  void count_step(double* stats) { stats[kStatSteps] += 1; }

  // ---- stabilisation bookkeeping: everything is synchronous
  template <class TV, class TS>
  std::int64_t steps(const FactoredState<TV, TS>& st) const {
    return static_cast<std::int64_t>(st.stats[kStatSteps]);
  }
  StepFlags* flags() { return &flags_; }
  bool correction_requested() { return std::exchange(flags_.needs_correction, 0) != 0; }
  void correction_done() { flags_.needs_correction = 0; }
  void synchronize() {}
  bool can_wait() const { return true; }
  template <class T>
  std::vector<T> download(const T* src, std::size_t n) {
    return std::vector<T>(src, src + n);
  }
  template <class T>
  void upload(const std::vector<T>& src, T* dst) {
    std::copy(src.begin(), src.end(), dst);
  }
  int exact_math() { return 0; }  // the CPU has no reduced-precision mode
  // For the lifetime of the result, products use the threads set for passes over V.
  PassThreads pass_scope() const { return PassThreads(); }
  // Whether the singular-value bounds carried since the last check (parts::WidenMonitorBounds) could have left the
  // band: the check then runs before its turn.
  template <class TV, class TS>
  bool monitor_may_be_due(const FactoredState<TV, TS>& st, const StabilizeOptions& opt) const {
    return needs_correction(st.stats[kStatSigmaMax], st.stats[kStatSigmaMin], st.stats[kStatInverseResidual], opt);
  }
  // VtV (upper triangle) += tile^T tile and Vt1 += tile^T 1, accumulated in float64 (the product in V's dtype).
  // The tile's rows are split over the core's threads, one product each.
  template <class TV>
  void accumulate_gram(const TV* tile, int rows, int d, double* VtV, double* Vt1) {
    const std::size_t dd = static_cast<std::size_t>(d) * d;
    const int parts = std::max(1, std::min(pool_threads(), rows / 256));
    TV* part = scratch<TV>(kSlotTile, parts * dd);
    parallel_for(parts, [&](int p) {
      const int r0 = rows * p / parts, r1 = rows * (p + 1) / parts;
      blas::syrk_t<TV>(d, r1 - r0, 1, tile + static_cast<std::ptrdiff_t>(r0) * d, d, 0, part + p * dd, d);
    });
    for (int p = 0; p < parts; ++p)
      for (int i = 0; i < d; ++i)
        for (int j = i; j < d; ++j) {
          const std::size_t x = static_cast<std::size_t>(i) * d + j;
          VtV[x] += part[p * dd + x];
        }
    for (int r = 0; r < rows; ++r) {
      const TV* v = tile + static_cast<std::ptrdiff_t>(r) * d;
      for (int i = 0; i < d; ++i) Vt1[i] += v[i];
    }
  }

 private:
  // The nonzero target entries as (index, row, z), sorted by index then row.
  template <class TS>
  struct Entry {
    std::int64_t index;
    std::int64_t row;
    TS z;
  };
  template <class TS>
  static std::vector<Entry<TS>> entries_by_index(const Targets& t, const TS* dA) {
    std::vector<Entry<TS>> entries;
    entries.reserve(static_cast<std::size_t>(t.nnz));
    for (std::int64_t j = 0; j < t.m; ++j)
      for (std::int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e)
        if (dA[e] != TS(0)) entries.push_back({t.indices[e], j, dA[e]});
    std::sort(entries.begin(), entries.end(), [](const Entry<TS>& a, const Entry<TS>& b) {
      return std::tie(a.index, a.row) < std::tie(b.index, b.row);
    });
    return entries;
  }
  // f(lo, hi) for each run of entries with one index.
  template <class E, class F>
  static void for_index_groups(const std::vector<E>& entries, F f) {
    for (std::size_t lo = 0; lo < entries.size();) {
      std::size_t hi = lo;
      while (hi < entries.size() && entries[hi].index == entries[lo].index) ++hi;
      f(lo, hi);
      lo = hi;
    }
  }

  // f(lo, hi) for `parts` consecutive ranges of [0, n), over the core's threads when parts > 1.
  template <class F>
  static void for_ranges(std::size_t n, int parts, const F& f) {
    if (parts <= 1) {
      f(std::size_t{0}, n);
      return;
    }
    parallel_for(parts, [&](int p) { f(n * p / parts, n * (p + 1) / parts); });
  }
  // Parts for a pass over the target rows of V (gather, combine): by the elements it reads, at most one per row.
  static int sparse_parts(const Targets& t, int d) {
    return std::min<int>(static_cast<int>(t.m), loop_parts(static_cast<std::size_t>(t.nnz) * d));
  }

  static constexpr int kMaxSharedParts = 6;  // blocks of the shared job of concurrently()

  // Parts for an elementwise loop of n iterations: one per thread once each part has kLoopPart of them.
  static int loop_parts(std::size_t n) {
    constexpr std::size_t kLoopPart = std::size_t{1} << 15;
    return n < 2 * kLoopPart ? 1 : static_cast<int>(std::min<std::size_t>(pool_threads(), n / kLoopPart));
  }

  std::vector<std::vector<double>> slots_;
  std::vector<int> pivots_;  // of factor_system's LU factors
  StepFlags flags_;
};

// This thread's backend.
inline CpuBackend& cpu_backend() {
  thread_local CpuBackend backend;
  return backend;
}

}  // namespace sparsetarget::cpu
