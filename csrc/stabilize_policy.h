// The stabilisation policy of the factorisation W = V U + 1 omega^T: its options, the monitoring decision, and the
// d x d halves of a correction and of a refresh (host code shared by every backend). The passes over V and the
// scheduling after a step are in stabilize.h, written once over the backend primitives. Derivations and the policy's
// trade-offs: docs/algorithm.md §8.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "host_device.h"
#include "state.h"

namespace sparsetarget {

// How far the overall scale of U may drift from 1 before one O(D d) pass resets it. A uniform scale costs no
// accuracy (V and U^-1 carry the inverse scale; Q, w_bar and omega do not depend on it); this only keeps the
// entries far from float32's range limits.
constexpr double kScaleLimit = 16777216.0;  // 2^24

// The default band of U's singular values by state dtype (docs/algorithm.md §8.11). U's spread amplifies the
// rounding of every V update (about eps_V sinh(2L) / 2L for a spread e^{2L}), and the passes over V that correct it
// cost 2 D d k flops for k moved values: the wider the band, the rarer the passes (their number falls with the square
// of the band's log-width) and the larger the amplification. A float32 state rounds U, U^-1 and Q at the level of
// float32 V already, so the amplification of a spread up to 100 adds about as much again; a float64 state is exact
// to far below V's rounding, so it keeps a spread up to 25, where the amplification stays below 4.
constexpr double kSigmaLowFloat32 = 0.1, kSigmaHighFloat32 = 10.0;
constexpr double kSigmaLowFloat64 = 0.2, kSigmaHighFloat64 = 5.0;

// The policy; these defaults are the library's (the Python front ends take theirs from here). The band defaults
// to the float32 state's; default_stabilize_options gives the one of each state dtype.
struct StabilizeOptions {
  double sigma_low = kSigmaLowFloat32;  // with sigma_high: tolerated spread of U's singular values (high / low)
  double sigma_high = kSigmaHighFloat32;
  double inverse_tol = 1e-3;       // largest tolerated ||U U^-1 x - x|| / ||x||
  std::int64_t check_every = 16;    // monitor at least every this many steps, earlier when due (>= 1)
  std::int64_t refresh_every = -1;  // full refresh every this many steps; 0 never; -1 automatic (refresh_period)
};

// The default policy of a state dtype TS.
template <class TS>
StabilizeOptions default_stabilize_options() {
  StabilizeOptions opt;
  if (sizeof(TS) == sizeof(double)) {
    opt.sigma_low = kSigmaLowFloat64;
    opt.sigma_high = kSigmaHighFloat64;
  }
  return opt;
}

// Rows of training per output between automatic refreshes: a refresh costs about D d^2 flops, a step of m rows
// about 14 m d^2, so refreshing after kAutoRefreshRows * D rows spends about 1 / (14 kAutoRefreshRows) of the step
// time on it (docs/algorithm.md §8.9; benchmarks/soak.py measures it).
constexpr double kAutoRefreshRows = 5;

// Steps between refreshes after a step of `rows` rows: refresh_every, or with -1 the automatic period
// ceil(kAutoRefreshRows * D / rows); 0 never.
inline std::int64_t refresh_period(const StabilizeOptions& opt, std::int64_t D, std::int64_t rows) {
  if (opt.refresh_every >= 0) return opt.refresh_every;
  const double period = std::ceil(kAutoRefreshRows * static_cast<double>(D) / static_cast<double>(rows < 1 ? 1 : rows));
  return static_cast<std::int64_t>(period < 1 ? 1 : period);
}

// The monitoring decision after a step: does a correction have to run? (docs/algorithm.md §8.3)
ST_HD inline bool needs_correction(double sigma_max, double sigma_min, double residual, const StabilizeOptions& opt) {
  const bool spread = !(sigma_max <= opt.sigma_high / opt.sigma_low * sigma_min);
  const bool scale = !(sigma_max <= kScaleLimit) || !(sigma_min >= 1 / kScaleLimit);
  return spread || scale || !(residual <= opt.inverse_tol);
}

struct CorrectionReport {
  bool corrected = false;
  int values_corrected = 0;
  double sigma_max_before = 0, sigma_min_before = 0;
  double sigma_max_after = 0, sigma_min_after = 0;
};

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

// SVD of U (d x d, row-major) and the correction it calls for; throws std::domain_error when U is singular. The
// values out of band move back only when U's spread exceeds the trigger or `whole_band` (an explicit stabilize()):
// a correction called by the scale or the inverse residual alone rescales U and rebuilds U^-1, no more.
template <class TS>
CorrectionPlan<TS> plan_correction(int d, const TS* U, const StabilizeOptions& opt, bool whole_band);

// Adds a correction's report to the monitoring scalars (kStatCount of them).
void record_correction(const CorrectionReport& report, double* stats);

// The small half of a refresh: from V^T V (upper triangle, float64; mirrored in place) and V^T 1, U and omega,
// writes Q, w_bar and U^-1. Throws std::domain_error (nothing written) when U is singular.
template <class TS>
void refresh_small(int d, std::int64_t D, std::vector<double>& VtV, const std::vector<double>& Vt1, const TS* U,
                   const TS* omega, TS* Q, TS* w_bar, TS* U_inv);

// ||U U^-1 - I||_F in float64, O(d^3).
template <class TS>
double inverse_error_of(int d, const TS* U, const TS* U_inv);

}  // namespace sparsetarget
