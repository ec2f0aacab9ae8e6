// Whole 16 x 16 tiles of a matrix transposed in registers (x86-64: SSE2 4 x 4 float / 2 x 2 double transposes),
// rows read and written contiguously. A strided element copy misses in L1 when the leading dimension is a power of
// two (the rows of a tile alias in the cache); the callers copy the remaining partial tiles element by element.
#pragma once

#include <algorithm>
#include <cstddef>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

namespace sparsetarget::blas {

constexpr int kTransposeTile = 16;

#if defined(__SSE2__)
constexpr bool kRegisterTranspose = true;  // transpose_tile is defined for float and double
#else
constexpr bool kRegisterTranspose = false;  // callers take their element path for every tile
#endif

// dst[i * ld_dst + j] = src[j * ld_src + i] for i, j < kTransposeTile; dst and src do not overlap.
template <class T>
void transpose_tile(const T* src, std::ptrdiff_t ld_src, T* dst, std::ptrdiff_t ld_dst);

#if defined(__SSE2__)
template <>
inline void transpose_tile<float>(const float* src, std::ptrdiff_t ld_src, float* dst, std::ptrdiff_t ld_dst) {
  for (int i = 0; i < kTransposeTile; i += 4)
    for (int j = 0; j < kTransposeTile; j += 4) {
      const float* s = src + j * ld_src + i;
      __m128 r0 = _mm_loadu_ps(s), r1 = _mm_loadu_ps(s + ld_src), r2 = _mm_loadu_ps(s + 2 * ld_src),
             r3 = _mm_loadu_ps(s + 3 * ld_src);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      float* o = dst + i * ld_dst + j;
      _mm_storeu_ps(o, r0);
      _mm_storeu_ps(o + ld_dst, r1);
      _mm_storeu_ps(o + 2 * ld_dst, r2);
      _mm_storeu_ps(o + 3 * ld_dst, r3);
    }
}

template <>
inline void transpose_tile<double>(const double* src, std::ptrdiff_t ld_src, double* dst, std::ptrdiff_t ld_dst) {
  for (int i = 0; i < kTransposeTile; i += 2)
    for (int j = 0; j < kTransposeTile; j += 2) {
      const double* s = src + j * ld_src + i;
      const __m128d r0 = _mm_loadu_pd(s), r1 = _mm_loadu_pd(s + ld_src);
      double* o = dst + i * ld_dst + j;
      _mm_storeu_pd(o, _mm_unpacklo_pd(r0, r1));
      _mm_storeu_pd(o + ld_dst, _mm_unpackhi_pd(r0, r1));
    }
}
#endif

// dst (rows x cols, leading dimension ld_dst) <- src^T, src cols x rows (leading dimension ld_src), in tiles of
// kTransposeTile: whole ones by transpose_tile where the build has it, the others entry by entry.
template <class T>
void transpose_copy(int rows, int cols, const T* src, std::ptrdiff_t ld_src, T* dst, std::ptrdiff_t ld_dst) {
  for (int i0 = 0; i0 < rows; i0 += kTransposeTile)
    for (int j0 = 0; j0 < cols; j0 += kTransposeTile) {
      const T* s = src + j0 * ld_src + i0;
      T* d = dst + i0 * ld_dst + j0;
      const int ie = std::min(rows - i0, kTransposeTile), je = std::min(cols - j0, kTransposeTile);
      if constexpr (kRegisterTranspose) {
        if (ie == kTransposeTile && je == kTransposeTile) {
          transpose_tile<T>(s, ld_src, d, ld_dst);
          continue;
        }
      }
      for (int i = 0; i < ie; ++i)
        for (int j = 0; j < je; ++j) d[i * ld_dst + j] = s[j * ld_src + i];
    }
}

}  // namespace sparsetarget::blas
