// The one door to cuBLAS, mirroring ../cpu/blas_cpu.h over device memory: ROW-MAJOR matrices, the same operations.
// Every call is queued on the handle's stream; none synchronises with the host.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "../backend.h"
#include "state_cuda.cuh"

namespace sparsetarget::cuda::blas {

inline void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("cuBLAS error in ") + what + ": " + cublasGetStatusString(status));
}

// A cuBLAS handle with its own workspace (so that no call allocates, as graph capture requires).
class Handle {
 public:
  Handle();
  ~Handle();
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  cublasHandle_t get() const { return handle_; }
  cudaStream_t stream() const { return stream_; }
  void set_stream(cudaStream_t stream);
  // TF32 tensor cores for float32 products (faster, ~1e-3 relative rounding per product); off by default.
  void set_tf32(bool on);
  bool tf32() const { return tf32_; }

 private:
  cublasHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer workspace_;
  bool tf32_ = false;
};

// C <- alpha * op(A) * op(B) + beta * C ; op(A) is m x k, op(B) is k x n, C is m x n.
template <class T>
void gemm(const Handle& h, Op op_a, Op op_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
          T beta, T* c, int ldc);

// y <- alpha * op(A) x + beta * y ; A is m x n as stored.
template <class T>
void gemv(const Handle& h, Op op_a, int m, int n, T alpha, const T* a, int lda, const T* x, T beta, T* y);

// Upper triangle of C (n x n) <- alpha * (A^T B + B^T A) + beta * C, with A and B of shape k x n.
template <class T>
void syr2k_t(const Handle& h, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c, int ldc);

// Upper triangle of C (n x n) <- alpha * A^T A + beta * C, with A of shape k x n.
template <class T>
void syrk_t(const Handle& h, int n, int k, T alpha, const T* a, int lda, T beta, T* c, int ldc);

// Both triangles of C (n x n) <- alpha * A B^T for a product the caller knows to be symmetric (A and B n x k; B may
// be A): only the upper triangle is computed, then mirrored, so C is exactly symmetric.
template <class T>
void sym_product(const Handle& h, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T* c, int ldc);

// Copies the upper triangle of a square row-major matrix onto its lower triangle.
template <class T>
void mirror_upper(const Handle& h, int n, T* c, int ldc);

// inv <- a^-1 for an n x n matrix (a is overwritten by its LU factors). Writes to the device scalar rcond
// 1 / (||a||_inf ||a^-1||_inf), or with floor_one 1 / (max(1, ||a||_inf) max(1, ||a^-1||_inf)); 0 when a is
// exactly singular or the inverse is not finite. Scratch comes from ws slots first_slot .. first_slot + 3.
template <class T>
void invert(const Handle& h, Workspace& ws, int first_slot, int n, T* a, T* inv, double* rcond, bool floor_one);

}  // namespace sparsetarget::cuda::blas
