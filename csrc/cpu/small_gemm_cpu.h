// Products with one short side, without packing (small_gemm_cpu.cpp): the wrappers of blas_cpu.cpp route a product
// here where suits() says these loops beat the vendor BLAS; everything else goes to the vendor.
// ROW-MAJOR, like every wrapper of blas_cpu.h.
#pragma once

#include <cstddef>

#include "../backend.h"

namespace sparsetarget::blas::small {

enum class Level { kOff, kAvx2, kAvx512 };

// The instruction set the loops were built for that the library chose when it loaded (kOff: the loops are not used).
Level level();
// Which products the step routes to the loops, in words: "none", "a short side", "up to N (float32) or M (float64) on
// every side" (the vendor library runs narrower kernels than the loops) or "every product"
// (SPARSETARGET_SMALL_GEMM=always).
const char* scope();

// Whether the GEMM wrapper should route C (m x n) <- alpha op(A) op(B) + beta C (inner dimension k) here.
template <class T>
bool suits(Op oa, Op ob, int m, int n, int k);
// Whether the Q update's SYR2K (n x n, rank 2k) should come here.
template <class T>
bool suits_syr2k(int n, int k);

// C (m x n) <- alpha op(A) op(B) + beta C, row-major, any shapes; fastest when m is small (op(B) = B, or B^T through
// a transposed copy of op(A)). beta = 0 never reads C.
template <class T>
void gemm(Op oa, Op ob, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
          int ldc);

// Column block [j0, j0 + w) of the upper triangle of C (n x n) <- alpha (A^T B + B^T A) + beta C, A and B k x n:
// rows [0, j0 + w) of those columns (some entries below the diagonal are written too: the caller mirrors the upper
// triangle afterwards).
template <class T>
void syr2k_upper_block(int j0, int w, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
                       int ldc);

}  // namespace sparsetarget::blas::small
