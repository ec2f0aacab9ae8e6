// The CUDA backend: the primitives of ../backend.h over device memory, cuBLAS (blas_cuda.cuh) and own kernels,
// all queued on the caller's stream (mirror of ../cpu/backend_cpu.h). One instance per layer: it owns the cuBLAS
// handle, the scratch and the StepFlags word in device memory.
//
// Nothing in a step waits for the device. A failure (singular update factor, NaN or inf, a target index out of
// range) is recorded in the device flags instead of thrown: the step that meets one commits nothing, every later
// step is skipped on the device, and the host raises when it next reads the flags (publish() queues the copy).
//
// This header only declares the member templates that launch kernels (backend_cuda_impl.cuh defines them, for
// .cu files), so host code compiled without nvcc can include it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../backend.h"
#include "../host_device.h"
#include "../stabilize_policy.h"
#include "../state.h"
#include "blas_cuda.cuh"
#include "state_cuda.cuh"

namespace sparsetarget::cuda {

template <class T>
struct Inverse {
  T* inverse;           // device memory
  const double* rcond;  // device scalar
};

// Target entries sorted by index (stable): the overlaps and the scatter visit each index's entries in a fixed order.
struct TargetOrder {
  const std::int64_t* keys = nullptr;  // sorted indices
  const std::int64_t* ids = nullptr;   // entry numbers in that order
};

// Turns off TF32 while it lives: corrections and refreshes must not round W.
class ExactMath {
 public:
  explicit ExactMath(blas::Handle& h) : h_(h), was_(h.tf32()) {
    if (was_) h_.set_tf32(false);
  }
  ~ExactMath() {
    if (was_) h_.set_tf32(true);
  }
  ExactMath(const ExactMath&) = delete;
  ExactMath& operator=(const ExactMath&) = delete;

 private:
  blas::Handle& h_;
  bool was_;
};

class CudaBackend {
 public:
  static constexpr std::int64_t kTileRows = 16384;  // rows of V per tile in passes over V

  CudaBackend();

  blas::Handle blas;
  cudaStream_t stream() const { return blas.stream(); }
  void set_stream(cudaStream_t s) { blas.set_stream(s); }
  std::size_t workspace_bytes() const { return ws_.bytes(); }

  template <class T>
  T* scratch(int slot, std::size_t n) {
    return ws_.get<T>(slot, n);
  }

  // ---- dense products (cuBLAS)
  template <class T>
  void gemm(Op oa, Op ob, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
            int ldc) {
    blas::gemm<T>(blas, oa, ob, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  template <class T>
  void gemv(Op oa, int m, int n, T alpha, const T* a, int lda, const T* x, T beta, T* y) {
    blas::gemv<T>(blas, oa, m, n, alpha, a, lda, x, beta, y);
  }
  template <class T>
  void mirror_upper(int n, T* c, int ldc) {
    blas::mirror_upper<T>(blas, n, c, ldc);
  }
  template <class T>
  void sym_rank2k(int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c, int ldc) {
    blas::syr2k_t<T>(blas, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    mirror_upper<T>(n, c, ldc);
  }
  template <class T>
  void gram(int n, int k, T alpha, const T* a, int lda, T* c, int ldc) {  // alpha A A^T, both triangles
    blas::sym_product<T>(blas, n, k, alpha, a, lda, a, lda, c, ldc);
  }

  // ---- elementwise (kernels)
  template <class F>
  void for_each(std::size_t n, const F& f);
  template <class F>
  void for_rows(int rows, int cols, const F& f, std::size_t row_work = 0);  // row_work: a CPU hint
  // On the one stream: f's kernels, then g's, then the shared job in one part.
  template <class F, class G, class S>
  void concurrently(const F& f, const G& g, const S& shared, double /*shared_flops*/) {
    f();
    g();
    shared(0, 1);
  }
  template <class T>
  void copy(const T* src, T* dst, std::size_t n);
  template <class T>
  void fill(T* dst, std::size_t n, T value);
  template <class T>
  void scale(T* x, std::size_t n, double a);
  template <class T>
  void row_dots(const T* a, const T* b, int m, int d, T* out);
  template <class T>
  void norm2(const T* x, std::size_t n, double* out);
  template <class T>
  Inverse<T> invert(int n, T* a, T* inverse, bool floor_one);
  // The Woodbury system S^T (n x n) for solve_system: inverted explicitly into `inverse` (rcond as floor_one).
  template <class T>
  Inverse<T> factor_system(int n, int /*rhs_cols*/, T* st, T* inverse) {
    return invert(n, st, inverse, true);
  }
  // out (n x cols, leading dimension ld) <- alpha S^-T rhs: one product with the inverse.
  template <class T>
  void solve_system(const Inverse<T>& f, int n, int cols, T alpha, const T* rhs, T* out, int ld) {
    gemm(Op::N, Op::N, n, cols, n, alpha, f.inverse, n, rhs, ld, T(0), out, ld);
  }

  // ---- failures: recorded in the device flags
  void require_rcond(const double* rcond, double min_rcond);
  template <class T>
  void require_finite(const T* x, std::size_t n, const char* what);
  template <class T>
  void require_finite_input(const T* x, std::size_t n, const char* what);
  template <class T>
  void require_finite_staged(const T* x, std::size_t n);

  // ---- the sparse parts (deterministic: one writer per output, fixed order, no atomics)
  template <class TV, class TS>
  void gather_outputs(const TV* V, std::int64_t D, int d, const TS* UH, const TS* Hw, const Targets& t, TS* A);
  template <class TV, class TS>
  void combine_target_rows(const TV* V, std::int64_t D, int d, const Targets& t, const TS* dA, TS* Zv, TS* z_sum);
  template <class TS>
  void target_row_sums(const Targets& t, std::int64_t D, const TS* dA, TS* z_sum);
  TargetOrder order_targets(const Targets& t, std::int64_t D);
  template <class TS>
  void add_target_overlaps(const Targets& t, std::int64_t D, const TS* dA, const TargetOrder& order, TS* G);
  template <class TS>
  void target_overlaps_times(const Targets& t, std::int64_t D, const TS* dA, const TargetOrder& order, const TS* H,
                             int d, TS* T);
  template <class TV, class TS>
  void scatter_rows(TV* V, std::int64_t D, int d, const Targets& t, const TS* dA, const TargetOrder& order,
                    const TS* X, TS alpha);

  // ---- the commit: staged copies, committed only when no failure was recorded
  template <class T>
  T* stage(T* dst, std::size_t n, int slot, bool keep);
  template <class T>
  void commit(const T* staged, T* dst, std::size_t n);
  void count_step(double* stats);

  // ---- stabilisation bookkeeping
  template <class TV, class TS>
  std::int64_t steps(const FactoredState<TV, TS>&) const {
    return steps_;
  }
  void set_steps(std::int64_t steps) { steps_ = steps; }
  StepFlags* flags() const { return static_cast<StepFlags*>(flags_.get()); }
  // A correction asked for by an earlier step's monitoring (as far as the host knows without waiting); runs after
  // the step that sees it, never while a CUDA graph is being captured or after a failed step.
  bool correction_requested();
  // Whether the host may wait for the device now (not while a CUDA graph is being captured).
  bool can_wait() const { return !capturing(); }
  struct NoScope {};
  NoScope pass_scope() const { return {}; }  // the device's parallelism is not the host's concern
  // The carried bounds live on the device; reading them would wait for it, so every step is monitored.
  template <class TV, class TS>
  bool monitor_may_be_due(const FactoredState<TV, TS>&, const StabilizeOptions&) const {
    return true;
  }
  void correction_done() { clear(); }
  void synchronize();
  template <class T>
  std::vector<T> download(const T* src, std::size_t n);
  template <class T>
  void upload(const std::vector<T>& src, T* dst);
  ExactMath exact_math() { return ExactMath(blas); }
  template <class TV>
  void accumulate_gram(const TV* tile, int rows, int d, double* VtV, double* Vt1);

  // ---- host view of the flags
  // The flags as the last publish() left them in page-locked host memory; may lag behind the queued work.
  const StepFlags& published() const { return *host_flags_.get(); }
  void publish();        // queues a copy of the device flags to the host (no wait)
  void finish_pending();  // waits for the device and makes published() current
  void clear();          // waits for the device, then clears the flags on both sides
  bool capturing() const;

 private:
  Workspace ws_;
  DeviceBuffer flags_;
  PinnedValue<StepFlags> host_flags_;
  std::int64_t steps_ = 0;  // host copy of stats[kStatSteps], for check_every / refresh_every
};

}  // namespace sparsetarget::cuda
