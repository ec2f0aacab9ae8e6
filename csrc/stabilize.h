// Keeping the factorisation W = V U + 1 omega^T healthy without changing W.
//
// Monitoring (O(d^2) per check): one power-iteration step each for the largest singular value of U and of U^-1,
// warm-started from the previous vectors, plus the residual ||U (U^-1 x) - x|| on the same vector.
// Correction (one BLAS-3 pass over V): when the spread sigma_max / sigma_min exceeds sigma_high / sigma_low, the
// overall scale leaves [2^-24, 2^24], or the residual exceeds inverse_tol, take the SVD U = P diag(sigma) R^T and,
// relative to the geometric mean s of the singular values, set every singular value outside the inner band
// s [sqrt(sigma_low), sqrt(sigma_high)] to s (hysteresis: the next correction is far away): U <- T U and
// V <- V T^-1 in row tiles, rank-k when k < d/2, else one d x d GEMM. A uniform shrink or growth of U (squared
// error shrinks U every step) thus costs nothing until the scale is far from 1, where V is scaled once, O(D d).
// U^-1 is rebuilt from the SVD. W is unchanged up to rounding.
// Refresh (O(D d^2), on request or every refresh_every steps): recompute U^-1, Q and w_bar from V, U, omega.
#pragma once

#include <cstdint>
#include <vector>

#include "state.h"

namespace sparsetarget {

// How far the overall scale of U may drift from 1 before one O(D d) pass resets it. A uniform scale costs no
// accuracy (V and U^-1 carry the inverse scale; Q, w_bar and omega do not depend on it); this only keeps the
// entries far from float32's range limits.
constexpr double kScaleLimit = 16777216.0;  // 2^24

struct StabilizeOptions {
  double sigma_low = 0.5;   // with sigma_high: tolerated spread of U's singular values (sigma_high / sigma_low)
  double sigma_high = 2.0;
  double inverse_tol = 1e-3;       // largest tolerated ||U U^-1 x - x|| / ||x||
  std::int64_t check_every = 1;    // monitor every this many steps; 0 disables monitoring
  std::int64_t refresh_every = 0;  // full refresh every this many steps; 0 disables
};

struct CorrectionReport {
  bool corrected = false;
  int values_corrected = 0;
  double sigma_max_before = 0, sigma_min_before = 0;
  double sigma_max_after = 0, sigma_min_after = 0;
};

// Cheap monitoring after a step; runs a correction or a refresh when the policy asks for one.
template <class TV, class TS>
void after_step(FactoredState<TV, TS>& st, const StabilizeOptions& opt);

// SVD-based correction now (see above). With force, U^-1 is rebuilt even when no singular value is out of band.
template <class TV, class TS>
CorrectionReport correct(FactoredState<TV, TS>& st, const StabilizeOptions& opt);

// Recompute U^-1, Q = W^T W and w_bar = W^T 1 from V, U and omega, accumulating in float64.
template <class TV, class TS>
void refresh(FactoredState<TV, TS>& st);

// Exact ||U U^-1 - I||_F, O(d^3), for diagnostics.
template <class TV, class TS>
double inverse_error(const FactoredState<TV, TS>& st);

// ---- The d x d halves of the above, on host arrays: the CUDA backend runs them on copies of the small state and
// ---- does the O(D d) halves on the device.

// What a correction does: V <- V T^-1 with T^-1 = a I + P_k diag(coef) P_k^T (P_k: the columns cols of P),
// U <- U_new (when report.corrected), U^-1 <- U_inv.
template <class TS>
struct CorrectionPlan {
  int d = 0;
  CorrectionReport report;
  double a = 1;
  std::vector<TS> P;  // d x d left singular vectors of U
  std::vector<int> cols;
  std::vector<double> coef;
  std::vector<TS> U, U_inv;  // d x d; U is empty when nothing moved

  // Apply T^-1 as two thin GEMMs (rank k) rather than one d x d GEMM.
  bool low_rank() const { return 2 * cols.size() < static_cast<std::size_t>(d); }
  // P_k (d x k) and diag(coef) P_k^T (k x d) in the weight dtype.
  template <class TV>
  void low_rank_factors(std::vector<TV>& Pk, std::vector<TV>& CPkT) const;
  // T^-1 (d x d) in the weight dtype.
  template <class TV>
  void dense_factor(std::vector<TV>& Tinv) const;
};

// SVD of U (d x d, row-major) and the correction it calls for; throws std::domain_error when U is singular.
template <class TS>
CorrectionPlan<TS> plan_correction(int d, const TS* U, const StabilizeOptions& opt);

// Adds a correction's report to the monitoring scalars (kStatCount of them).
void record_correction(const CorrectionReport& report, double* stats);

// The monitoring decision of after_step: does a correction have to run now?
bool needs_correction(double sigma_max, double sigma_min, double residual, const StabilizeOptions& opt);

// The small half of refresh: from V^T V (upper triangle, float64; mirrored in place) and V^T 1, U and omega,
// writes Q, w_bar and U^-1. Throws std::domain_error (nothing written) when U is singular.
template <class TS>
void refresh_small(int d, std::int64_t D, std::vector<double>& VtV, const std::vector<double>& Vt1, const TS* U,
                   const TS* omega, TS* Q, TS* w_bar, TS* U_inv);

template <class TS>
double inverse_error_of(int d, const TS* U, const TS* U_inv);

}  // namespace sparsetarget
