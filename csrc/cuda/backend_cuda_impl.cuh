// Definitions of the CudaBackend member templates that launch kernels (declared in backend_cuda.cuh). Included only
// by the .cu files that instantiate the algorithm for this backend.
#pragma once

#include <cub/device/device_radix_sort.cuh>

#include <cmath>

#include "../state.h"
#include "backend_cuda.cuh"
#include "kernels_cuda.cuh"

namespace sparsetarget::cuda {

constexpr int kThreads = 256;

// Backend-private scratch slots.
enum BackendSlot : int {
  kSlotInvert = kSlotBackend,  // .. + 3 (blas::invert)
  kSlotRcond = kSlotBackend + 4,
  kSlotSortIds,
  kSlotSortKeysOut,
  kSlotSortIdsOut,
  kSlotSortTemp,
  kSlotWide,
  kSlotOnes,
  kSlotIndexSums,
};

inline unsigned warps_grid(std::int64_t warps) {
  return blocks_for(static_cast<std::size_t>(warps) * kWarp, kThreads, 1u << 30);
}

template <class F>
__global__ void for_each_kernel(std::size_t n, F f) {
  ST_GRID_LOOP(i, n) f(i);
}

template <class F>
__global__ void for_rows_kernel(int rows, int cols, F f) {
  ST_GRID_LOOP(x, static_cast<std::size_t>(rows) * cols) f(static_cast<int>(x / cols), static_cast<int>(x % cols));
}

template <class T>
__global__ void fill_kernel(T* x, std::size_t n, T value) {
  ST_GRID_LOOP(i, n) x[i] = value;
}

// *out = ||x||, one block.
template <class T>
__global__ void norm2_kernel(const T* x, std::size_t n, double* out) {
  __shared__ double part[kThreads];
  double acc = 0;
  for (std::size_t i = threadIdx.x; i < n; i += blockDim.x) acc += static_cast<double>(x[i]) * x[i];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = sqrt(part[0]);
}

__global__ void check_rcond_kernel(const double* rcond, double min_rcond, StepFlags* flags);

template <class TV, class TS>
__global__ void gather_kernel(const TV* V, std::int64_t D, int d, const TS* UH, const TS* Hw,
                              const std::int64_t* indptr, const std::int64_t* indices, std::int64_t m,
                              std::int64_t nnz, TS* A, StepFlags* flags) {
  const std::int64_t e = (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (e >= nnz) return;
  const std::int64_t k = indices[e];
  const std::int64_t j = row_of(indptr, m, e);
  if (k < 0 || k >= D) {
    if (lane == 0) {
      if (atomicCAS(&flags->error, kOk, kBadTarget) == kOk) flags->bad_index = k;
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

// sum_k z_jk over the entries of row j; an index outside [0, D) is recorded as kBadTarget (the step commits nothing).
template <class TS>
__device__ TS checked_row_sum(const std::int64_t* indptr, const std::int64_t* indices, std::int64_t D, const TS* dA,
                              std::int64_t j, StepFlags* flags) {
  TS zs = 0;
  for (std::int64_t e = indptr[j]; e < indptr[j + 1]; ++e) {
    zs += dA[e];
    const std::int64_t k = indices[e];
    if ((k < 0 || k >= D) && atomicCAS(&flags->error, kOk, kBadTarget) == kOk) flags->bad_index = k;
  }
  return zs;
}

// Row j of Zv = sum_k z_jk V[k] and z_sum_j = sum_k z_jk; one block per row.
template <class TV, class TS>
__global__ void zv_rows_kernel(const TV* V, std::int64_t D, int d, const std::int64_t* indptr,
                               const std::int64_t* indices, const TS* dA, TS* Zv, TS* z_sum, StepFlags* flags) {
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
  if (threadIdx.x == 0) z_sum[j] = checked_row_sum(indptr, indices, D, dA, j, flags);
}

// z_sum_j = sum_k z_jk, flagging a target index outside [0, D).
template <class TS>
__global__ void row_sums_kernel(const std::int64_t* indptr, const std::int64_t* indices, std::int64_t D,
                                const TS* dA, std::int64_t m, TS* z_sum, StepFlags* flags) {
  ST_GRID_LOOP(j, static_cast<std::size_t>(m)) z_sum[j] = checked_row_sum(indptr, indices, D, dA, j, flags);
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
      if (z == TS(0) || k < 0 || k >= D) continue;  // out of range: flagged, the step commits nothing
      const std::int64_t hi = upper_bound(sorted_keys, nnz, k);
      for (std::int64_t p = lower_bound(sorted_keys, nnz, k); p < hi; ++p) {
        const std::int64_t f = sorted_ids[p];
        const TS zf = dA[f];
        if (zf != TS(0)) row[row_of(indptr, m, f)] += z * zf;
      }
    }
  }
}

// Y[p] = sum over the run of equal sorted keys starting at p of z_f H[row(f)] (one warp per run start), for
// target_overlaps_times.
template <class TS>
__global__ void index_sums_kernel(int d, const std::int64_t* sorted_keys, const std::int64_t* sorted_ids,
                                  std::int64_t nnz, const std::int64_t* indptr, std::int64_t m, const TS* dA,
                                  const TS* H, TS* Y) {
  const std::int64_t p = (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (p >= nnz) return;
  const std::int64_t k = sorted_keys[p];
  if (p > 0 && sorted_keys[p - 1] == k) return;
  std::int64_t end = p + 1;
  while (end < nnz && sorted_keys[end] == k) ++end;
  for (int i = lane; i < d; i += kWarp) {
    TS acc = 0;
    for (std::int64_t q = p; q < end; ++q) {
      const std::int64_t f = sorted_ids[q];
      const TS z = dA[f];
      if (z != TS(0)) acc += z * H[row_of(indptr, m, f) * d + i];
    }
    Y[p * d + i] = acc;
  }
}

// T[j] = sum over the entries e of row j of z_e Y[first sorted position of index(e)] (one warp per row).
template <class TS>
__global__ void overlaps_times_kernel(int d, const std::int64_t* indptr, const std::int64_t* indices, std::int64_t m,
                                      std::int64_t nnz, std::int64_t D, const TS* dA, const std::int64_t* sorted_keys,
                                      const TS* Y, TS* T) {
  const std::int64_t j = (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (j >= m) return;
  for (int i = lane; i < d; i += kWarp) {
    TS acc = 0;
    for (std::int64_t e = indptr[j]; e < indptr[j + 1]; ++e) {
      const TS z = dA[e];
      const std::int64_t k = indices[e];
      if (z == TS(0) || k < 0 || k >= D) continue;  // out of range: flagged, the step commits nothing
      acc += z * Y[lower_bound(sorted_keys, nnz, k) * d + i];
    }
    T[j * d + i] = acc;
  }
}

// V[k] += alpha sum over entries e with index k of z_e X[row(e)]; one warp per run of equal sorted keys; nothing
// when a failure was recorded.
template <class TV, class TS>
__global__ void scatter_kernel(TV* V, std::int64_t D, int d, const std::int64_t* sorted_keys,
                               const std::int64_t* sorted_ids, std::int64_t nnz, const std::int64_t* indptr,
                               std::int64_t m, const TS* dA, const TS* X, TS alpha, const StepFlags* flags) {
  const std::int64_t p = (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (p >= nnz || failed(flags)) return;
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
    v[i] = static_cast<TV>(v[i] + alpha * acc);
  }
}

template <class T>
__global__ void commit_kernel(const StepFlags* flags, const T* staged, T* dst, std::size_t n) {
  if (failed(flags)) return;
  ST_GRID_LOOP(i, n) dst[i] = staged[i];
}

template <class TV>
__global__ void widen_kernel(const TV* src, double* dst, std::size_t n) {
  ST_GRID_LOOP(i, n) dst[i] = static_cast<double>(src[i]);
}

// ---------------------------------------------------------------------------------------------------- members
template <class F>
void CudaBackend::for_each(std::size_t n, const F& f) {
  if (n == 0) return;
  for_each_kernel<F><<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(n, f);
  check_launch("for_each");
}

template <class F>
void CudaBackend::for_rows(int rows, int cols, const F& f, std::size_t /*row_work*/) {
  const std::size_t n = static_cast<std::size_t>(rows) * cols;
  if (n == 0) return;
  for_rows_kernel<F><<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(rows, cols, f);
  check_launch("for_rows");
}

template <class T>
void CudaBackend::copy(const T* src, T* dst, std::size_t n) {
  cuda::copy<T>(src, dst, n, stream());
}

template <class T>
void CudaBackend::fill(T* dst, std::size_t n, T value) {
  if (n == 0) return;
  fill_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(dst, n, value);
  check_launch("fill");
}

template <class T>
void CudaBackend::scale(T* x, std::size_t n, double a) {
  cuda::scale<T>(x, n, a, stream());
}

template <class T>
void CudaBackend::row_dots(const T* a, const T* b, int m, int d, T* out) {
  cuda::row_dots<T>(a, b, m, d, out, stream());
}

template <class T>
void CudaBackend::norm2(const T* x, std::size_t n, double* out) {
  norm2_kernel<T><<<1, kThreads, 0, stream()>>>(x, n, out);
  check_launch("norm2");
}

template <class T>
Inverse<T> CudaBackend::invert(int n, T* a, T* inverse, bool floor_one) {
  double* rcond = ws_.get<double>(kSlotRcond, 1);
  blas::invert<T>(blas, ws_, kSlotInvert, n, a, inverse, rcond, floor_one);
  return {inverse, rcond};
}

template <class T>
void CudaBackend::require_finite(const T* x, std::size_t n, const char*) {
  check_finite(x, n, flags(), stream());
}

template <class T>
void CudaBackend::require_finite_input(const T* x, std::size_t n, const char*) {
  check_finite(x, n, flags(), stream());
}

template <class T>
void CudaBackend::require_finite_staged(const T* x, std::size_t n) {
  check_finite(x, n, flags(), stream());
}

template <class TV, class TS>
void CudaBackend::gather_outputs(const TV* V, std::int64_t D, int d, const TS* UH, const TS* Hw, const Targets& t,
                                 TS* A) {
  if (t.nnz == 0) return;
  gather_kernel<TV, TS><<<warps_grid(t.nnz), kThreads, 0, stream()>>>(V, D, d, UH, Hw, t.indptr, t.indices, t.m,
                                                                      t.nnz, A, flags());
  check_launch("gather");
}

template <class TV, class TS>
void CudaBackend::combine_target_rows(const TV* V, std::int64_t D, int d, const Targets& t, const TS* dA, TS* Zv,
                                      TS* z_sum) {
  zv_rows_kernel<TV, TS><<<static_cast<unsigned>(t.m), 128, 0, stream()>>>(V, D, d, t.indptr, t.indices, dA, Zv,
                                                                            z_sum, flags());
  check_launch("zv_rows");
}

template <class TS>
void CudaBackend::target_row_sums(const Targets& t, std::int64_t D, const TS* dA, TS* z_sum) {
  row_sums_kernel<TS><<<blocks_for(static_cast<std::size_t>(t.m), kThreads), kThreads, 0, stream()>>>(
      t.indptr, t.indices, D, dA, t.m, z_sum, flags());
  check_launch("row_sums");
}

template <class TS>
void CudaBackend::add_target_overlaps(const Targets& t, std::int64_t D, const TS* dA, const TargetOrder& order,
                                      TS* G) {
  if (t.nnz == 0) return;
  overlaps_kernel<TS><<<blocks_for(static_cast<std::size_t>(t.m), 128), 128, 0, stream()>>>(
      t.indptr, t.indices, t.m, t.nnz, D, dA, order.keys, order.ids, G);
  check_launch("overlaps");
}

template <class TS>
void CudaBackend::target_overlaps_times(const Targets& t, std::int64_t D, const TS* dA, const TargetOrder& order,
                                        const TS* H, int d, TS* T) {
  if (t.nnz == 0) {
    fill(T, static_cast<std::size_t>(t.m) * d, TS(0));
    return;
  }
  TS* Y = ws_.get<TS>(kSlotIndexSums, static_cast<std::size_t>(t.nnz) * d);
  index_sums_kernel<TS><<<warps_grid(t.nnz), kThreads, 0, stream()>>>(d, order.keys, order.ids, t.nnz, t.indptr, t.m,
                                                                      dA, H, Y);
  check_launch("index sums");
  overlaps_times_kernel<TS><<<warps_grid(t.m), kThreads, 0, stream()>>>(d, t.indptr, t.indices, t.m, t.nnz, D, dA,
                                                                        order.keys, Y, T);
  check_launch("overlaps times");
}

template <class TV, class TS>
void CudaBackend::scatter_rows(TV* V, std::int64_t D, int d, const Targets& t, const TS* dA,
                               const TargetOrder& order, const TS* X, TS alpha) {
  if (t.nnz == 0) return;
  scatter_kernel<TV, TS><<<warps_grid(t.nnz), kThreads, 0, stream()>>>(V, D, d, order.keys, order.ids, t.nnz,
                                                                       t.indptr, t.m, dA, X, alpha, flags());
  check_launch("scatter");
}

template <class T>
T* CudaBackend::stage(T* dst, std::size_t n, int slot, bool keep) {
  T* staged = ws_.get<T>(slot, n);
  if (keep) copy(dst, staged, n);
  return staged;
}

template <class T>
void CudaBackend::commit(const T* staged, T* dst, std::size_t n) {
  if (n == 0) return;
  commit_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(flags(), staged, dst, n);
  check_launch("commit");
}

// Both on the caller's stream and waited for: a plain cudaMemcpy runs on the legacy default stream, which a
// non-blocking caller stream is not ordered with.
template <class T>
std::vector<T> CudaBackend::download(const T* src, std::size_t n) {
  std::vector<T> out(n);
  check(cudaMemcpyAsync(out.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost, stream()), "copy to host");
  check(cudaStreamSynchronize(stream()), "synchronize");
  return out;
}

template <class T>
void CudaBackend::upload(const std::vector<T>& src, T* dst) {
  check(cudaMemcpyAsync(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice, stream()),
        "copy to device");
  check(cudaStreamSynchronize(stream()), "synchronize");
}

template <class TV>
void CudaBackend::accumulate_gram(const TV* tile, int rows, int d, double* VtV, double* Vt1) {
  const std::size_t n = static_cast<std::size_t>(rows) * d;
  double* wide = ws_.get<double>(kSlotWide, static_cast<std::size_t>(kTileRows) * d);
  double* ones = ws_.get<double>(kSlotOnes, static_cast<std::size_t>(kTileRows));
  fill(ones, static_cast<std::size_t>(rows), 1.0);
  widen_kernel<TV><<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(tile, wide, n);
  check_launch("widen");
  blas::syrk_t<double>(blas, d, rows, 1, wide, d, 1, VtV, d);
  blas::gemv<double>(blas, Op::T, rows, d, 1, wide, d, ones, 1, Vt1);
}

}  // namespace sparsetarget::cuda
