// Small loops over rows of V that BLAS does not cover: dot products and row updates between the weight dtype TV
// and the state dtype TS. Vectorised by the compiler (OpenMP SIMD pragmas, no threads).
#pragma once

#include <cmath>
#include <cstddef>

#include "vector_sums_cpu.h"  // all_finite

namespace sparsetarget {

template <class TA, class TB>
inline TB dot_row(const TA* a, const TB* b, int n) {
  TB acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += static_cast<TB>(a[i]) * b[i];
  return acc;
}

// y[i] += alpha * x[i], stored in y's dtype.
template <class TX, class TY, class TA>
inline void axpy_row(TA alpha, const TX* x, TY* y, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] = static_cast<TY>(y[i] + alpha * x[i]);
}

template <class T>
inline T* row_ptr(T* base, std::ptrdiff_t row, int width) {
  return base + row * static_cast<std::ptrdiff_t>(width);
}

}  // namespace sparsetarget
