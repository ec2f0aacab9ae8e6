// Whole-array reductions built for the machine's vector width (vector_sums_cpu.cpp), float and double.
#pragma once

#include <cstddef>

namespace sparsetarget {

// Whether every x[i] is finite (no NaN, no inf).
template <class T>
bool all_finite(const T* x, std::size_t n);

// sum of x[i]^2, accumulated in double.
template <class T>
double sum_squares(const T* x, std::size_t n);

}  // namespace sparsetarget
