// Vendor symbols live here only. SPARSETARGET_BLAS_PREFIX is "scipy_" for the scipy-openblas32 wheel and empty
// for a system BLAS; the declarations below are the standard CBLAS / Fortran LAPACK ABI.
#include "blas_cpu.h"

#include "small_gemm_cpu.h"
#include "thread_pool_cpu.h"
#include "transpose_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>

#define ST_CAT2(a, b) a##b
#define ST_CAT(a, b) ST_CAT2(a, b)
#define ST_SYM(name) ST_CAT(SPARSETARGET_BLAS_PREFIX, name)

extern "C" {
// CBLAS enums are plain ints in the ABI.
void ST_SYM(cblas_sgemm)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                         int);
void ST_SYM(cblas_dgemm)(int, int, int, int, int, int, double, const double*, int, const double*, int, double,
                         double*, int);
void ST_SYM(cblas_sgemv)(int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
void ST_SYM(cblas_dgemv)(int, int, int, int, double, const double*, int, const double*, int, double, double*, int);
void ST_SYM(cblas_ssyr2k)(int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
void ST_SYM(cblas_dsyr2k)(int, int, int, int, int, double, const double*, int, const double*, int, double, double*,
                          int);
void ST_SYM(cblas_ssyrk)(int, int, int, int, int, float, const float*, int, float, float*, int);
void ST_SYM(cblas_dsyrk)(int, int, int, int, int, double, const double*, int, double, double*, int);

// Fortran LAPACK; character arguments carry a hidden length (gfortran ABI), passed explicitly.
void ST_SYM(sgetrf_)(const int*, const int*, float*, const int*, int*, int*);
void ST_SYM(dgetrf_)(const int*, const int*, double*, const int*, int*, int*);
void ST_SYM(sgecon_)(const char*, const int*, const float*, const int*, const float*, float*, float*, int*, int*,
                     std::size_t);
void ST_SYM(dgecon_)(const char*, const int*, const double*, const int*, const double*, double*, double*, int*,
                     int*, std::size_t);
void ST_SYM(sgesdd_)(const char*, const int*, const int*, float*, const int*, float*, float*, const int*, float*,
                     const int*, float*, const int*, int*, int*, std::size_t);
void ST_SYM(dgesdd_)(const char*, const int*, const int*, double*, const int*, double*, double*, const int*,
                     double*, const int*, double*, const int*, int*, int*, std::size_t);
}

// OpenBLAS thread control and kernel name; weak, so a system BLAS without these symbols still links.
extern "C" {
void ST_SYM(openblas_set_num_threads)(int) __attribute__((weak));
int ST_SYM(openblas_get_num_threads)(void) __attribute__((weak));
char* ST_SYM(openblas_get_corename)(void) __attribute__((weak));
}

// Loops built for the machine's vector width, chosen when the library loads (x86-64 with GCC; elsewhere one build).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ST_VECTOR_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#define ST_INLINE_IN_CLONES __attribute__((always_inline)) inline
#else
#define ST_VECTOR_CLONES
#define ST_INLINE_IN_CLONES inline
#endif

namespace sparsetarget::blas {
namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kUpper = 121;
int op(Op o) { return o == Op::N ? kNoTrans : kTrans; }

void check_info(int info, const char* routine) {
  if (info < 0) throw std::logic_error(std::string(routine) + ": illegal argument " + std::to_string(-info));
}
}  // namespace

template <class T>
double inf_norm(int n, const T* a) {
  double norm = 0;
  for (int i = 0; i < n; ++i) {
    double row = 0;
    for (int j = 0; j < n; ++j) row += std::abs(static_cast<double>(a[static_cast<std::ptrdiff_t>(i) * n + j]));
    if (!(row <= norm)) norm = row;  // a NaN row makes the norm NaN (std::max would drop it)
  }
  return norm;
}
template double inf_norm<float>(int, const float*);
template double inf_norm<double>(int, const double*);

namespace {
// The vendor routines of each precision.
template <class T>
struct Vendor;
#define ST_VENDOR(T, p)                               \
  template <>                                         \
  struct Vendor<T> {                                  \
    static constexpr auto gemm = ST_SYM(cblas_##p##gemm);   \
    static constexpr auto gemv = ST_SYM(cblas_##p##gemv);   \
    static constexpr auto syr2k = ST_SYM(cblas_##p##syr2k); \
    static constexpr auto syrk = ST_SYM(cblas_##p##syrk);   \
    static constexpr auto getrf = ST_SYM(p##getrf_);        \
    static constexpr auto gecon = ST_SYM(p##gecon_);        \
    static constexpr auto gesdd = ST_SYM(p##gesdd_);        \
  };
ST_VENDOR(float, s)
ST_VENDOR(double, d)
#undef ST_VENDOR

template <class T>
void gemv_strided(Op oa, int m, int n, T alpha, const T* a, int lda, const T* x, int incx, T beta, T* y, int incy) {
  Vendor<T>::gemv(kRowMajor, op(oa), m, n, alpha, a, lda, x, incx, beta, y, incy);
}

// C (2 x n) <- alpha A B + beta C with A 2 x k and B k x n, row-major: one pass over the rows of B, each added to
// both rows of C (which stay in cache). Built for the machine's vector width, chosen at load time.
template <class T>
ST_VECTOR_CLONES void two_row_gemm(int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
                                  int ldc) {
  T* c0 = c;
  T* c1 = c + ldc;
  for (int j = 0; j < n; ++j) {
    c0[j] = beta == T(0) ? T(0) : beta * c0[j];
    c1[j] = beta == T(0) ? T(0) : beta * c1[j];
  }
  for (int l = 0; l < k; ++l) {
    const T x0 = alpha * a[l], x1 = alpha * a[lda + l];
    const T* row = b + static_cast<std::ptrdiff_t>(l) * ldb;
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      c0[j] += x0 * row[j];
      c1[j] += x1 * row[j];
    }
  }
}

// row <- beta row + a y (n entries); with beta = 0 the row is only written (it may be uninitialised). Inlined into
// each vector clone that calls it, so that it is built for that clone's width.
template <class T>
ST_INLINE_IN_CLONES void scale_add_row(T* row, int n, T beta, T a, const T* y) {
  if (beta == T(0)) {
#pragma omp simd
    for (int j = 0; j < n; ++j) row[j] = a * y[j];
  } else {
#pragma omp simd
    for (int j = 0; j < n; ++j) row[j] = beta * row[j] + a * y[j];
  }
}

// C (m x n) <- beta C + alpha x y^T, with x_i = x[i * incx] and y_j = y[j * incy]: one pass over C (a packed GEMM with
// k = 1 runs its full machinery for the same traffic).
template <class T>
ST_VECTOR_CLONES void rank1_update(int m, int n, T alpha, const T* x, int incx, const T* y, int incy, T beta, T* c,
                                  int ldc) {
  std::vector<T> yv;  // y gathered into a contiguous row when strided
  if (incy != 1) {
    yv.resize(static_cast<std::size_t>(n));
    for (int j = 0; j < n; ++j) yv[j] = y[static_cast<std::ptrdiff_t>(j) * incy];
  }
  const T* yp = incy == 1 ? y : yv.data();
  for (int i = 0; i < m; ++i) {
    scale_add_row(c + static_cast<std::ptrdiff_t>(i) * ldc, n, beta, alpha * x[static_cast<std::ptrdiff_t>(i) * incx],
                  yp);
  }
}

// A GEMM with one output row or column is a GEMV; BLAS libraries do not all take that shortcut themselves,
// and it matters for single-example steps.
template <class T>
bool gemm_as_gemv(Op oa, Op ob, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta,
                  T* c, int ldc) {
  if (m == 1) {  // c^T = op(B)^T op(A)^T: x is the single row of op(A)
    const int incx = oa == Op::N ? 1 : lda;
    if (ob == Op::N)
      gemv_strided<T>(Op::T, k, n, alpha, b, ldb, a, incx, beta, c, 1);
    else
      gemv_strided<T>(Op::N, n, k, alpha, b, ldb, a, incx, beta, c, 1);
    return true;
  }
  if (m == 2 && oa == Op::N && ob == Op::N) {  // two rows through B once (a packed GEMM would copy all of B first)
    two_row_gemm<T>(n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return true;
  }
  if (k == 1) {  // an outer product: x the single column of op(A), y the single row of op(B)
    rank1_update<T>(m, n, alpha, a, oa == Op::N ? lda : 1, b, ob == Op::N ? 1 : ldb, beta, c, ldc);
    return true;
  }
  if (n == 1) {  // c = op(A) x with x the single column of op(B)
    const int incx = ob == Op::N ? ldb : 1;
    gemv_strided<T>(oa, oa == Op::N ? m : k, oa == Op::N ? k : m, alpha, a, lda, b, incx, beta, c, ldc);
    return true;
  }
  return false;
}

}  // namespace

constexpr double kMinFlopsPerPart = 4e6;  // below this, handing a part over costs more than computing it
int parts_for(double flops) {
  const double by_size = flops / kMinFlopsPerPart;
  return by_size < 2 ? 1 : std::min(cpu::pool_threads(), static_cast<int>(by_size));
}

// Split over the longer side of C into parts computed at once by the core's threads, each a single-threaded
// vendor GEMM (results agree with the unsplit product to rounding).
template <class T>
void gemm(Op oa, Op ob, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
          int ldc) {
  if (m == 0 || n == 0) return;
  if (gemm_as_gemv<T>(oa, ob, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) return;
  const bool own = small::suits<T>(oa, ob, m, n, k);  // one short side: the unpacked loops of small_gemm_cpu.cpp
  const auto product = [&](int rows, int cols, const T* a0, const T* b0, T* c0) {
    if (own)
      small::gemm<T>(oa, ob, rows, cols, k, alpha, a0, lda, b0, ldb, beta, c0, ldc);
    else
      Vendor<T>::gemm(kRowMajor, op(oa), op(ob), rows, cols, k, alpha, a0, lda, b0, ldb, beta, c0, ldc);
  };
  const int parts = parts_for(2.0 * m * n * k);
  if (parts <= 1) {
    product(m, n, a, b, c);
    return;
  }
  const bool by_columns = n >= m;
  const int extent = by_columns ? n : m;
  cpu::parallel_for(parts, [&](int t) {
    const int lo = block_edge(extent, t, parts), len = block_edge(extent, t + 1, parts) - lo;
    if (len <= 0) return;
    if (by_columns)
      product(m, len, a, ob == Op::N ? b + lo : b + static_cast<std::ptrdiff_t>(lo) * ldb, c + lo);
    else
      product(len, n, oa == Op::N ? a + static_cast<std::ptrdiff_t>(lo) * lda : a + lo, b,
              c + static_cast<std::ptrdiff_t>(lo) * ldc);
  });
}
template <class T>
void vendor_gemm(Op oa, Op ob, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
                 int ldc) {
  if (m > 0 && n > 0) Vendor<T>::gemm(kRowMajor, op(oa), op(ob), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <class T>
void gemv(Op oa, int m, int n, T alpha, const T* a, int lda, const T* x, T beta, T* y) {
  if (m == 0 || n == 0) return;
  gemv_strided<T>(oa, m, n, alpha, a, lda, x, 1, beta, y, 1);
}
// Runs block(j0, w) for column blocks [j0, j0 + w) of an n x n upper triangle, one per part, with equal areas
// (edges n sqrt(t / parts)): block t is the rectangle above its diagonal block and the diagonal block.
template <class Block>
void upper_triangle_parts(int n, double flops, const Block& block) {
  const int parts = parts_for(flops);
  if (parts <= 1) {
    block(0, n);
    return;
  }
  std::vector<int> edge(parts + 1, n);
  for (int t = 0; t < parts; ++t) edge[t] = static_cast<int>(std::lround(n * std::sqrt(static_cast<double>(t) / parts)));
  cpu::parallel_for(parts, [&](int t) {
    if (edge[t + 1] > edge[t]) block(edge[t], edge[t + 1] - edge[t]);
  });
}

// Column block [j0, j0 + w) of syr2k_t's upper triangle (rows [0, j0 + w)) through the vendor.
template <class T>
void syr2k_upper_columns(int j0, int w, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
                         int ldc) {
  if (j0 > 0) {  // rows [0, j0) x columns [j0, j0 + w): A[:, :j0]^T B[:, block] + B[:, :j0]^T A[:, block]
    Vendor<T>::gemm(kRowMajor, kTrans, kNoTrans, j0, w, k, alpha, a, lda, b + j0, ldb, beta, c + j0, ldc);
    Vendor<T>::gemm(kRowMajor, kTrans, kNoTrans, j0, w, k, alpha, b, ldb, a + j0, lda, T(1), c + j0, ldc);
  }
  Vendor<T>::syr2k(kRowMajor, kUpper, kTrans, w, k, alpha, a + j0, lda, b + j0, ldb, beta,
                   c + static_cast<std::ptrdiff_t>(j0) * ldc + j0, ldc);
}

template <class T>
void syr2k_t(int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c, int ldc) {
  upper_triangle_parts(n, 2.0 * k * n * n, [&](int j0, int w) {
    syr2k_upper_columns<T>(j0, w, k, alpha, a, lda, b, ldb, beta, c, ldc);
  });
}

// Rows [j0, j0 + w) of the lower triangle of C from columns [j0, j0 + w) of its upper triangle: for the column
// blocks of upper_triangle_parts, each block mirrors what it has just written, beside the others. Through a small
// tile: rows of a power-of-two leading dimension alias in the L1 cache, so a direct strided copy misses on almost
// every read (it cost half of a single-example step at d = 512); whole tiles below the diagonal by register
// transposes (transpose_cpu.h).
template <class T>
void mirror_upper_columns(int j0, int w, T* c, int ldc) {
  constexpr int kTile = kTransposeTile;
  T tile[kTile][kTile];
  for (int ib = j0; ib < j0 + w; ib += kTile) {
    const int ie = std::min(j0 + w, ib + kTile);
    for (int jb = 0; jb < ie; jb += kTile) {
      const int je = std::min(ie, jb + kTile);
      if constexpr (kRegisterTranspose) {
        if (ie - ib == kTile && je - jb == kTile && je <= ib) {  // a whole tile below the diagonal
          const T* upper = c + static_cast<std::ptrdiff_t>(jb) * ldc + ib;  // rows jb.., columns ib..
          transpose_tile<T>(upper, ldc, c + static_cast<std::ptrdiff_t>(ib) * ldc + jb, ldc);
          continue;
        }
      }
      for (int j = jb; j < je; ++j)  // source: rows j, columns i of the upper triangle, read along rows
        for (int i = std::max(ib, j + 1); i < ie; ++i)
          tile[i - ib][j - jb] = c[static_cast<std::ptrdiff_t>(j) * ldc + i];
      for (int i = ib; i < ie; ++i)  // destination: rows i, columns j < i, written along rows
        for (int j = jb; j < std::min(je, i); ++j) c[static_cast<std::ptrdiff_t>(i) * ldc + j] = tile[i - ib][j - jb];
    }
  }
}

// The upper triangle by SYRK in column blocks over the core's threads, each block mirrored by its thread.
template <class T>
void gram(int n, int k, T alpha, const T* a, int lda, T* c, int ldc) {
  if (n == 0) return;
  if (n <= 2) {  // one or two rows: the GEMM wrapper's vector paths
    gemm<T>(Op::N, Op::T, n, n, k, alpha, a, lda, a, lda, T(0), c, ldc);
    mirror_upper<T>(n, c, ldc);
    return;
  }
  upper_triangle_parts(n, 1.0 * k * n * n, [&](int j0, int w) {
    const T* a0 = a + static_cast<std::ptrdiff_t>(j0) * lda;
    if (j0 > 0)  // rows [0, j0) x columns [j0, j0 + w): A[:j0] A[block]^T
      Vendor<T>::gemm(kRowMajor, kNoTrans, kTrans, j0, w, k, alpha, a, lda, a0, lda, T(0), c + j0, ldc);
    T* c0 = c + static_cast<std::ptrdiff_t>(j0) * ldc + j0;
    Vendor<T>::syrk(kRowMajor, kUpper, kNoTrans, w, k, alpha, a0, lda, T(0), c0, ldc);
    mirror_upper_columns<T>(j0, w, c, ldc);
  });
}

template <class T>
void syrk_t(int n, int k, T alpha, const T* a, int lda, T beta, T* c, int ldc) {
  Vendor<T>::syrk(kRowMajor, kUpper, kTrans, n, k, alpha, a, lda, beta, c, ldc);
}

// Row i of sym_rank2k_small: c_ij <- beta c_ij + alpha s_ij with s_ij = sum over l < K of (a_li b_lj + b_li a_lj),
// summed in the order of l, in one pass over the row (no accumulator to clear and read back). K = 0 leaves s = 0.
template <class T, int K, bool kReadC>
ST_INLINE_IN_CLONES void sym_rank2k_row(int i, int n, T alpha, const T* a, int lda, const T* b, int ldb, T beta,
                                        T* row) {
  const T* a1 = a + (K > 1 ? lda : 0);
  const T* b1 = b + (K > 1 ? ldb : 0);
  [[maybe_unused]] const T ai0 = K > 0 ? a[i] : T(0), bi0 = K > 0 ? b[i] : T(0);
  [[maybe_unused]] const T ai1 = K > 1 ? a1[i] : T(0), bi1 = K > 1 ? b1[i] : T(0);
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    T s = T(0);
    if constexpr (K > 0) s = ai0 * b[j] + bi0 * a[j];
    if constexpr (K > 1) s += ai1 * b1[j] + bi1 * a1[j];
    row[j] = kReadC ? beta * row[j] + alpha * s : alpha * s;  // beta = 0 does not read C
  }
}

template <class T, int K>
ST_INLINE_IN_CLONES void sym_rank2k_rows(int n, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
                                         int ldc) {
  for (int i = 0; i < n; ++i) {
    T* row = c + static_cast<std::ptrdiff_t>(i) * ldc;
    if (beta == T(0))
      sym_rank2k_row<T, K, false>(i, n, alpha, a, lda, b, ldb, beta, row);
    else
      sym_rank2k_row<T, K, true>(i, n, alpha, a, lda, b, ldb, beta, row);
  }
}

// Both triangles of C (n x n) <- beta C + alpha (A^T B + B^T A), A and B k x n, k <= 2: one pass over C. Entry (i, j)
// sums a_li b_lj + b_li a_lj over l, the same two products as entry (j, i) added in the other order, so C stays
// exactly symmetric (this file is compiled without floating-point contraction).
template <class T>
ST_VECTOR_CLONES void sym_rank2k_small(int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
                                      int ldc) {
  if (k > 2 || k < 0) throw std::invalid_argument("sym_rank2k_small: k must be 0, 1 or 2, got " + std::to_string(k));
  if (k == 1)
    sym_rank2k_rows<T, 1>(n, alpha, a, lda, b, ldb, beta, c, ldc);
  else if (k == 2)
    sym_rank2k_rows<T, 2>(n, alpha, a, lda, b, ldb, beta, c, ldc);
  else
    sym_rank2k_rows<T, 0>(n, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <class T>
void sym_rank2k(int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c, int ldc) {
  if (k <= 2) {
    sym_rank2k_small<T>(n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const bool own = small::suits_syr2k<T>(n, k);  // few rows: the unpacked loops
  upper_triangle_parts(n, 2.0 * k * n * n, [&](int j0, int w) {
    if (own)
      small::syr2k_upper_block<T>(j0, w, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else
      syr2k_upper_columns<T>(j0, w, k, alpha, a, lda, b, ldb, beta, c, ldc);
    mirror_upper_columns<T>(j0, w, c, ldc);
  });
}

template <class T>
void mirror_upper(int n, T* c, int ldc) {
  mirror_upper_columns<T>(0, n, c, ldc);
}
#define ST_INSTANTIATE(T)                                                                                  \
  template void gemm<T>(Op, Op, int, int, int, T, const T*, int, const T*, int, T, T*, int);               \
  template void vendor_gemm<T>(Op, Op, int, int, int, T, const T*, int, const T*, int, T, T*, int);        \
  template void gemv<T>(Op, int, int, T, const T*, int, const T*, T, T*);                                  \
  template void syr2k_t<T>(int, int, T, const T*, int, const T*, int, T, T*, int);                         \
  template void syrk_t<T>(int, int, T, const T*, int, T, T*, int);                                         \
  template void mirror_upper<T>(int, T*, int);                                                            \
  template void sym_rank2k<T>(int, int, T, const T*, int, const T*, int, T, T*, int);                      \
  template void gram<T>(int, int, T, const T*, int, T*, int);
ST_INSTANTIATE(float)
ST_INSTANTIATE(double)
#undef ST_INSTANTIATE


namespace {
// getrf of the column-major view of row-major a (n x n), in place, and with estimate LAPACK's reciprocal condition
// of that view in the 1-norm, which is the infinity norm of a (norm, taken before): 0 when a is singular or norm is
// not finite, 1 without estimate.
template <class T>
double lu_factor(int n, T* a, int* ipiv, double norm, bool estimate) {
  const T anorm = static_cast<T>(norm);
  if (!std::isfinite(anorm)) return 0.0;  // LAPACK rejects a non-finite norm as an illegal argument
  int info = 0;
  Vendor<T>::getrf(&n, &n, a, &n, ipiv, &info);
  check_info(info, "getrf");
  if (info > 0) return 0.0;
  if (!estimate) return 1.0;
  // O(n^2), where the explicit inverse costs O(n^3)
  T rcond = 0;
  std::vector<T> work(4 * static_cast<std::size_t>(n));
  std::vector<int> iwork(n);
  Vendor<T>::gecon("1", &n, a, &n, &anorm, &rcond, work.data(), iwork.data(), &info, 1);
  check_info(info, "gecon");
  return static_cast<double>(rcond);
}
}  // namespace

template <class T>
double invert_into(int n, T* a, T* inverse, bool estimate) {
  if (n == 0) return 1.0;
  // Row-major A is column-major A^T: getrf factors A^T, and lu_solve_transposed solves A X = I from those factors,
  // by the blocked substitution in GEMMs rather than getri, which runs at a fraction of the GEMM rate (about a fifth
  // at n = 200 with OpenBLAS on an EPYC).
  std::vector<int> ipiv(n);
  const double rcond = lu_factor(n, a, ipiv.data(), inf_norm(n, a), estimate);
  if (!(rcond > 0)) return 0.0;
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  std::fill(inverse, inverse + nn, T(0));
  for (int i = 0; i < n; ++i) inverse[static_cast<std::size_t>(i) * n + i] = T(1);
  lu_solve_transposed<T>(n, n, a, ipiv.data(), inverse, n);
  return rcond;
}
template double invert_into<float>(int, float*, float*, bool);
template double invert_into<double>(int, double*, double*, bool);

template <class T>
double invert(int n, T* a, bool estimate) {
  std::vector<T> inverse(static_cast<std::size_t>(n) * n);
  const double rcond = invert_into<T>(n, a, inverse.data(), estimate);
  if (rcond > 0) std::copy(inverse.begin(), inverse.end(), a);
  return rcond;
}
template double invert<float>(int, float*, bool);
template double invert<double>(int, double*, bool);

template <class T>
double lu_factor_transposed(int n, T* st, int* ipiv, double norm) {
  if (n == 0) return 0.0;
  // Row-major S^T is column-major S: getrf factors S = P L U in place; ||S^-1||_1 = ||S^-T||_inf from LAPACK's
  // estimate of 1 / (||S||_1 ||S^-1||_1).
  const double rcond = lu_factor(n, st, ipiv, norm, true);
  return rcond > 0 ? 1.0 / (rcond * norm) : kSingular;
}
template double lu_factor_transposed<float>(int, float*, int*, double);
template double lu_factor_transposed<double>(int, double*, int*, double);

namespace {
// The inverse (k x k, row-major, leading dimension k) of the k x k triangle of a at its diagonal (leading dimension
// lda): lower with its diagonal, or upper with a unit diagonal. By substitution a row at a time: row i of the inverse
// is e_i less A(i, j) times each row j already solved (then divided by A(i, i) in the lower case), so the inner loops
// run along contiguous rows and vectorise.
// Each entry takes the same terms in the same order (j ascending) as column-by-column substitution.
template <class T>
void triangle_inverse(int k, const T* a, int lda, bool lower, T* inv) {
  const auto A = [&](int i, int j) { return a[static_cast<std::ptrdiff_t>(i) * lda + j]; };
  const auto row = [&](int i) { return inv + static_cast<std::ptrdiff_t>(i) * k; };
  std::fill(inv, inv + static_cast<std::ptrdiff_t>(k) * k, T(0));
  if (lower) {  // row j of the inverse is nonzero in columns 0 .. j
    for (int i = 0; i < k; ++i) {
      T* x = row(i);
      x[i] = T(1);
      for (int j = 0; j < i; ++j) {
        const T aij = A(i, j);
        const T* y = row(j);
        for (int c = 0; c <= j; ++c) x[c] -= aij * y[c];
      }
      const T diagonal = A(i, i);
      for (int c = 0; c <= i; ++c) x[c] /= diagonal;
    }
  } else {  // unit diagonal; row j of the inverse is nonzero in columns j .. k - 1
    for (int i = k - 1; i >= 0; --i) {
      T* x = row(i);
      x[i] = T(1);
      for (int j = i + 1; j < k; ++j) {
        const T aij = A(i, j);
        const T* y = row(j);
        for (int c = j; c < k; ++c) x[c] -= aij * y[c];
      }
    }
  }
}
}  // namespace

template <class T>
void lu_solve_transposed(int n, int cols, const T* lu, const int* ipiv, T* b, int ldb) {
  if (n == 0 || cols == 0) return;
  // S^T = U^T L^T P^T. Read row-major, the factors' buffer holds U^T in its lower triangle and L^T (unit diagonal)
  // in its strict upper one: solve U^T Y = B, then L^T Z = Y, then X = P Z (getrf's interchanges, last first).
  // Blocked substitution in GEMMs (OpenBLAS's TRSM runs far below its GEMM, with its AVX-512 kernel at a third of
  // it): each block of kBlock rows takes the product of the rows solved so far, then the inverse of its diagonal
  // triangle.
  constexpr int kBlock = 32;
  std::vector<T> inv(static_cast<std::size_t>(kBlock) * kBlock), tmp(static_cast<std::size_t>(kBlock) * cols);
  const auto row = [&](T* x, int i) { return x + static_cast<std::ptrdiff_t>(i) * ldb; };
  const auto solve_block = [&](int k0, int k, bool lower) {  // rows k0 .. k0 + k of b <- inv(diagonal block) b
    triangle_inverse(k, lu + static_cast<std::ptrdiff_t>(k0) * n + k0, n, lower, inv.data());
    gemm<T>(Op::N, Op::N, k, cols, k, T(1), inv.data(), k, row(b, k0), ldb, T(0), tmp.data(), cols);
    for (int i = 0; i < k; ++i) std::copy(tmp.data() + static_cast<std::ptrdiff_t>(i) * cols,
                                          tmp.data() + static_cast<std::ptrdiff_t>(i + 1) * cols, row(b, k0 + i));
  };
  for (int k0 = 0; k0 < n; k0 += kBlock) {  // U^T, lower: top down
    const int k = std::min(kBlock, n - k0);
    if (k0 > 0)
      gemm<T>(Op::N, Op::N, k, cols, k0, T(-1), lu + static_cast<std::ptrdiff_t>(k0) * n, n, b, ldb, T(1),
              row(b, k0), ldb);
    solve_block(k0, k, true);
  }
  for (int k1 = n; k1 > 0; k1 -= kBlock) {  // L^T, upper with a unit diagonal: bottom up
    const int k0 = std::max(0, k1 - kBlock), k = k1 - k0;
    if (k1 < n)
      gemm<T>(Op::N, Op::N, k, cols, n - k1, T(-1), lu + static_cast<std::ptrdiff_t>(k0) * n + k1, n, row(b, k1),
              ldb, T(1), row(b, k0), ldb);
    solve_block(k0, k, false);
  }
  for (int i = n - 1; i >= 0; --i) {
    const int r = ipiv[i] - 1;
    if (r != i) std::swap_ranges(row(b, i), row(b, i) + cols, row(b, r));
  }
}
template void lu_solve_transposed<float>(int, int, const float*, const int*, float*, int);
template void lu_solve_transposed<double>(int, int, const double*, const int*, double*, int);

template <class T>
void svd(int n, const T* a, std::vector<T>& p, std::vector<T>& sigma, std::vector<T>& r_t) {
  // gesdd factors the column-major view A^T = Uc S Vc^T, so A = Vc S Uc^T. Read back row-major, the Vc^T buffer
  // is Vc = P and the Uc buffer is Uc^T = R^T.
  std::vector<T> work_a(a, a + static_cast<std::ptrdiff_t>(n) * n);
  p.assign(static_cast<std::size_t>(n) * n, T(0));
  r_t.assign(static_cast<std::size_t>(n) * n, T(0));
  sigma.assign(n, T(0));
  std::vector<int> iwork(8 * static_cast<std::size_t>(n));
  int info = 0, lwork = -1;
  T query = 0;
  Vendor<T>::gesdd("A", &n, &n, work_a.data(), &n, sigma.data(), r_t.data(), &n, p.data(), &n, &query, &lwork,
                   iwork.data(), &info, 1);
  check_info(info, "gesdd");
  lwork = static_cast<int>(query) + 1;
  std::vector<T> work(lwork);
  Vendor<T>::gesdd("A", &n, &n, work_a.data(), &n, sigma.data(), r_t.data(), &n, p.data(), &n, work.data(), &lwork,
                   iwork.data(), &info, 1);
  check_info(info, "gesdd");
  if (info > 0) throw std::runtime_error("gesdd: the SVD of U did not converge");
}
template void svd<float>(int, const float*, std::vector<float>&, std::vector<float>&, std::vector<float>&);
template void svd<double>(int, const double*, std::vector<double>&, std::vector<double>&, std::vector<double>&);

namespace {
// The core splits its products over its own threads (thread_pool_cpu.h), each part a single-threaded vendor call:
// the vendor's threads would spin between the calls of a step, against the core's and any other pool. At load, the
// core takes the vendor's default thread count (OPENBLAS_NUM_THREADS, else all cores) and sets the vendor to one.
const int g_threads_at_load = [] {
  const int n = ST_SYM(openblas_get_num_threads) ? ST_SYM(openblas_get_num_threads)() : 1;
  if (ST_SYM(openblas_set_num_threads)) ST_SYM(openblas_set_num_threads)(1);
  cpu::set_pool_threads(n > 0 ? n : 1);
  cpu::set_pass_threads(n > 0 ? n : 1);
  return n;
}();
}  // namespace

std::string vendor_kernel() {
  const char* name = ST_SYM(openblas_get_corename) ? ST_SYM(openblas_get_corename)() : nullptr;
  return name ? std::string(name) : std::string();
}

void set_num_threads(int n, bool passes) {
  cpu::set_pool_threads(n);
  if (passes) cpu::set_pass_threads(n);
  if (ST_SYM(openblas_set_num_threads)) ST_SYM(openblas_set_num_threads)(1);
}
int get_pass_threads() {
  static_cast<void>(g_threads_at_load);
  return cpu::pass_threads();
}
int get_num_threads() {
  static_cast<void>(g_threads_at_load);
  return cpu::pool_threads();
}

}  // namespace sparsetarget::blas
