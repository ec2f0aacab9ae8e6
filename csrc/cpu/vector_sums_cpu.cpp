// Whole-array reductions of the step's checks (finiteness, Frobenius norms), built for the machine's vector width
// and chosen when the library loads: compiled for SSE only, like the rest of the host code, they read about one
// element per cycle (a norm of 200 x 512 floats took 15 us; 4 us with AVX-512).
#include "vector_sums_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ST_SUM_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define ST_SUM_CLONES
#endif

namespace sparsetarget {

template <class T>
ST_SUM_CLONES bool all_finite(const T* x, std::size_t n) {
  T acc = 0;  // x * 0 is 0 for finite x and NaN for NaN or inf, so one vectorised sum tells
#pragma omp simd reduction(+ : acc)
  for (std::size_t i = 0; i < n; ++i) acc += x[i] * T(0);
  return acc == T(0);
}

template <class T>
ST_SUM_CLONES double sum_squares(const T* x, std::size_t n) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (std::size_t i = 0; i < n; ++i) acc += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return acc;
}

template bool all_finite<float>(const float*, std::size_t);
template bool all_finite<double>(const double*, std::size_t);
template double sum_squares<float>(const float*, std::size_t);
template double sum_squares<double>(const double*, std::size_t);

}  // namespace sparsetarget
