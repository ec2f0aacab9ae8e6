#include "stabilize.cuh"

#include <cmath>
#include <vector>

#include "blas.cuh"
#include "kernels.cuh"

namespace sparsetarget::cuda {

using blas::Op;

namespace {

constexpr std::int64_t kTileRows = 16384;

enum Slot : int {
  kSlotU = 64,  // after the step's slots
  kSlotPMax,
  kSlotY,
  kSlotR,
  kSlotPMin,
  kSlotNorms,
  kSlotTile,
  kSlotTile2,
  kSlotFactorA,
  kSlotFactorB,
  kSlotVtV,
  kSlotVt1,
  kSlotOnes,
};

template <class T>
std::vector<T> download(const T* src, std::size_t n) {
  std::vector<T> out(n);
  check(cudaMemcpy(out.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost), "copy to host");
  return out;
}

template <class T>
void upload(const std::vector<T>& src, T* dst) {
  check(cudaMemcpy(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice), "copy to device");
}

// Block-wide sum of one value per thread (blockDim.x a power of two, at most 1024).
__device__ double block_sum(double x) {
  __shared__ double part[1024];
  part[threadIdx.x] = x;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = part[0];
  __syncthreads();
  return total;
}

template <class T>
__device__ double block_norm(const T* x, int n) {
  double acc = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += static_cast<double>(x[i]) * x[i];
  return sqrt(block_sum(acc));
}

// x / ||x|| into out, or the uniform unit vector when x is 0 or not finite (as scale_to_unit on the CPU).
template <class T>
__device__ void store_unit(const T* x, T* out, int n) {
  const double nrm = block_norm(x, n);
  const bool ok = nrm > 0 && isfinite(nrm);
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    out[i] = static_cast<T>(ok ? x[i] / nrm : 1.0 / sqrt(static_cast<double>(n)));
}

// One block. u = U p_max, pmax_new = U^T u, y = U^-1 p_min, r = U y - p_min, pmin_new = U^-T y.
template <class TS>
__global__ void finish_monitor_kernel(int d, const TS* u, const TS* pmax_new, const TS* y, const TS* r,
                                      const TS* pmin_new, TS* probe_max, TS* probe_min, double* stats,
                                      DeviceStatus* status, double spread_limit, double inverse_tol,
                                      double scale_limit) {
  if (failed(status)) return;
  const double sigma_max = block_norm(u, d);
  const double inv_norm = block_norm(y, d);
  const double residual = block_norm(r, d);
  store_unit(pmax_new, probe_max, d);
  store_unit(pmin_new, probe_min, d);
  if (threadIdx.x == 0) {
    const double sigma_min = inv_norm > 0 ? 1.0 / inv_norm : 0.0;
    stats[kStatSigmaMax] = sigma_max;
    stats[kStatSigmaMin] = sigma_min;
    stats[kStatInverseResidual] = residual;
    // the same decision as needs_correction() in ../stabilize.cpp
    const bool spread = !(sigma_max <= spread_limit * sigma_min);
    const bool scale = !(sigma_max <= scale_limit) || !(sigma_min >= 1 / scale_limit);
    if (spread || scale || !(residual <= inverse_tol)) status->needs_correction = 1;
  }
}

template <class TV>
__global__ void widen_kernel(const TV* src, double* dst, std::size_t n) {
  ST_GRID_LOOP(i, n) dst[i] = static_cast<double>(src[i]);
}

__global__ void fill_kernel(double* x, std::size_t n, double value) {
  ST_GRID_LOOP(i, n) x[i] = value;
}

// Turns off TF32 for the lifetime of a correction or refresh: they must not round W.
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

// V <- V T^-1 in row tiles (see CorrectionPlan).
template <class TV, class TS>
void apply_to_V(Context& ctx, FactoredState<TV, TS>& st, const CorrectionPlan<TS>& plan) {
  const int d = st.d, k = static_cast<int>(plan.cols.size());
  const cudaStream_t s = ctx.stream();
  if (k == 0) {
    scale<TV>(st.V, static_cast<std::size_t>(st.D) * d, plan.a, s);
    return;
  }
  const TV a = static_cast<TV>(plan.a);
  if (plan.low_rank()) {
    std::vector<TV> Pk, CPkT;
    plan.low_rank_factors(Pk, CPkT);
    TV* Pk_dev = ctx.ws.get<TV>(kSlotFactorA, Pk.size());
    TV* CPkT_dev = ctx.ws.get<TV>(kSlotFactorB, CPkT.size());
    upload(Pk, Pk_dev);
    upload(CPkT, CPkT_dev);
    TV* Y = ctx.ws.get<TV>(kSlotTile, static_cast<std::size_t>(kTileRows) * k);
    for (std::int64_t r0 = 0; r0 < st.D; r0 += kTileRows) {
      const int rows = static_cast<int>(std::min<std::int64_t>(kTileRows, st.D - r0));
      TV* tile = st.V + r0 * d;
      blas::gemm<TV>(ctx.blas, Op::N, Op::N, rows, k, d, 1, tile, d, Pk_dev, k, 0, Y, k);
      blas::gemm<TV>(ctx.blas, Op::N, Op::N, rows, d, k, 1, Y, k, CPkT_dev, d, a, tile, d);
    }
  } else {
    std::vector<TV> Tinv;
    plan.dense_factor(Tinv);
    TV* Tinv_dev = ctx.ws.get<TV>(kSlotFactorA, Tinv.size());
    upload(Tinv, Tinv_dev);
    TV* out = ctx.ws.get<TV>(kSlotTile, static_cast<std::size_t>(kTileRows) * d);
    for (std::int64_t r0 = 0; r0 < st.D; r0 += kTileRows) {
      const int rows = static_cast<int>(std::min<std::int64_t>(kTileRows, st.D - r0));
      TV* tile = st.V + r0 * d;
      blas::gemm<TV>(ctx.blas, Op::N, Op::N, rows, d, d, 1, tile, d, Tinv_dev, d, 0, out, d);
      copy<TV>(out, tile, static_cast<std::size_t>(rows) * d, s);
    }
  }
}

}  // namespace

template <class TV, class TS>
void monitor(Context& ctx, FactoredState<TV, TS>& st, const StabilizeOptions& opt) {
  const int d = st.d;
  TS* u = ctx.ws.get<TS>(kSlotU, d);
  TS* pmax_new = ctx.ws.get<TS>(kSlotPMax, d);
  TS* y = ctx.ws.get<TS>(kSlotY, d);
  TS* r = ctx.ws.get<TS>(kSlotR, d);
  TS* pmin_new = ctx.ws.get<TS>(kSlotPMin, d);
  blas::gemv<TS>(ctx.blas, Op::N, d, d, 1, st.U, d, st.probe_max, 0, u);
  blas::gemv<TS>(ctx.blas, Op::T, d, d, 1, st.U, d, u, 0, pmax_new);
  blas::gemv<TS>(ctx.blas, Op::N, d, d, 1, st.U_inv, d, st.probe_min, 0, y);
  copy<TS>(st.probe_min, r, d, ctx.stream());
  blas::gemv<TS>(ctx.blas, Op::N, d, d, 1, st.U, d, y, -1, r);
  blas::gemv<TS>(ctx.blas, Op::T, d, d, 1, st.U_inv, d, y, 0, pmin_new);
  finish_monitor_kernel<TS><<<1, 256, 0, ctx.stream()>>>(d, u, pmax_new, y, r, pmin_new, st.probe_max, st.probe_min,
                                                          st.stats, ctx.status(), opt.sigma_high / opt.sigma_low,
                                                          opt.inverse_tol, kScaleLimit);
  check_launch("finish_monitor");
}

template <class TV, class TS>
CorrectionReport correct(Context& ctx, FactoredState<TV, TS>& st, const StabilizeOptions& opt) {
  ExactMath exact(ctx.blas);
  const std::size_t dd = static_cast<std::size_t>(st.d) * st.d;
  check(cudaStreamSynchronize(ctx.stream()), "synchronize");
  const std::vector<TS> U = download(st.U, dd);
  const CorrectionPlan<TS> plan = plan_correction(st.d, U.data(), opt);
  if (plan.report.corrected) {
    apply_to_V(ctx, st, plan);
    check(cudaStreamSynchronize(ctx.stream()), "synchronize");
    upload(plan.U, st.U);
  }
  upload(plan.U_inv, st.U_inv);
  std::vector<double> stats = download(st.stats, kStatCount);
  record_correction(plan.report, stats.data());
  upload(stats, st.stats);
  return plan.report;
}

template <class TV, class TS>
void refresh(Context& ctx, FactoredState<TV, TS>& st) {
  ExactMath exact(ctx.blas);
  const int d = st.d;
  const std::size_t dd = static_cast<std::size_t>(d) * d;
  const cudaStream_t s = ctx.stream();
  double* VtV = ctx.ws.get<double>(kSlotVtV, dd);
  double* Vt1 = ctx.ws.get<double>(kSlotVt1, d);
  double* tile64 = ctx.ws.get<double>(kSlotTile2, static_cast<std::size_t>(kTileRows) * d);
  double* ones = ctx.ws.get<double>(kSlotOnes, kTileRows);
  fill_kernel<<<blocks_for(dd, 256), 256, 0, s>>>(VtV, dd, 0.0);
  fill_kernel<<<blocks_for(d, 256), 256, 0, s>>>(Vt1, d, 0.0);
  fill_kernel<<<blocks_for(kTileRows, 256), 256, 0, s>>>(ones, kTileRows, 1.0);
  check_launch("fill");
  for (std::int64_t r0 = 0; r0 < st.D; r0 += kTileRows) {
    const int rows = static_cast<int>(std::min<std::int64_t>(kTileRows, st.D - r0));
    const std::size_t n = static_cast<std::size_t>(rows) * d;
    widen_kernel<TV><<<blocks_for(n, 256), 256, 0, s>>>(st.V + r0 * d, tile64, n);
    check_launch("widen");
    blas::syrk_t<double>(ctx.blas, d, rows, 1, tile64, d, 1, VtV, d);
    blas::gemv<double>(ctx.blas, Op::T, rows, d, 1, tile64, d, ones, 1, Vt1);
  }
  check(cudaStreamSynchronize(s), "synchronize");
  std::vector<double> VtV_host = download(VtV, dd);
  const std::vector<double> Vt1_host = download(Vt1, d);
  const std::vector<TS> U = download(st.U, dd), omega = download(st.omega, d);
  std::vector<TS> Q(dd), w_bar(d), U_inv(dd);
  refresh_small(d, st.D, VtV_host, Vt1_host, U.data(), omega.data(), Q.data(), w_bar.data(), U_inv.data());
  upload(Q, st.Q);
  upload(w_bar, st.w_bar);
  upload(U_inv, st.U_inv);
  std::vector<double> stats = download(st.stats, kStatCount);
  stats[kStatRefreshes] += 1;
  upload(stats, st.stats);
}

template <class TV, class TS>
double inverse_error(Context& ctx, const FactoredState<TV, TS>& st) {
  const std::size_t dd = static_cast<std::size_t>(st.d) * st.d;
  check(cudaStreamSynchronize(ctx.stream()), "synchronize");
  const std::vector<TS> U = download(st.U, dd), U_inv = download(st.U_inv, dd);
  return inverse_error_of(st.d, U.data(), U_inv.data());
}

#define ST_INSTANTIATE(TV, TS)                                                                          \
  template void monitor<TV, TS>(Context&, FactoredState<TV, TS>&, const StabilizeOptions&);             \
  template CorrectionReport correct<TV, TS>(Context&, FactoredState<TV, TS>&, const StabilizeOptions&); \
  template void refresh<TV, TS>(Context&, FactoredState<TV, TS>&);                                      \
  template double inverse_error<TV, TS>(Context&, const FactoredState<TV, TS>&);
ST_INSTANTIATE(float, float)
ST_INSTANTIATE(float, double)
ST_INSTANTIATE(double, float)
ST_INSTANTIATE(double, double)
#undef ST_INSTANTIATE

}  // namespace sparsetarget::cuda
