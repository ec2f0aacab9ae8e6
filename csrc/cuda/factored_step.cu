// The exact minibatch step on the GPU; formulas and notation as in ../factored_step.cpp:
//   alpha = 2 dL/dq, beta = dL/ds, z = dL/dA (sparse), c = 1 - lr wd,
//   M = c I - lr H^T diag(alpha) H, U <- U M, U^-1 <- M^-1 U^-1, omega <- M^T omega - lr H^T beta,
//   Q <- c^2 Q - lr (H^T B + B^T H) with B = c G_H - (lr/2) G H, w_bar <- c w_bar - lr H^T (g . 1),
//   V[k] <- V[k] - lr sum_j z_jk (h_j^T U_new^-1).
// Dense products go to cuBLAS; the sparse parts (rows of V, the target overlaps) are kernels below. The target
// entries are sorted by index once per step (CUB radix sort) so that both the overlap Z Z^T and the scatter into V
// visit each index's entries in a fixed order, with one writer per output: deterministic without atomics.
#include "factored_step.cuh"

#include <cub/device/device_radix_sort.cuh>

#include <cmath>
#include <string>

#include "kernels.cuh"

namespace sparsetarget::cuda {

using blas::Op;

namespace {

// Workspace slots of a step (blas::invert takes four from kSlotInvert).
enum Slot : int {
  kSlotZv,
  kSlotWZ,
  kSlotZSum,
  kSlotGOne,
  kSlotV,
  kSlotG,
  kSlotP2,
  kSlotAH,
  kSlotHHt,
  kSlotS,
  kSlotSInv,
  kSlotKH,
  kSlotKHU,
  kSlotX,
  kSlotUNew,
  kSlotUInvNew,
  kSlotQNew,
  kSlotOmegaNew,
  kSlotWBarNew,
  kSlotB,
  kSlotRcond,
  kSlotSortKeys,
  kSlotSortIds,
  kSlotSortKeysOut,
  kSlotSortIdsOut,
  kSlotSortTemp,
  kSlotInvert,  // .. kSlotInvert + 3
};

constexpr int kThreads = 256;

template <class TV, class TS>
__global__ void gather_kernel(const TV* V, std::int64_t D, int d, const TS* UH, const TS* Hw,
                              const std::int64_t* indptr, const std::int64_t* indices, std::int64_t m,
                              std::int64_t nnz, TS* A, DeviceStatus* status) {
  const std::int64_t e = (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (e >= nnz) return;
  const std::int64_t k = indices[e];
  const std::int64_t j = row_of(indptr, m, e);
  if (k < 0 || k >= D) {
    if (lane == 0) {
      if (atomicCAS(&status->error, kOk, kBadTarget) == kOk) status->bad_index = k;
      A[e] = TS(0);
    }
    return;
  }
  const TV* v = V + k * d;
  const TS* uh = UH + j * d;
  TS acc = 0;
  for (int i = lane; i < d; i += kWarp) acc += static_cast<TS>(v[i]) * uh[i];
  acc = warp_sum(acc);
  if (lane == 0) A[e] = acc + Hw[j];
}

// Row j of Zv = sum_k z_jk V[k] and z_sum_j = sum_k z_jk; one block per row.
template <class TV, class TS>
__global__ void zv_rows_kernel(const TV* V, std::int64_t D, int d, const std::int64_t* indptr,
                               const std::int64_t* indices, const TS* dA, TS* Zv, TS* z_sum, DeviceStatus* status) {
  const std::int64_t j = blockIdx.x;
  const std::int64_t lo = indptr[j], hi = indptr[j + 1];
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    TS acc = 0;
    for (std::int64_t e = lo; e < hi; ++e) {
      const std::int64_t k = indices[e];
      const TS z = dA[e];
      if (z != TS(0) && k >= 0 && k < D) acc += z * static_cast<TS>(V[k * d + i]);
    }
    Zv[j * d + i] = acc;
  }
  if (threadIdx.x == 0) {
    TS zs = 0;
    for (std::int64_t e = lo; e < hi; ++e) {
      zs += dA[e];
      const std::int64_t k = indices[e];
      if ((k < 0 || k >= D) && atomicCAS(&status->error, kOk, kBadTarget) == kOk) status->bad_index = k;
    }
    z_sum[j] = zs;
  }
}

template <class TS>
__global__ void row_sums_kernel(const std::int64_t* indptr, const TS* dA, std::int64_t m, TS* z_sum) {
  ST_GRID_LOOP(j, static_cast<std::size_t>(m)) {
    TS zs = 0;
    for (std::int64_t e = indptr[j]; e < indptr[j + 1]; ++e) zs += dA[e];
    z_sum[j] = zs;
  }
}

// WZ_j += z_sum_j omega, then grad_h_j = alpha_j Q h_j + beta_j w_bar + W^T z_j.
template <class TS>
__global__ void grad_rows_kernel(int m, int d, const TS* dq, const TS* ds, const TS* HQ, const TS* w_bar,
                                 const TS* omega, const TS* z_sum, TS* WZ, TS* grad_H) {
  ST_GRID_LOOP(x, static_cast<std::size_t>(m) * d) {
    const std::size_t j = x / d, i = x % d;
    const TS wz = WZ[x] + z_sum[j] * omega[i];
    WZ[x] = wz;
    grad_H[x] = 2 * dq[j] * HQ[x] + ds[j] * w_bar[i] + wz;
  }
}

// W^T z_j = grad_h_j - alpha_j Q h_j - beta_j w_bar from a known grad_H.
template <class TS>
__global__ void wz_from_known_kernel(int m, int d, const TS* dq, const TS* ds, const TS* HQ, const TS* w_bar,
                                     const TS* grad_H, TS* WZ) {
  ST_GRID_LOOP(x, static_cast<std::size_t>(m) * d) {
    const std::size_t j = x / d, i = x % d;
    WZ[x] = grad_H[x] - 2 * dq[j] * HQ[x] - ds[j] * w_bar[i];
  }
}

// g_one_j = alpha_j s_j + beta_j D + z_sum_j and v_j = alpha_j (omega . h_j) + beta_j.
template <class TS>
__global__ void row_scalars_kernel(int m, TS D, const TS* dq, const TS* ds, const TS* s, const TS* Hw,
                                   const TS* z_sum, TS* g_one, TS* v) {
  ST_GRID_LOOP(j, static_cast<std::size_t>(m)) {
    const TS alpha = 2 * dq[j];
    g_one[j] = alpha * s[j] + ds[j] * D + z_sum[j];
    v[j] = alpha * Hw[j] + ds[j];
  }
}

// G_ij = g_i . g_j from o_i . o_j (in G) and o_i . z_j (in P2), without the sparse overlaps.
template <class TS>
__global__ void gram_kernel(int m, TS D, const TS* dq, const TS* ds, const TS* s, const TS* z_sum, const TS* P2,
                            TS* G) {
  ST_GRID_LOOP(x, static_cast<std::size_t>(m) * m) {
    const std::size_t i = x / m, j = x % m;
    const TS ai = 2 * dq[i], aj = 2 * dq[j];
    G[x] = ai * aj * G[x] + ai * ds[j] * s[i] + ds[i] * aj * s[j] + D * ds[i] * ds[j] + ai * P2[x] +
           aj * P2[j * m + i] + ds[i] * z_sum[j] + ds[j] * z_sum[i];
  }
}

// G_ij += sum of z_ik z_jk over indices k shared by rows i and j (duplicates included); one thread per row i,
// walking the entries of each of its indices in sorted order.
template <class TS>
__global__ void overlaps_kernel(const std::int64_t* indptr, const std::int64_t* indices, std::int64_t m,
                                std::int64_t nnz, std::int64_t D, const TS* dA, const std::int64_t* sorted_keys,
                                const std::int64_t* sorted_ids, TS* G) {
  ST_GRID_LOOP(i, static_cast<std::size_t>(m)) {
    TS* row = G + i * m;
    for (std::int64_t e = indptr[i]; e < indptr[i + 1]; ++e) {
      const TS z = dA[e];
      const std::int64_t k = indices[e];
      if (z == TS(0) || k < 0 || k >= D) continue;
      const std::int64_t hi = upper_bound(sorted_keys, nnz, k);
      for (std::int64_t p = lower_bound(sorted_keys, nnz, k); p < hi; ++p) {
        const std::int64_t f = sorted_ids[p];
        const TS zf = dA[f];
        if (zf != TS(0)) row[row_of(indptr, m, f)] += z * zf;
      }
    }
  }
}

// out_j = 2 dq_j h_j (alpha H).
template <class TS>
__global__ void scale_rows_kernel(int m, int d, const TS* dq, const TS* H, TS* out) {
  ST_GRID_LOOP(x, static_cast<std::size_t>(m) * d) out[x] = 2 * dq[x / d] * H[x];
}

// S = I_m - (lr / c) diag(alpha) H H^T
template <class TS>
__global__ void woodbury_kernel(int m, TS lr_over_c, const TS* dq, const TS* HHt, TS* S) {
  ST_GRID_LOOP(x, static_cast<std::size_t>(m) * m) {
    const std::size_t i = x / m, j = x % m;
    S[x] = (i == j ? TS(1) : TS(0)) - lr_over_c * (2 * dq[i]) * HHt[x];
  }
}

template <class TS>
__global__ void scaled_identity_kernel(int n, TS c, TS* M) {
  ST_GRID_LOOP(x, static_cast<std::size_t>(n) * n) M[x] = (x / n == x % n) ? c : TS(0);
}

__global__ void iota_kernel(std::int64_t* out, std::int64_t n) {
  ST_GRID_LOOP(i, static_cast<std::size_t>(n)) out[i] = static_cast<std::int64_t>(i);
}

__global__ void check_rcond_kernel(const double* rcond, double min_rcond, DeviceStatus* status) {
  if (!(*rcond >= min_rcond) && atomicCAS(&status->error, kOk, kSingularUpdate) == kOk) status->rcond = *rcond;
}

// The d x d and d-vector parts of the commit, only when no error was recorded; counts the step.
template <class TS>
__global__ void commit_small_kernel(int d, const DeviceStatus* status, const TS* U_new, const TS* U_inv_new,
                                    const TS* Q_new, const TS* omega_new, const TS* w_bar_new, TS* U, TS* U_inv,
                                    TS* Q, TS* omega, TS* w_bar, double* stats) {
  if (failed(status)) return;
  ST_GRID_LOOP(x, static_cast<std::size_t>(d) * d) {
    U[x] = U_new[x];
    U_inv[x] = U_inv_new[x];
    Q[x] = Q_new[x];
    if (x < static_cast<std::size_t>(d)) {
      omega[x] = omega_new[x];
      w_bar[x] = w_bar_new[x];
    }
    if (x == 0) stats[kStatSteps] += 1;
  }
}

// V[k] <- V[k] - lr sum over entries e with index k of z_e X[row(e)]; one warp per run of equal sorted keys.
template <class TV, class TS>
__global__ void scatter_kernel(TV* V, std::int64_t D, int d, const std::int64_t* sorted_keys,
                               const std::int64_t* sorted_ids, std::int64_t nnz, const std::int64_t* indptr,
                               std::int64_t m, const TS* dA, const TS* X, TS lr, const DeviceStatus* status) {
  const std::int64_t p = (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (p >= nnz || failed(status)) return;
  const std::int64_t k = sorted_keys[p];
  if ((p > 0 && sorted_keys[p - 1] == k) || k < 0 || k >= D) return;
  std::int64_t end = p + 1;
  while (end < nnz && sorted_keys[end] == k) ++end;
  TV* v = V + k * d;
  for (int i = lane; i < d; i += kWarp) {
    TS acc = 0;
    for (std::int64_t q = p; q < end; ++q) {
      const std::int64_t f = sorted_ids[q];
      const TS z = dA[f];
      if (z != TS(0)) acc += z * X[row_of(indptr, m, f) * d + i];
    }
    v[i] = static_cast<TV>(v[i] - lr * acc);
  }
}

unsigned warps_grid(std::int64_t warps) {
  return blocks_for(static_cast<std::size_t>(warps) * kWarp, kThreads, 1u << 30);
}

int key_bits(std::int64_t D) {
  int bits = 1;
  while (bits < 63 && (std::int64_t{1} << bits) < D) ++bits;
  return bits;
}

// Sorts the target entries by index: sorted_keys (indices) and sorted_ids (entry numbers), stable.
void sort_entries(Context& ctx, const DeviceTargets& t, std::int64_t D, const std::int64_t** sorted_keys,
                  const std::int64_t** sorted_ids) {
  const cudaStream_t s = ctx.stream();
  const std::size_t n = static_cast<std::size_t>(t.nnz);
  std::int64_t* ids = ctx.ws.get<std::int64_t>(kSlotSortIds, n);
  std::int64_t* keys_out = ctx.ws.get<std::int64_t>(kSlotSortKeysOut, n);
  std::int64_t* ids_out = ctx.ws.get<std::int64_t>(kSlotSortIdsOut, n);
  iota_kernel<<<blocks_for(n, kThreads), kThreads, 0, s>>>(ids, t.nnz);
  check_launch("iota");
  std::size_t temp_bytes = 0;
  const int bits = key_bits(D);
  check(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, t.indices, keys_out, ids, ids_out, t.nnz, 0, bits, s),
        "radix sort (size query)");
  void* temp = ctx.ws.get<unsigned char>(kSlotSortTemp, temp_bytes);
  check(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, t.indices, keys_out, ids, ids_out, t.nnz, 0, bits, s),
        "radix sort");
  *sorted_keys = keys_out;
  *sorted_ids = ids_out;
}

// grad_H, leaving z_sum and WZ (row j = W^T z_j) in the workspace for the step.
template <class TV, class TS>
void hidden_gradient_into(Context& ctx, const FactoredState<TV, TS>& st, const DeviceTargets& t,
                          const ProjectionsView<TS>& p, const TS* dA, const TS* dq, const TS* ds, TS* grad_H) {
  const int d = st.d, m = p.m;
  const std::size_t md = static_cast<std::size_t>(m) * d;
  const cudaStream_t s = ctx.stream();
  TS* Zv = ctx.ws.get<TS>(kSlotZv, md);
  TS* WZ = ctx.ws.get<TS>(kSlotWZ, md);
  TS* z_sum = ctx.ws.get<TS>(kSlotZSum, m);
  zv_rows_kernel<TV, TS><<<m, 128, 0, s>>>(st.V, st.D, d, t.indptr, t.indices, dA, Zv, z_sum, ctx.status());
  check_launch("zv_rows");
  // W^T z_j = U^T (sum_k z_jk V[k]) + (sum_k z_jk) omega, as rows of WZ.
  blas::gemm<TS>(ctx.blas, Op::N, Op::N, m, d, d, 1, Zv, d, st.U, d, 0, WZ, d);
  grad_rows_kernel<TS><<<blocks_for(md, kThreads), kThreads, 0, s>>>(m, d, dq, ds, p.HQ, st.w_bar, st.omega, z_sum,
                                                                    WZ, grad_H);
  check_launch("grad_rows");
}

}  // namespace

Context::Context() : status_(sizeof(DeviceStatus)) {
  check(cudaMemset(status_.get(), 0, sizeof(DeviceStatus)), "cudaMemset");
}

void Context::publish() {
  check(cudaMemcpyAsync(host_status_.get(), status_.get(), sizeof(DeviceStatus), cudaMemcpyDeviceToHost, stream()),
        "status copy");
}

void Context::clear() {
  check(cudaDeviceSynchronize(), "synchronize");
  check(cudaMemset(status_.get(), 0, sizeof(DeviceStatus)), "cudaMemset");
  check(cudaDeviceSynchronize(), "synchronize");
  *host_status_.get() = DeviceStatus{};
}

template <class TV, class TS>
void project(Context& ctx, const FactoredState<TV, TS>& st, const TS* H, int m, TS* UH, TS* HQ, TS* q, TS* s,
             TS* Hw) {
  const int d = st.d;
  blas::gemm<TS>(ctx.blas, Op::N, Op::T, m, d, d, 1, H, d, st.U, d, 0, UH, d);
  blas::gemm<TS>(ctx.blas, Op::N, Op::N, m, d, d, 1, H, d, st.Q, d, 0, HQ, d);
  blas::gemv<TS>(ctx.blas, Op::N, m, d, 1, H, d, st.w_bar, 0, s);
  blas::gemv<TS>(ctx.blas, Op::N, m, d, 1, H, d, st.omega, 0, Hw);
  row_dots<TS>(HQ, H, m, d, q, ctx.stream());
}

template <class TV, class TS>
void gather_outputs(Context& ctx, const FactoredState<TV, TS>& st, const ProjectionsView<TS>& p,
                    const DeviceTargets& t, TS* A) {
  if (t.nnz == 0) return;
  gather_kernel<TV, TS><<<warps_grid(t.nnz), kThreads, 0, ctx.stream()>>>(st.V, st.D, st.d, p.UH, p.Hw, t.indptr,
                                                                          t.indices, t.m, t.nnz, A, ctx.status());
  check_launch("gather");
}

template <class TV, class TS>
void hidden_gradient(Context& ctx, const FactoredState<TV, TS>& st, const DeviceTargets& t,
                     const ProjectionsView<TS>& p, const TS* dA, const TS* dq, const TS* ds, TS* grad_H) {
  hidden_gradient_into(ctx, st, t, p, dA, dq, ds, grad_H);
}

template <class TV, class TS>
void backward_step(Context& ctx, FactoredState<TV, TS>& st, const TS* H, const DeviceTargets& t,
                   const ProjectionsView<TS>& p, const TS* dA, const TS* dq, const TS* ds, const StepOptions& opt,
                   TS* grad_H, bool grad_H_known) {
  const int d = st.d, m = p.m;
  const std::size_t md = static_cast<std::size_t>(m) * d, dd = static_cast<std::size_t>(d) * d,
                    mm = static_cast<std::size_t>(m) * m;
  const TS lr = static_cast<TS>(opt.lr);
  const TS c = static_cast<TS>(1.0 - opt.lr * opt.weight_decay);
  const TS D = static_cast<TS>(st.D);
  if (!(static_cast<double>(c) > 0))
    throw std::invalid_argument("lr * weight_decay must be < 1 (got " + std::to_string(opt.lr * opt.weight_decay) +
                                ")");
  const cudaStream_t s = ctx.stream();
  Workspace& ws = ctx.ws;
  DeviceStatus* status = ctx.status();

  // The step's inputs: a NaN here would otherwise only surface as a NaN in the state.
  check_finite(H, md, status, s);
  check_finite(dA, static_cast<std::size_t>(t.nnz), status, s);
  check_finite(dq, static_cast<std::size_t>(m), status, s);
  check_finite(ds, static_cast<std::size_t>(m), status, s);

  TS* z_sum = ws.get<TS>(kSlotZSum, m);
  TS* WZ = ws.get<TS>(kSlotWZ, md);
  if (grad_H_known) {
    check_finite(grad_H, md, status, s);
    row_sums_kernel<TS><<<blocks_for(m, kThreads), kThreads, 0, s>>>(t.indptr, dA, m, z_sum);
    check_launch("row_sums");
    wz_from_known_kernel<TS><<<blocks_for(md, kThreads), kThreads, 0, s>>>(m, d, dq, ds, p.HQ, st.w_bar, grad_H, WZ);
    check_launch("wz_from_known");
  } else {
    hidden_gradient_into(ctx, st, t, p, dA, dq, ds, grad_H);
  }
  TS* g_one = ws.get<TS>(kSlotGOne, m);
  TS* v = ws.get<TS>(kSlotV, m);
  row_scalars_kernel<TS><<<blocks_for(m, kThreads), kThreads, 0, s>>>(m, D, dq, ds, p.s, p.Hw, z_sum, g_one, v);
  check_launch("row_scalars");

  // Gram matrix of the output gradients g_j = alpha_j o_j + beta_j 1 + z_j, from small quantities only.
  TS* G = ws.get<TS>(kSlotG, mm);
  TS* P2 = ws.get<TS>(kSlotP2, mm);
  blas::gemm<TS>(ctx.blas, Op::N, Op::T, m, m, d, 1, H, d, p.HQ, d, 0, G, m);  // o_i . o_j
  blas::gemm<TS>(ctx.blas, Op::N, Op::T, m, m, d, 1, H, d, WZ, d, 0, P2, m);   // o_i . z_j
  gram_kernel<TS><<<blocks_for(mm, kThreads), kThreads, 0, s>>>(m, D, dq, ds, p.s, z_sum, P2, G);
  check_launch("gram");
  const std::int64_t* sorted_keys = nullptr;
  const std::int64_t* sorted_ids = nullptr;
  if (t.nnz > 0) {
    sort_entries(ctx, t, st.D, &sorted_keys, &sorted_ids);
    overlaps_kernel<TS><<<blocks_for(m, 128), 128, 0, s>>>(t.indptr, t.indices, m, t.nnz, st.D, dA, sorted_keys,
                                                           sorted_ids, G);
    check_launch("overlaps");
  }

  TS* aH = ws.get<TS>(kSlotAH, md);
  scale_rows_kernel<TS><<<blocks_for(md, kThreads), kThreads, 0, s>>>(m, d, dq, H, aH);
  check_launch("scale_rows");

  // U^-1_new and X = H U_new^-1 (row j: what V's target rows of example j move along), with rcond of the factor.
  double* rcond = ws.get<double>(kSlotRcond, 1);
  TS* U_inv_new = ws.get<TS>(kSlotUInvNew, dd);
  TS* X = ws.get<TS>(kSlotX, md);
  if (m < d) {
    // Woodbury: S = I_m - (lr/c) diag(alpha) H H^T, K = (lr/c) S^-1 diag(alpha) H,
    // U^-1_new = (U^-1 + H^T (K U^-1)) / c and X = (H U^-1 + (H H^T)(K U^-1)) / c.
    TS* HHt = ws.get<TS>(kSlotHHt, mm);
    TS* S = ws.get<TS>(kSlotS, mm);
    TS* S_inv = ws.get<TS>(kSlotSInv, mm);
    blas::gemm<TS>(ctx.blas, Op::N, Op::T, m, m, d, 1, H, d, H, d, 0, HHt, m);
    woodbury_kernel<TS><<<blocks_for(mm, kThreads), kThreads, 0, s>>>(m, lr / c, dq, HHt, S);
    check_launch("woodbury");
    blas::invert<TS>(ctx.blas, ws, kSlotInvert, m, S, S_inv, rcond, true);
    TS* KH = ws.get<TS>(kSlotKH, 2 * md);  // rows 0..m-1: K; rows m..2m-1: H
    TS* KHU = ws.get<TS>(kSlotKHU, 2 * md);
    blas::gemm<TS>(ctx.blas, Op::N, Op::N, m, d, m, lr / c, S_inv, m, aH, d, 0, KH, d);
    copy<TS>(H, KH + md, md, s);
    blas::gemm<TS>(ctx.blas, Op::N, Op::N, 2 * m, d, d, 1, KH, d, st.U_inv, d, 0, KHU, d);
    copy<TS>(KHU + md, X, md, s);
    blas::gemm<TS>(ctx.blas, Op::N, Op::N, m, d, m, 1, HHt, m, KHU, d, 1, X, d);
    scale<TS>(X, md, 1.0 / static_cast<double>(c), s);
    copy<TS>(st.U_inv, U_inv_new, dd, s);
    blas::gemm<TS>(ctx.blas, Op::T, Op::N, d, d, m, 1 / c, H, d, KHU, d, 1 / c, U_inv_new, d);
  } else {
    TS* M = ws.get<TS>(kSlotS, dd);
    TS* M_inv = ws.get<TS>(kSlotSInv, dd);
    scaled_identity_kernel<TS><<<blocks_for(dd, kThreads), kThreads, 0, s>>>(d, c, M);
    check_launch("scaled_identity");
    blas::gemm<TS>(ctx.blas, Op::T, Op::N, d, d, m, -lr, H, d, aH, d, 1, M, d);
    blas::invert<TS>(ctx.blas, ws, kSlotInvert, d, M, M_inv, rcond, false);
    blas::gemm<TS>(ctx.blas, Op::N, Op::N, d, d, d, 1, M_inv, d, st.U_inv, d, 0, U_inv_new, d);
    blas::gemm<TS>(ctx.blas, Op::N, Op::N, m, d, d, 1, H, d, U_inv_new, d, 0, X, d);
  }
  check_rcond_kernel<<<1, 1, 0, s>>>(rcond, opt.min_rcond, status);
  check_launch("check_rcond");

  // omega <- c omega - lr H^T (alpha * (H omega) + beta);  w_bar <- c w_bar - lr H^T (g . 1)
  TS* omega_new = ws.get<TS>(kSlotOmegaNew, d);
  TS* w_bar_new = ws.get<TS>(kSlotWBarNew, d);
  copy<TS>(st.omega, omega_new, d, s);
  copy<TS>(st.w_bar, w_bar_new, d, s);
  blas::gemv<TS>(ctx.blas, Op::T, m, d, -lr, H, d, v, c, omega_new);
  blas::gemv<TS>(ctx.blas, Op::T, m, d, -lr, H, d, g_one, c, w_bar_new);
  // Q <- c^2 Q - lr (H^T B + B^T H), B = c G_H - (lr/2) G H
  TS* B = ws.get<TS>(kSlotB, md);
  copy<TS>(grad_H, B, md, s);
  blas::gemm<TS>(ctx.blas, Op::N, Op::N, m, d, m, -lr / 2, G, m, H, d, c, B, d);
  TS* Q_new = ws.get<TS>(kSlotQNew, dd);
  copy<TS>(st.Q, Q_new, dd, s);
  blas::syr2k_t<TS>(ctx.blas, d, m, -lr, H, d, B, d, c * c, Q_new, d);
  blas::mirror_upper<TS>(ctx.blas, d, Q_new, d);
  // U <- c U - lr U H^T aH
  TS* U_new = ws.get<TS>(kSlotUNew, dd);
  copy<TS>(st.U, U_new, dd, s);
  blas::gemm<TS>(ctx.blas, Op::T, Op::N, d, d, m, -lr, p.UH, d, aH, d, c, U_new, d);

  // Everything the commit writes, checked on the device: a NaN or inf turns the commit into a no-op.
  check_finite(U_new, dd, status, s);
  check_finite(U_inv_new, dd, status, s);
  check_finite(Q_new, dd, status, s);
  check_finite(omega_new, d, status, s);
  check_finite(w_bar_new, d, status, s);
  check_finite(X, md, status, s);
  check_finite(grad_H, md, status, s);

  // Commit, conditional on the status: the V scatter first (it reads nothing the small commit writes).
  if (t.nnz > 0) {
    scatter_kernel<TV, TS><<<warps_grid(t.nnz), kThreads, 0, s>>>(st.V, st.D, d, sorted_keys, sorted_ids, t.nnz,
                                                                  t.indptr, m, dA, X, lr, status);
    check_launch("scatter");
  }
  commit_small_kernel<TS><<<blocks_for(dd, kThreads), kThreads, 0, s>>>(d, status, U_new, U_inv_new, Q_new, omega_new,
                                                                        w_bar_new, st.U, st.U_inv, st.Q, st.omega,
                                                                        st.w_bar, st.stats);
  check_launch("commit");
}

#define ST_INSTANTIATE(TV, TS)                                                                                     \
  template void project<TV, TS>(Context&, const FactoredState<TV, TS>&, const TS*, int, TS*, TS*, TS*, TS*, TS*); \
  template void gather_outputs<TV, TS>(Context&, const FactoredState<TV, TS>&, const ProjectionsView<TS>&,        \
                                       const DeviceTargets&, TS*);                                                \
  template void hidden_gradient<TV, TS>(Context&, const FactoredState<TV, TS>&, const DeviceTargets&,             \
                                        const ProjectionsView<TS>&, const TS*, const TS*, const TS*, TS*);        \
  template void backward_step<TV, TS>(Context&, FactoredState<TV, TS>&, const TS*, const DeviceTargets&,          \
                                      const ProjectionsView<TS>&, const TS*, const TS*, const TS*,                \
                                      const StepOptions&, TS*, bool);
ST_INSTANTIATE(float, float)
ST_INSTANTIATE(float, double)
ST_INSTANTIATE(double, float)
ST_INSTANTIATE(double, double)
#undef ST_INSTANTIATE

}  // namespace sparsetarget::cuda
