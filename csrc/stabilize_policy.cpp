// The host (d x d) halves of the stabilisation, shared by every backend: planning a correction from the SVD of U,
// and the small half of a refresh. docs/algorithm.md §8.4-§8.9.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "backend.h"
#include "cpu/blas_cpu.h"
#include "stabilize_policy.h"

namespace sparsetarget {

template <class TS>
template <class TV>
void CorrectionPlan<TS>::low_rank_factors(std::vector<TV>& Pk, std::vector<TV>& CPkT) const {
  const int k = static_cast<int>(cols.size());
  Pk.assign(static_cast<std::size_t>(d) * k, TV(0));
  CPkT.assign(static_cast<std::size_t>(k) * d, TV(0));
  for (int i = 0; i < d; ++i)
    for (int c = 0; c < k; ++c) {
      const TS pic = P[static_cast<std::size_t>(i) * d + cols[c]];
      Pk[static_cast<std::size_t>(i) * k + c] = static_cast<TV>(pic);
      CPkT[static_cast<std::size_t>(c) * d + i] = static_cast<TV>(coef[c] * pic);
    }
}

template <class TS>
template <class TV>
void CorrectionPlan<TS>::dense_factor(std::vector<TV>& Tinv) const {
  const int k = static_cast<int>(cols.size());
  Tinv.assign(static_cast<std::size_t>(d) * d, TV(0));
  for (int i = 0; i < d; ++i) {
    Tinv[static_cast<std::size_t>(i) * d + i] = static_cast<TV>(a);
    for (int j = 0; j < d; ++j) {
      double acc = 0;
      for (int c = 0; c < k; ++c)
        acc += P[static_cast<std::size_t>(i) * d + cols[c]] * coef[c] * P[static_cast<std::size_t>(j) * d + cols[c]];
      Tinv[static_cast<std::size_t>(i) * d + j] += static_cast<TV>(acc);
    }
  }
}

template <class TS>
CorrectionPlan<TS> plan_correction(int d, const TS* U, const StabilizeOptions& opt, bool whole_band) {
  CorrectionPlan<TS> plan;
  plan.d = d;
  CorrectionReport& report = plan.report;
  std::vector<TS> sigma, Rt;
  blas::svd<TS>(d, U, plan.P, sigma, Rt);
  const std::vector<TS>& P = plan.P;
  report.sigma_max_before = sigma.front();
  report.sigma_min_before = sigma.back();
  if (!(sigma.back() > 0)) throw std::domain_error("U is singular: the factorisation cannot be corrected");
  // Relative to the geometric mean s of the singular values: a uniform scale of U does not hurt, so it is kept
  // (and needs no pass over V) unless s itself drifts far from 1, where it is reset to t = 1 by scaling V.
  double log_sum = 0;
  for (const TS x : sigma) log_sum += std::log(static_cast<double>(x));
  const double s = std::exp(log_sum / d);
  const double t = (s >= 1 / std::sqrt(kScaleLimit) && s <= std::sqrt(kScaleLimit)) ? s : 1.0;
  plan.a = s / t;
  const double lo = std::sqrt(opt.sigma_low), hi = std::sqrt(opt.sigma_high);
  const bool move = whole_band || !(sigma.front() <= opt.sigma_high / opt.sigma_low * sigma.back());
  // V <- V U U_new^-1 = V P diag(sigma / new_sigma) P^T = a V + V P_k diag(sigma_k / t - a) P_k^T.
  std::vector<TS> new_sigma(sigma);
  for (int i = 0; i < d; ++i) {
    const double ratio = sigma[i] / s;
    if (move && (ratio < lo || ratio > hi)) {
      plan.cols.push_back(i);
      plan.coef.push_back(static_cast<double>(sigma[i]) / t - plan.a);
      new_sigma[i] = static_cast<TS>(t);
    } else {
      new_sigma[i] = static_cast<TS>(sigma[i] / plan.a);
    }
  }
  report.corrected = !plan.cols.empty() || plan.a != 1.0;
  report.values_corrected = static_cast<int>(plan.cols.size());
  // U = P diag(new_sigma) R^T (only when something moved) and U^-1 = R diag(1/new_sigma) P^T, from the factors.
  std::vector<TS> scaled(static_cast<std::size_t>(d) * d);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) scaled[static_cast<std::size_t>(i) * d + j] = P[static_cast<std::size_t>(i) * d + j] * new_sigma[j];
  if (report.corrected) {
    plan.U.resize(static_cast<std::size_t>(d) * d);
    blas::gemm<TS>(Op::N, Op::N, d, d, d, 1, scaled.data(), d, Rt.data(), d, 0, plan.U.data(), d);
  }
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j)
      scaled[static_cast<std::size_t>(i) * d + j] = Rt[static_cast<std::size_t>(j) * d + i] / new_sigma[j];
  plan.U_inv.resize(static_cast<std::size_t>(d) * d);
  blas::gemm<TS>(Op::N, Op::T, d, d, d, 1, scaled.data(), d, P.data(), d, 0, plan.U_inv.data(), d);
  report.sigma_max_after = *std::max_element(new_sigma.begin(), new_sigma.end());
  report.sigma_min_after = *std::min_element(new_sigma.begin(), new_sigma.end());
  return plan;
}

void record_correction(const CorrectionReport& report, double* stats) {
  if (report.corrected) {
    stats[kStatCorrections] += 1;
    stats[kStatCorrectedValues] += report.values_corrected;
  }
  stats[kStatSigmaMax] = report.sigma_max_after;
  stats[kStatSigmaMin] = report.sigma_min_after;
  stats[kStatInverseResidual] = 0;
}


template <class TS>
void refresh_small(int d, std::int64_t D_rows, std::vector<double>& VtV, const std::vector<double>& Vt1, const TS* U_in,
                   const TS* omega_in, TS* Q_out, TS* w_bar_out, TS* U_inv_out) {
  const std::size_t dd = static_cast<std::size_t>(d) * d;
  blas::mirror_upper<double>(d, VtV.data(), d);
  std::vector<double> U(U_in, U_in + dd), omega(omega_in, omega_in + d), tmp(dd), Q(dd);
  // Q = U^T (V^T V) U + U^T (V^T 1) omega^T + omega (1^T V) U + D omega omega^T ; w_bar = U^T V^T 1 + D omega
  blas::gemm<double>(Op::N, Op::N, d, d, d, 1, VtV.data(), d, U.data(), d, 0, tmp.data(), d);
  blas::gemm<double>(Op::T, Op::N, d, d, d, 1, U.data(), d, tmp.data(), d, 0, Q.data(), d);
  std::vector<double> Ut1(d);
  blas::gemv<double>(Op::T, d, d, 1, U.data(), d, Vt1.data(), 0, Ut1.data());
  const double D = static_cast<double>(D_rows);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j)
      Q[static_cast<std::size_t>(i) * d + j] += Ut1[i] * omega[j] + omega[i] * Ut1[j] + D * omega[i] * omega[j];
  const double rcond = blas::invert<double>(d, U.data());
  if (!(rcond > 0)) throw std::domain_error("U is singular: cannot refresh U^-1");
  blas::mirror_upper<double>(d, Q.data(), d);  // exactly symmetric, as every step keeps it
  for (std::size_t i = 0; i < dd; ++i) Q_out[i] = static_cast<TS>(Q[i]);
  for (int i = 0; i < d; ++i) w_bar_out[i] = static_cast<TS>(Ut1[i] + D * omega[i]);
  for (std::size_t i = 0; i < dd; ++i) U_inv_out[i] = static_cast<TS>(U[i]);
}

template <class TS>
double inverse_error_of(int d, const TS* U_in, const TS* U_inv_in) {
  const std::size_t dd = static_cast<std::size_t>(d) * d;
  std::vector<double> U(U_in, U_in + dd), Ui(U_inv_in, U_inv_in + dd), prod(dd);
  blas::gemm<double>(Op::N, Op::N, d, d, d, 1, U.data(), d, Ui.data(), d, 0, prod.data(), d);
  double acc = 0;
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) {
      const double e = prod[static_cast<std::size_t>(i) * d + j] - (i == j ? 1.0 : 0.0);
      acc += e * e;
    }
  return std::sqrt(acc);
}


#define ST_INSTANTIATE_SMALL(TS)                                                                                  \
  template struct CorrectionPlan<TS>;                                                                             \
  template void CorrectionPlan<TS>::low_rank_factors<float>(std::vector<float>&, std::vector<float>&) const;      \
  template void CorrectionPlan<TS>::low_rank_factors<double>(std::vector<double>&, std::vector<double>&) const;   \
  template void CorrectionPlan<TS>::dense_factor<float>(std::vector<float>&) const;                               \
  template void CorrectionPlan<TS>::dense_factor<double>(std::vector<double>&) const;                             \
  template CorrectionPlan<TS> plan_correction<TS>(int, const TS*, const StabilizeOptions&, bool);                 \
  template void refresh_small<TS>(int, std::int64_t, std::vector<double>&, const std::vector<double>&, const TS*, \
                                  const TS*, TS*, TS*, TS*);                                                      \
  template double inverse_error_of<TS>(int, const TS*, const TS*);
ST_INSTANTIATE_SMALL(float)
ST_INSTANTIATE_SMALL(double)
#undef ST_INSTANTIATE_SMALL

}  // namespace sparsetarget
