// Device helpers and the small kernels that cuBLAS does not cover (mirror of ../cpu/kernels_cpu.h): warp sums, CSR
// lookups, elementwise copies and scales, row dots, finiteness and status bookkeeping. CUDA code only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../host_device.h"
#include "state_cuda.cuh"

namespace sparsetarget::cuda {

constexpr int kWarp = 32;

template <class T>
__device__ inline T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Grid-stride loop over [0, n).
#define ST_GRID_LOOP(i, n)                                                                       \
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)

// The row j of a CSR entry e: indptr[j] <= e < indptr[j + 1] (empty rows skipped).
__device__ inline std::int64_t row_of(const std::int64_t* indptr, std::int64_t m, std::int64_t e) {
  std::int64_t lo = 0, hi = m - 1;
  while (lo < hi) {
    const std::int64_t mid = (lo + hi + 1) / 2;
    if (indptr[mid] <= e)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// First position in sorted[0, n) whose key is >= key (lower) or > key (upper).
__device__ inline std::int64_t lower_bound(const std::int64_t* sorted, std::int64_t n, std::int64_t key) {
  std::int64_t lo = 0, hi = n;
  while (lo < hi) {
    const std::int64_t mid = (lo + hi) / 2;
    if (sorted[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}
__device__ inline std::int64_t upper_bound(const std::int64_t* sorted, std::int64_t n, std::int64_t key) {
  std::int64_t lo = 0, hi = n;
  while (lo < hi) {
    const std::int64_t mid = (lo + hi) / 2;
    if (sorted[mid] <= key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Records the first error of a step; later ones are dropped.
__device__ inline void raise_error(StepFlags* status, int code) { atomicCAS(&status->error, kOk, code); }

__device__ inline bool failed(const StepFlags* status) {
  return *reinterpret_cast<const volatile int*>(&status->error) != kOk;
}

template <class T>
__global__ void check_finite_kernel(const T* x, std::size_t n, StepFlags* status) {
  ST_GRID_LOOP(i, n) {
    if (!isfinite(static_cast<double>(x[i]))) {
      raise_error(status, kNonFinite);
      return;
    }
  }
}

template <class T>
void check_finite(const T* x, std::size_t n, StepFlags* status, cudaStream_t stream) {
  if (n == 0) return;
  check_finite_kernel<T><<<blocks_for(n, 256, 1024), 256, 0, stream>>>(x, n, status);
  check_launch("check_finite");
}

// dst <- src, elementwise.
template <class T>
__global__ void copy_kernel(const T* src, T* dst, std::size_t n) {
  ST_GRID_LOOP(i, n) dst[i] = src[i];
}

template <class T>
void copy(const T* src, T* dst, std::size_t n, cudaStream_t stream) {
  if (n == 0) return;
  copy_kernel<T><<<blocks_for(n, 256), 256, 0, stream>>>(src, dst, n);
  check_launch("copy");
}

// x <- a * x
template <class T>
__global__ void scale_kernel(T* x, std::size_t n, double a) {
  ST_GRID_LOOP(i, n) x[i] = static_cast<T>(x[i] * a);
}

template <class T>
void scale(T* x, std::size_t n, double a, cudaStream_t stream) {
  if (n == 0) return;
  scale_kernel<T><<<blocks_for(n, 256), 256, 0, stream>>>(x, n, a);
  check_launch("scale");
}

// out[j] = a_j . b_j for the rows of two m x d row-major matrices; one warp per row.
template <class T>
__global__ void row_dots_kernel(const T* a, const T* b, int m, int d, T* out) {
  const std::int64_t warp = (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= m) return;
  const T* ra = a + warp * d;
  const T* rb = b + warp * d;
  T acc = 0;
  for (int i = lane; i < d; i += kWarp) acc += ra[i] * rb[i];
  acc = warp_sum(acc);
  if (lane == 0) out[warp] = acc;
}

template <class T>
void row_dots(const T* a, const T* b, int m, int d, T* out, cudaStream_t stream) {
  const std::size_t threads = static_cast<std::size_t>(m) * kWarp;
  row_dots_kernel<T><<<blocks_for(threads, 256, 1u << 30), 256, 0, stream>>>(a, b, m, d, out);
  check_launch("row_dots");
}

}  // namespace sparsetarget::cuda
