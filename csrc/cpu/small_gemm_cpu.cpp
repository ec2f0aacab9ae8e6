// Products with one short side (up to a few hundred rows of H against a d x d matrix, or a rank-m update of one),
// computed without packing: register-blocked loops built for AVX-512 or AVX2 + FMA, chosen when the library loads
// (a plain build elsewhere). A packed GEMM copies the whole d x d operand into its own layout on every call, which at m = 8
// costs as much as the arithmetic; here that operand is read once, in place.
#include "small_gemm_cpu.h"

#include "blas_cpu.h"
#include "transpose_cpu.h"

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace sparsetarget::blas::small {
namespace {

#define ST_ALWAYS_INLINE inline __attribute__((always_inline))

// One machine vector of W elements of T (GCC vector extension; lowered to what the enclosing target offers).
template <class T, int W>
struct Vec {
  typedef T type __attribute__((vector_size(W * sizeof(T))));
};

// A term of the sum: X(i, l) = x[i * xi + l * xl] times row l of Y (row-major, leading dimension ldy).
template <class T>
struct Term {
  const T* x;
  std::ptrdiff_t xi, xl;
  const T* y;
  std::ptrdiff_t ldy;
};

// C[i][j0 + j] for i < R, j < NV W: alpha sum_l (X1(i, l) Y1[l][j0 + j] + X2(i, l) Y2[l][j0 + j]) + beta C, the
// accumulators held in registers over the whole sum.
template <class T, int W, int R, int NV, bool Two>
ST_ALWAYS_INLINE void block(int k, const Term<T>& t1, const Term<T>& t2, int j0, T alpha, T beta, T* c,
                            std::ptrdiff_t ldc) {
  using V = typename Vec<T, W>::type;
  V acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int l = 0; l < k; ++l) {
    V b1[NV], b2[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&b1[v], t1.y + l * t1.ldy + j0 + v * W, sizeof(V));
    if constexpr (Two)
      for (int v = 0; v < NV; ++v) std::memcpy(&b2[v], t2.y + l * t2.ldy + j0 + v * W, sizeof(V));
    for (int i = 0; i < R; ++i) {
      const T s1 = t1.x[i * t1.xi + l * t1.xl];
      for (int v = 0; v < NV; ++v) acc[i][v] += s1 * b1[v];
      if constexpr (Two) {
        const T s2 = t2.x[i * t2.xi + l * t2.xl];
        for (int v = 0; v < NV; ++v) acc[i][v] += s2 * b2[v];
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) {
      T* out = c + i * ldc + j0 + v * W;
      V r = alpha * acc[i][v];
      if (beta != T(0)) {  // beta = 0 never reads C (it may hold anything)
        V old;
        std::memcpy(&old, out, sizeof(V));
        r += beta * old;
      }
      std::memcpy(out, &r, sizeof(V));
    }
}

// The same for rows [0, rows) with rows < R known only at run time: one instantiation per count.
template <class T, int W, int R, int NV, bool Two>
ST_ALWAYS_INLINE void block_rows(int rows, int k, const Term<T>& t1, const Term<T>& t2, int j0, T alpha, T beta, T* c,
                                 std::ptrdiff_t ldc) {
  if constexpr (R > 0) {
    if (rows == R) return block<T, W, R, NV, Two>(k, t1, t2, j0, alpha, beta, c, ldc);
    block_rows<T, W, R - 1, NV, Two>(rows, k, t1, t2, j0, alpha, beta, c, ldc);
  }
}

// Per-thread buffers (reused across calls): slots 0 and 1 for the transposed path's copies, 2 to 4 for the column
// tail of a sweep.
enum Slot { kSlotAt, kSlotDt, kSlotTailY1, kSlotTailY2, kSlotTailC, kSlots };
template <class T>
T* buffer(int which, std::size_t n) {
  thread_local std::vector<T> buffers[kSlots];
  std::vector<T>& b = buffers[which];
  if (b.size() < n) b.resize(n);
  return b.data();
}

// Terms advanced to row i0.
template <class T>
ST_ALWAYS_INLINE Term<T> from_row(const Term<T>& t, int i0) {
  Term<T> s = t;
  if (s.x) s.x += i0 * t.xi;
  return s;
}

// Column blocks of NV vectors of VW elements from column j0 while they fit in n, each swept by groups of R rows;
// returns the first column left. With diag >= 0 (C's column j is column diag + j of a matrix whose upper triangle is
// wanted), row groups entirely below that diagonal are skipped.
template <class T, int VW, int NV, int R, bool Two>
ST_ALWAYS_INLINE int column_blocks(int j0, int m, int n, int k, const Term<T>& t1, const Term<T>& t2, T alpha,
                                   T beta, T* c, std::ptrdiff_t ldc, int diag) {
  constexpr int width = VW * NV;
  for (; j0 + width <= n; j0 += width)
    for (int i0 = 0; i0 < m && !(diag >= 0 && i0 >= diag + j0 + width); i0 += R)
      block_rows<T, VW, R, NV, Two>(std::min(R, m - i0), k, from_row(t1, i0), from_row(t2, i0), j0, alpha, beta,
                                    c + i0 * ldc, ldc);
  return j0;
}

// Columns [j0, n), fewer than one vector of TW, as one more vector block: those columns of Y1 (and Y2) copied with
// zeros after them, the block's sums into a scratch C, then its first n - j0 columns added to C. Row groups as in
// column_blocks.
template <class T, int TW, int R, bool Two>
ST_ALWAYS_INLINE void column_tail(int j0, int m, int n, int k, const Term<T>& t1, const Term<T>& t2, T alpha, T beta,
                                  T* c, std::ptrdiff_t ldc, int diag) {
  const int tail = n - j0;
  const auto padded = [&](const Term<T>& t, int slot) {
    T* y = buffer<T>(slot, static_cast<std::size_t>(k) * TW);
    for (int l = 0; l < k; ++l) {
      const T* row = t.y + l * t.ldy + j0;
      T* out = y + static_cast<std::ptrdiff_t>(l) * TW;
      for (int j = 0; j < TW; ++j) out[j] = j < tail ? row[j] : T(0);
    }
    return Term<T>{t.x, t.xi, t.xl, y, TW};
  };
  const Term<T> p1 = padded(t1, kSlotTailY1);
  const Term<T> p2 = Two ? padded(t2, kSlotTailY2) : t2;
  T* sums = buffer<T>(kSlotTailC, static_cast<std::size_t>(m) * TW);
  const int tail_diag = diag >= 0 ? diag + j0 : -1;
  column_blocks<T, TW, 1, R, Two>(0, m, TW, k, p1, p2, alpha, T(0), sums, TW, tail_diag);
  for (int i0 = 0; i0 < m && !(tail_diag >= 0 && i0 >= tail_diag + TW); i0 += R)
    for (int i = i0; i < std::min(m, i0 + R); ++i) {
      const T* s = sums + static_cast<std::ptrdiff_t>(i) * TW;
      T* out = c + i * ldc + j0;
      for (int j = 0; j < tail; ++j) out[j] = beta == T(0) ? s[j] : s[j] + beta * out[j];  // beta = 0: C not read
    }
}

template <int W>
constexpr int tail_width() {
  return W >= 8 ? W / 2 : W;  // the narrowest block, and the tail's
}

// The column blocks of the sweep below, without its tail; returns the first column left.
template <class T, int W, int R, bool Two>
ST_ALWAYS_INLINE int whole_blocks(int m, int n, int k, const Term<T>& t1, const Term<T>& t2, T alpha, T beta, T* c,
                                  std::ptrdiff_t ldc, int diag) {
  int j0 = column_blocks<T, W, 2, R, Two>(0, m, n, k, t1, t2, alpha, beta, c, ldc, diag);
  j0 = column_blocks<T, W, 1, R, Two>(j0, m, n, k, t1, t2, alpha, beta, c, ldc, diag);
  if constexpr (tail_width<W>() != W)
    j0 = column_blocks<T, tail_width<W>(), 1, R, Two>(j0, m, n, k, t1, t2, alpha, beta, c, ldc, diag);
  return j0;
}

// C (m x n) <- alpha (X1 Y1 [+ X2 Y2]) + beta C over column blocks of 2W, then W, then W/2 (W >= 8), then one
// zero-padded block for the columns left. With diag >= 0, only the row groups that meet the upper triangle (row <= diag + column)
// of a block are computed (entries below the diagonal of those groups with them). With by_rows (full products only:
// diag < 0), the whole blocks go one group of R rows at a time, all of a group's blocks before the next group: the
// group's rows of X stay in L1 while Y, when it is the smaller operand, is read once per group; the padded tail,
// which copies its columns of Y, is then computed once for all rows. Each entry of C is the same sum, in the same
// order, whichever way the rows are grouped.
template <class T, int W, int R, bool Two>
ST_ALWAYS_INLINE void sweep_in_order(int m, int n, int k, const Term<T>& t1, const Term<T>& t2, T alpha, T beta, T* c,
                                     std::ptrdiff_t ldc, int diag, bool by_rows) {
  int j0 = n;
  if (!by_rows)
    j0 = whole_blocks<T, W, R, Two>(m, n, k, t1, t2, alpha, beta, c, ldc, diag);
  else
    for (int i0 = 0; i0 < m; i0 += R)
      j0 = whole_blocks<T, W, R, Two>(std::min(R, m - i0), n, k, from_row(t1, i0), from_row(t2, i0), alpha, beta,
                                      c + i0 * ldc, ldc, -1);
  if (j0 < n)
    column_tail<T, tail_width<W>(), R, Two>(j0, m, n, k, t1, t2, alpha, beta, c, ldc, by_rows ? -1 : diag);
}

// The machine's vector width: R rows of W-element vectors, 2R accumulators in the 2W-wide blocks. The plain build
// (SSE on x86-64; any other machine) serves the tests' direct calls where the policy leaves the loops off.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ST_SMALL_GEMM_X86 1
template <class T, bool Two>
__attribute__((target("avx512f,fma"))) void sweep_avx512(int m, int n, int k, const Term<T>& t1, const Term<T>& t2,
                                                         T alpha, T beta, T* c, std::ptrdiff_t ldc, int diag,
                                                         bool by_rows) {
  sweep_in_order<T, 64 / sizeof(T), 8, Two>(m, n, k, t1, t2, alpha, beta, c, ldc, diag, by_rows);
}
template <class T, bool Two>
__attribute__((target("avx2,fma"))) void sweep_avx2(int m, int n, int k, const Term<T>& t1, const Term<T>& t2, T alpha,
                                                    T beta, T* c, std::ptrdiff_t ldc, int diag, bool by_rows) {
  sweep_in_order<T, 32 / sizeof(T), 4, Two>(m, n, k, t1, t2, alpha, beta, c, ldc, diag, by_rows);
}
#else
#define ST_SMALL_GEMM_X86 0
#endif
template <class T, bool Two>
void sweep_plain(int m, int n, int k, const Term<T>& t1, const Term<T>& t2, T alpha, T beta, T* c, std::ptrdiff_t ldc,
                 int diag, bool by_rows) {
  sweep_in_order<T, 16 / sizeof(T), 4, Two>(m, n, k, t1, t2, alpha, beta, c, ldc, diag, by_rows);
}

// What the loops may be used for, fixed when the library loads: the CPU's vector width, unless the comma-separated
// words of SPARSETARGET_SMALL_GEMM say otherwise ("off": never; "avx2": at most AVX2; "always": for every product
// these loops can compute, whatever its shape, which the tests use to run the loops on every path). With AVX-512 loops
// and a vendor library that runs narrower kernels on this CPU (an OpenBLAS told to use its AVX2 kernels by
// OPENBLAS_CORETYPE, or one that does not know the CPU's AVX-512), the loops are faster on nearly every product of the
// step's sizes: vendor_narrower.
struct Policy {
  Level level = Level::kOff;
  bool always = false;
  bool vendor_narrower = false;
};

// Against a narrower vendor kernel (OpenBLAS's Haswell kernel on the same CPU,
// benchmarks/results/small_gemm_haswell_vm.txt at d = 512, small_gemm_haswell_d1024_vm.txt at d = 1024), the loops
// win on every product with no side above narrower_vendor_max: C = H B and H B^T 1.2-5.0x, the rank-k updates
// (op(A) = A^T) 1.0-1.7x from 16 rows in float32 and 32 in float64 (below that they are no faster, and in float64 at
// 8 rows half as fast), the SYR2K 1.1-1.9x. In float64 at d = 1024 they lose on some of these (0.75x for the SYR2K
// at k = 1024, 0.88-0.99x for the rank-k updates at 64, 512 and 1024 rows), hence its lower bound.
template <class T>
constexpr int narrower_vendor_max() {
  return sizeof(T) == 4 ? 1024 : 512;
}

// OpenBLAS's names of its kernel families that use AVX-512.
bool runs_avx512(std::string kernel) {
  std::transform(kernel.begin(), kernel.end(), kernel.begin(), [](unsigned char ch) { return std::tolower(ch); });
  for (const char* name : {"skylakex", "cooperlake", "sapphirerapids"})
    if (kernel.find(name) != std::string::npos) return true;
  return false;
}

Policy detect() {
  Policy p;
#if ST_SMALL_GEMM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
    p.level = Level::kAvx512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    p.level = Level::kAvx2;
#endif
  const char* env = std::getenv("SPARSETARGET_SMALL_GEMM");
  const std::string words = "," + std::string(env ? env : "") + ",";
  const auto has = [&](const char* word) { return words.find("," + std::string(word) + ",") != std::string::npos; };
  if (has("off")) p.level = Level::kOff;
  if (has("avx2") && p.level == Level::kAvx512) p.level = Level::kAvx2;
  p.always = has("always");
  // empty: a library that does not say; "Unknown": an OpenBLAS asked before it chose; both taken to be the fastest
  const std::string kernel = vendor_kernel();
  p.vendor_narrower = p.level == Level::kAvx512 && !kernel.empty() && kernel != "Unknown" && !runs_avx512(kernel);
  return p;
}
const Policy g_policy = detect();

template <class T, bool Two>
void run(int m, int n, int k, const Term<T>& t1, const Term<T>& t2, T alpha, T beta, T* c, int ldc, int diag,
         bool by_rows = false) {
#if ST_SMALL_GEMM_X86
  if (g_policy.level == Level::kAvx512) return sweep_avx512<T, Two>(m, n, k, t1, t2, alpha, beta, c, ldc, diag, by_rows);
  if (g_policy.level == Level::kAvx2) return sweep_avx2<T, Two>(m, n, k, t1, t2, alpha, beta, c, ldc, diag, by_rows);
#endif
  sweep_plain<T, Two>(m, n, k, t1, t2, alpha, beta, c, ldc, diag, by_rows);
}

// out (k x m, leading dimension ld) <- op(A)^T for op(A) m x k (A itself when stored_transposed, i.e. A is k x m).
template <class T>
void transpose(int m, int k, const T* a, int lda, bool stored_transposed, T* out, int ld) {
  if (!stored_transposed) {
    transpose_copy<T>(k, m, a, lda, out, ld);
    return;
  }
  for (int l = 0; l < k; ++l)
    std::copy(a + static_cast<std::ptrdiff_t>(l) * lda, a + static_cast<std::ptrdiff_t>(l) * lda + m,
              out + static_cast<std::size_t>(l) * ld);
}

}  // namespace

Level level() { return g_policy.level; }

const char* scope() {
  if (g_policy.level == Level::kOff) return "none";
  if (g_policy.always) return "every product";
  static const std::string narrower = "up to " + std::to_string(narrower_vendor_max<float>()) + " (float32) or " +
                                      std::to_string(narrower_vendor_max<double>()) + " (float64) on every side";
  return g_policy.vendor_narrower ? narrower.c_str() : "a short side";
}

// Where these loops beat the vendor's packed GEMM with its best kernel for the machine, measured single-threaded
// against OpenBLAS 0.3.34 (SkylakeX kernel) at d = 512 by benchmarks/bench_small_gemm.py
// (benchmarks/results/small_gemm_skylakex_vm.txt): C = H B in float32 up to 256 rows (3.0x at 8 rows, 1.2x at 64,
// 1.02x at 200) and in float64 up to 16 (1.5-1.7x); C = H B^T from half a vector of rows on, in float32 up to 128
// rows (1.6x at 8 and 32, 1.05x at 128; 0.94x at 200) and in float64 up to 200 (2.1x at 8, 1.07x at 200); the Q
// update's SYR2K in float32 up to 16 rows (1.05-1.07x). Rank-k updates of a d x d matrix stay with the vendor, which
// runs them faster (the loops reach 0.8-0.9x). With AVX2 only: C = H B in float32 up to 16 rows.
// Against a narrower vendor kernel: see narrower_vendor_max.
template <class T>
bool beats_narrower_vendor(int longest_side) {
  return g_policy.vendor_narrower && longest_side <= narrower_vendor_max<T>();
}

template <class T>
bool suits(Op oa, Op ob, int m, int n, int k) {
  if (g_policy.level == Level::kOff || m <= 0 || n <= 0) return false;
  if (g_policy.always) return true;
  const bool wide = g_policy.level == Level::kAvx512;
  const bool single = sizeof(T) == 4;
  const bool narrower = beats_narrower_vendor<T>(std::max({m, n, k}));
  if (oa == Op::N && ob == Op::N) return narrower || m <= (wide ? (single ? 256 : 16) : (single ? 16 : 0));
  if (oa == Op::N && ob == Op::T) {
    const int half_vector = 32 / static_cast<int>(sizeof(T));
    return wide && m >= half_vector && (narrower || m <= (single ? 128 : 200));
  }
  if (oa == Op::T && ob == Op::N) return narrower && k >= (single ? 16 : 32);
  return false;
}

template <class T>
bool suits_syr2k(int n, int k) {
  if (g_policy.level == Level::kOff || n <= 0) return false;
  const bool narrower = beats_narrower_vendor<T>(std::max(n, k));
  return g_policy.always || (g_policy.level == Level::kAvx512 && (narrower || (sizeof(T) == 4 && k <= 16)));
}

template <class T>
void gemm(Op oa, Op ob, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
          int ldc) {
  const Term<T> none{nullptr, 0, 0, nullptr, 0};
  if (ob == Op::N) {  // row i of C sums rows of B, weighted by row i of op(A)
    const Term<T> t{a, oa == Op::N ? lda : 1, oa == Op::N ? 1 : lda, b, ldb};
    run<T, false>(m, n, k, t, none, alpha, beta, c, ldc, -1);
    return;
  }
  // C = op(A) B^T: through D = B op(A)^T (n x m), whose rows sum rows of op(A)^T (k x m, copied), then C = D^T. The
  // copies pad their rows past multiples of 64 elements (power-of-two strides would map a tile's rows to the same
  // cache sets) and go tile by tile; D is swept a group of B's rows at a time, B being the larger operand (its
  // zero-padded tail block once for all rows).
  const int ld = m % 64 == 0 ? m + 16 : m;
  T* at = buffer<T>(kSlotAt, static_cast<std::size_t>(k) * ld);
  transpose<T>(m, k, a, lda, oa == Op::T, at, ld);
  T* dt = buffer<T>(kSlotDt, static_cast<std::size_t>(n) * ld);
  run<T, false>(n, m, k, Term<T>{b, ldb, 1, at, ld}, none, alpha, T(0), dt, ld, -1, true);
  if (beta == T(0)) {  // C = D^T
    transpose_copy<T>(m, n, dt, ld, c, ldc);
    return;
  }
  constexpr int kTile = kTransposeTile;
  for (int i0 = 0; i0 < m; i0 += kTile)
    for (int j0 = 0; j0 < n; j0 += kTile)
      for (int i = i0; i < std::min(m, i0 + kTile); ++i) {
        T* ci = c + static_cast<std::ptrdiff_t>(i) * ldc;
        for (int j = j0; j < std::min(n, j0 + kTile); ++j)
          ci[j] = dt[static_cast<std::size_t>(j) * ld + i] + beta * ci[j];
      }
}

template <class T>
void syr2k_upper_block(int j0, int w, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
                       int ldc) {
  // row i of A^T B + B^T A sums rows l of B weighted by A[l][i], and rows of A weighted by B[l][i]
  run<T, true>(j0 + w, w, k, Term<T>{a, 1, lda, b + j0, ldb}, Term<T>{b, 1, ldb, a + j0, lda}, alpha, beta, c + j0,
               ldc, j0);
}

#define ST_INSTANTIATE(T)                                                                                         \
  template bool suits<T>(Op, Op, int, int, int);                                                                  \
  template bool suits_syr2k<T>(int, int);                                                                         \
  template void gemm<T>(Op, Op, int, int, int, T, const T*, int, const T*, int, T, T*, int);                      \
  template void syr2k_upper_block<T>(int, int, int, T, const T*, int, const T*, int, T, T*, int);
ST_INSTANTIATE(float)
ST_INSTANTIATE(double)
#undef ST_INSTANTIATE

}  // namespace sparsetarget::blas::small
