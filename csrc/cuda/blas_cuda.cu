// Row-major wrappers over column-major cuBLAS: a row-major matrix is the column-major view of its transpose, so
// C = op(A) op(B) is computed as C^T = op(B)^T op(A)^T with the operands swapped.
#include "blas_cuda.cuh"

#include <cmath>

namespace sparsetarget::cuda::blas {

namespace {

constexpr std::size_t kWorkspaceBytes = 32u << 20;  // cuBLAS's recommended workspace for Hopper

cublasOperation_t op_of(Op op) { return op == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T; }
// The column-major operation on the stored view for a row-major gemv.
cublasOperation_t gemv_op_of(Op op) { return op == Op::N ? CUBLAS_OP_T : CUBLAS_OP_N; }

template <class T>
__global__ void mirror_upper_kernel(int n, T* c, int ldc) {
  const std::size_t total = static_cast<std::size_t>(n) * n;
  for (std::size_t x = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; x < total;
       x += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(x / n), j = static_cast<int>(x % n);
    if (i > j) c[static_cast<std::size_t>(i) * ldc + j] = c[static_cast<std::size_t>(j) * ldc + i];
  }
}

// out = max over rows of sum |a_ij| (row-major n x n); inf when an entry is not finite. One block.
template <class T>
__global__ void inf_norm_kernel(int n, const T* a, double* out) {
  __shared__ double best[256];
  double mine = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    double row = 0;
    for (int j = 0; j < n; ++j) row += fabs(static_cast<double>(a[static_cast<std::size_t>(i) * n + j]));
    if (!isfinite(row)) row = INFINITY;
    mine = fmax(mine, row);
  }
  best[threadIdx.x] = mine;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) best[threadIdx.x] = fmax(best[threadIdx.x], best[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = best[0];
}

template <class T>
__global__ void set_pointers_kernel(T** slots, T* a, T* inv) {
  slots[0] = a;
  slots[1] = inv;
}

__global__ void rcond_kernel(const double* norms, const int* info, double* rcond, bool floor_one) {
  const double na = floor_one ? fmax(1.0, norms[0]) : norms[0];
  const double ni = floor_one ? fmax(1.0, norms[1]) : norms[1];
  const double r = 1.0 / (na * ni);
  *rcond = (info[0] == 0 && info[1] == 0 && isfinite(na) && isfinite(ni) && na > 0 && ni > 0) ? r : 0.0;
}

// Typed entry points of cuBLAS.
cublasStatus_t gemm_call(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                         const float* alpha, const float* a, int lda, const float* b, int ldb, const float* beta,
                         float* c, int ldc) {
  return cublasSgemm(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
cublasStatus_t gemm_call(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                         const double* alpha, const double* a, int lda, const double* b, int ldb, const double* beta,
                         double* c, int ldc) {
  return cublasDgemm(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
cublasStatus_t gemv_call(cublasHandle_t h, cublasOperation_t t, int m, int n, const float* alpha, const float* a,
                         int lda, const float* x, const float* beta, float* y) {
  return cublasSgemv(h, t, m, n, alpha, a, lda, x, 1, beta, y, 1);
}
cublasStatus_t gemv_call(cublasHandle_t h, cublasOperation_t t, int m, int n, const double* alpha, const double* a,
                         int lda, const double* x, const double* beta, double* y) {
  return cublasDgemv(h, t, m, n, alpha, a, lda, x, 1, beta, y, 1);
}
cublasStatus_t syr2k_call(cublasHandle_t h, int n, int k, const float* alpha, const float* a, int lda,
                          const float* b, int ldb, const float* beta, float* c, int ldc) {
  return cublasSsyr2k(h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
cublasStatus_t syr2k_call(cublasHandle_t h, int n, int k, const double* alpha, const double* a, int lda,
                          const double* b, int ldb, const double* beta, double* c, int ldc) {
  return cublasDsyr2k(h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
cublasStatus_t syrk_call(cublasHandle_t h, int n, int k, const float* alpha, const float* a, int lda,
                         const float* beta, float* c, int ldc) {
  return cublasSsyrk(h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, n, k, alpha, a, lda, beta, c, ldc);
}
cublasStatus_t syrk_call(cublasHandle_t h, int n, int k, const double* alpha, const double* a, int lda,
                         const double* beta, double* c, int ldc) {
  return cublasDsyrk(h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, n, k, alpha, a, lda, beta, c, ldc);
}
cublasStatus_t syrkx_call(cublasHandle_t h, int n, int k, const float* alpha, const float* a, int lda,
                          const float* b, int ldb, const float* beta, float* c, int ldc) {
  return cublasSsyrkx(h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_T, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
cublasStatus_t syrkx_call(cublasHandle_t h, int n, int k, const double* alpha, const double* a, int lda,
                          const double* b, int ldb, const double* beta, double* c, int ldc) {
  return cublasDsyrkx(h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_T, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
cublasStatus_t getrf_call(cublasHandle_t h, int n, float* const* a, int* piv, int* info) {
  return cublasSgetrfBatched(h, n, a, n, piv, info, 1);
}
cublasStatus_t getrf_call(cublasHandle_t h, int n, double* const* a, int* piv, int* info) {
  return cublasDgetrfBatched(h, n, a, n, piv, info, 1);
}
cublasStatus_t getri_call(cublasHandle_t h, int n, const float* const* a, const int* piv, float* const* c,
                          int* info) {
  return cublasSgetriBatched(h, n, a, n, piv, c, n, info, 1);
}
cublasStatus_t getri_call(cublasHandle_t h, int n, const double* const* a, const int* piv, double* const* c,
                          int* info) {
  return cublasDgetriBatched(h, n, a, n, piv, c, n, info, 1);
}

}  // namespace

Handle::Handle() : workspace_(kWorkspaceBytes) {
  check(cublasCreate(&handle_), "cublasCreate");
  const cublasStatus_t status = cublasSetWorkspace(handle_, workspace_.get(), workspace_.size());
  if (status != CUBLAS_STATUS_SUCCESS) {
    cublasDestroy(handle_);
    check(status, "cublasSetWorkspace");
  }
}

Handle::~Handle() {
  if (handle_) cublasDestroy(handle_);
}

void Handle::set_stream(cudaStream_t stream) {
  if (stream == stream_) return;
  check(cublasSetStream(handle_, stream), "cublasSetStream");
  // setting a stream resets the workspace to cuBLAS's own pool: keep ours (no allocation inside a captured step)
  check(cublasSetWorkspace(handle_, workspace_.get(), workspace_.size()), "cublasSetWorkspace");
  stream_ = stream;
}

void Handle::set_tf32(bool on) {
  check(cublasSetMathMode(handle_, on ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
  tf32_ = on;
}

template <class T>
void gemm(const Handle& h, Op op_a, Op op_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
          T beta, T* c, int ldc) {
  if (m == 0 || n == 0) return;
  check(gemm_call(h.get(), op_of(op_b), op_of(op_a), n, m, k, &alpha, b, ldb, a, lda, &beta, c, ldc), "gemm");
}

template <class T>
void gemv(const Handle& h, Op op_a, int m, int n, T alpha, const T* a, int lda, const T* x, T beta, T* y) {
  if (m == 0 || n == 0) return;
  check(gemv_call(h.get(), gemv_op_of(op_a), n, m, &alpha, a, lda, x, &beta, y), "gemv");
}

template <class T>
void syr2k_t(const Handle& h, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
             int ldc) {
  check(syr2k_call(h.get(), n, k, &alpha, a, lda, b, ldb, &beta, c, ldc), "syr2k");
}

template <class T>
void syrk_t(const Handle& h, int n, int k, T alpha, const T* a, int lda, T beta, T* c, int ldc) {
  check(syrk_call(h.get(), n, k, &alpha, a, lda, &beta, c, ldc), "syrk");
}

// Row-major A (n x k) is the column-major k x n matrix A^T: SYRKX with OP_T forms A B^T in column-major, whose
// row-major reading is B A^T, the same symmetric matrix; the column-major lower triangle is the row-major upper one.
template <class T>
void sym_product(const Handle& h, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T* c, int ldc) {
  if (n == 0) return;
  const T zero = 0;
  check(syrkx_call(h.get(), n, k, &alpha, a, lda, b, ldb, &zero, c, ldc), "syrkx");
  mirror_upper<T>(h, n, c, ldc);
}

template <class T>
void mirror_upper(const Handle& h, int n, T* c, int ldc) {
  const std::size_t total = static_cast<std::size_t>(n) * n;
  mirror_upper_kernel<T><<<blocks_for(total, 256), 256, 0, h.stream()>>>(n, c, ldc);
  check_launch("mirror_upper");
}

template <class T>
void invert(const Handle& h, Workspace& ws, int first_slot, int n, T* a, T* inv, double* rcond, bool floor_one) {
  int* pivots = ws.get<int>(first_slot, static_cast<std::size_t>(n));
  int* info = ws.get<int>(first_slot + 1, 2);
  T** pointers = ws.get<T*>(first_slot + 2, 2);
  double* norms = ws.get<double>(first_slot + 3, 2);
  cudaStream_t s = h.stream();
  inf_norm_kernel<T><<<1, 256, 0, s>>>(n, a, norms);
  check_launch("inf_norm");
  set_pointers_kernel<T><<<1, 1, 0, s>>>(pointers, a, inv);
  check_launch("set_pointers");
  check(getrf_call(h.get(), n, pointers, pivots, info), "getrfBatched");
  check(getri_call(h.get(), n, pointers, pivots, pointers + 1, info + 1), "getriBatched");
  inf_norm_kernel<T><<<1, 256, 0, s>>>(n, inv, norms + 1);
  check_launch("inf_norm");
  rcond_kernel<<<1, 1, 0, s>>>(norms, info, rcond, floor_one);
  check_launch("rcond");
}

#define ST_INSTANTIATE(T)                                                                                        \
  template void gemm<T>(const Handle&, Op, Op, int, int, int, T, const T*, int, const T*, int, T, T*, int);     \
  template void gemv<T>(const Handle&, Op, int, int, T, const T*, int, const T*, T, T*);                        \
  template void syr2k_t<T>(const Handle&, int, int, T, const T*, int, const T*, int, T, T*, int);               \
  template void syrk_t<T>(const Handle&, int, int, T, const T*, int, T, T*, int);                               \
  template void mirror_upper<T>(const Handle&, int, T*, int);                                                   \
  template void sym_product<T>(const Handle&, int, int, T, const T*, int, const T*, int, T*, int);              \
  template void invert<T>(const Handle&, Workspace&, int, int, T*, T*, double*, bool);
ST_INSTANTIATE(float)
ST_INSTANTIATE(double)
#undef ST_INSTANTIATE

}  // namespace sparsetarget::cuda::blas
