// The one door to BLAS and LAPACK on the CPU: every dense kernel of the host code goes through these wrappers.
// All matrices are ROW-MAJOR; the wrappers translate to the column-major LAPACK conventions. The CUDA backend's
// door (cuda/blas_cuda.cuh) offers the same operations over device memory.
#pragma once

#include <limits>
#include <string>
#include <vector>

#include "../backend.h"

namespace sparsetarget::blas {

// C <- alpha * op(A) * op(B) + beta * C ; op(A) is m x k, op(B) is k x n, C is m x n.
template <class T>
void gemm(Op op_a, Op op_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
          int ldc);

// The vendor's GEMM alone: no split over threads, no routing to the core's own loops (for tests and benchmarks of
// that routing).
template <class T>
void vendor_gemm(Op op_a, Op op_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta,
                 T* c, int ldc);

// y <- alpha * op(A) x + beta * y ; A is m x n as stored.
template <class T>
void gemv(Op op_a, int m, int n, T alpha, const T* a, int lda, const T* x, T beta, T* y);

// Upper triangle of C (n x n) <- alpha * (A^T B + B^T A) + beta * C, with A and B of shape k x n.
template <class T>
void syr2k_t(int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c, int ldc);

// Upper triangle of C (n x n) <- alpha * A^T A + beta * C, with A of shape k x n.
template <class T>
void syrk_t(int n, int k, T alpha, const T* a, int lda, T beta, T* c, int ldc);

// Both triangles of C (n x n) <- alpha * (A^T B + B^T A) + beta * C, exactly symmetric, with A and B of shape k x n.
template <class T>
void sym_rank2k(int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c, int ldc);

// Both triangles of C (n x n) <- alpha * A A^T (A n x k), exactly symmetric.
template <class T>
void gram(int n, int k, T alpha, const T* a, int lda, T* c, int ldc);

// Copies the upper triangle of a square row-major matrix onto its lower triangle.
template <class T>
void mirror_upper(int n, T* c, int ldc);

// Largest absolute row sum of a row-major n x n matrix (its infinity norm), summed in double.
template <class T>
double inf_norm(int n, const T* a);

// In-place inverse of a square matrix. Returns the reciprocal condition number estimate (infinity norm)
// of the input, or with estimate = false just 1; when it is 0 (exactly singular) the matrix is left in an
// unspecified state.
template <class T>
double invert(int n, T* a, bool estimate = true);

// The inverse of a square matrix a (overwritten by its LU factors) into inverse (n x n, distinct from a). Returns
// what invert returns; when it is 0 (exactly singular) inverse is left unspecified.
template <class T>
double invert_into(int n, T* a, T* inverse, bool estimate = true);

// LU factors of the square matrix S whose transpose is st (row-major n x n, overwritten by the factors) and the
// pivots (n), for lu_solve_transposed; norm is inf_norm(n, st), taken before. Returns LAPACK's estimate of
// ||S^-T|| (infinity norm), or kSingular when S is singular to working precision.
constexpr double kSingular = std::numeric_limits<double>::infinity();
template <class T>
double lu_factor_transposed(int n, T* st, int* ipiv, double norm);

// B (n x cols, row-major, leading dimension ldb) <- S^-T B from the factors of lu_factor_transposed.
template <class T>
void lu_solve_transposed(int n, int cols, const T* lu, const int* ipiv, T* b, int ldb);

// Full SVD of a square matrix A = P diag(sigma) R^T. Returns P (n x n), sigma (n, descending) and R^T (n x n).
template <class T>
void svd(int n, const T* a, std::vector<T>& p, std::vector<T>& sigma, std::vector<T>& r_t);

// The kernel family the vendor library runs, as OpenBLAS names it ("Haswell", "SkylakeX", ...: what it chose for
// this CPU or was told to use by OPENBLAS_CORETYPE); empty for a library that does not say.
std::string vendor_kernel();

// How many parts a product of this many FLOPs is split into: one per thread, each worth at least 4 MFLOP.
int parts_for(double flops);

// Threads the core's products are split over (the vendor library itself runs single-threaded); n >= 1. With
// passes, also the count for the long passes over V (refresh, correction, logits, top-k).
void set_num_threads(int n, bool passes = true);
int get_num_threads();
int get_pass_threads();

}  // namespace sparsetarget::blas
