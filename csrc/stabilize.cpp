#include "stabilize.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "blas.h"
#include "kernels.h"

namespace sparsetarget {

using blas::Op;

namespace {

constexpr std::int64_t kTileRows = 2048;

template <class T>
double norm2(const T* x, int n) {
  double acc = 0;
  for (int i = 0; i < n; ++i) acc += static_cast<double>(x[i]) * x[i];
  return std::sqrt(acc);
}

template <class T>
void scale_to_unit(T* x, int n) {
  const double nrm = norm2(x, n);
  if (nrm > 0 && std::isfinite(nrm))
    for (int i = 0; i < n; ++i) x[i] = static_cast<T>(x[i] / nrm);
  else
    for (int i = 0; i < n; ++i) x[i] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(n)));
}

// Applies V <- V T^-1 row tile by row tile (see CorrectionPlan).
template <class TV, class TS>
void apply_to_V(FactoredState<TV, TS>& st, const CorrectionPlan<TS>& plan) {
  const int d = st.d, k = static_cast<int>(plan.cols.size());
  if (k == 0) {  // a scale only: O(D d)
    const TV scale = static_cast<TV>(plan.a);
    const std::size_t n = static_cast<std::size_t>(st.D) * d;
    for (std::size_t i = 0; i < n; ++i) st.V[i] *= scale;
  } else if (plan.low_rank()) {
    std::vector<TV> Pk, CPkT;
    plan.low_rank_factors(Pk, CPkT);
    std::vector<TV> Y(static_cast<std::size_t>(kTileRows) * k);
    for (std::int64_t r0 = 0; r0 < st.D; r0 += kTileRows) {
      const int rows = static_cast<int>(std::min<std::int64_t>(kTileRows, st.D - r0));
      TV* tile = row_ptr(st.V, r0, d);
      blas::gemm<TV>(Op::N, Op::N, rows, k, d, 1, tile, d, Pk.data(), k, 0, Y.data(), k);
      blas::gemm<TV>(Op::N, Op::N, rows, d, k, 1, Y.data(), k, CPkT.data(), d, static_cast<TV>(plan.a), tile, d);
    }
  } else {
    std::vector<TV> Tinv;
    plan.dense_factor(Tinv);
    std::vector<TV> out(static_cast<std::size_t>(kTileRows) * d);
    for (std::int64_t r0 = 0; r0 < st.D; r0 += kTileRows) {
      const int rows = static_cast<int>(std::min<std::int64_t>(kTileRows, st.D - r0));
      TV* tile = row_ptr(st.V, r0, d);
      blas::gemm<TV>(Op::N, Op::N, rows, d, d, 1, tile, d, Tinv.data(), d, 0, out.data(), d);
      std::copy(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(rows) * d, tile);
    }
  }
}

}  // namespace

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
CorrectionPlan<TS> plan_correction(int d, const TS* U, const StabilizeOptions& opt) {
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
  // V <- V U U_new^-1 = V P diag(sigma / new_sigma) P^T = a V + V P_k diag(sigma_k / t - a) P_k^T.
  std::vector<TS> new_sigma(sigma);
  for (int i = 0; i < d; ++i) {
    const double ratio = sigma[i] / s;
    if (ratio < lo || ratio > hi) {
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

template <class TV, class TS>
CorrectionReport correct(FactoredState<TV, TS>& st, const StabilizeOptions& opt) {
  const CorrectionPlan<TS> plan = plan_correction(st.d, st.U, opt);
  if (plan.report.corrected) {
    apply_to_V(st, plan);
    std::copy(plan.U.begin(), plan.U.end(), st.U);
  }
  std::copy(plan.U_inv.begin(), plan.U_inv.end(), st.U_inv);
  record_correction(plan.report, st.stats);
  return plan.report;
}

bool needs_correction(double sigma_max, double sigma_min, double residual, const StabilizeOptions& opt) {
  const bool spread = !(sigma_max <= opt.sigma_high / opt.sigma_low * sigma_min);
  const bool scale = !(sigma_max <= kScaleLimit) || !(sigma_min >= 1 / kScaleLimit);
  return spread || scale || !(residual <= opt.inverse_tol);
}

template <class TV, class TS>
void after_step(FactoredState<TV, TS>& st, const StabilizeOptions& opt) {
  const auto steps = static_cast<std::int64_t>(st.stats[kStatSteps]);
  if (opt.refresh_every > 0 && steps % opt.refresh_every == 0) {
    refresh(st);
    return;
  }
  if (opt.check_every <= 0 || steps % opt.check_every != 0) return;
  const int d = st.d;
  std::vector<TS> u(d), y(d), r(d);
  // Largest singular value of U: one power step on U^T U.
  blas::gemv<TS>(Op::N, d, d, 1, st.U, d, st.probe_max, 0, u.data());
  const double sigma_max = norm2(u.data(), d);
  blas::gemv<TS>(Op::T, d, d, 1, st.U, d, u.data(), 0, st.probe_max);
  scale_to_unit(st.probe_max, d);
  // Smallest singular value of U: one power step on U^-T U^-1; the same vector probes U U^-1 = I.
  blas::gemv<TS>(Op::N, d, d, 1, st.U_inv, d, st.probe_min, 0, y.data());
  const double inv_norm = norm2(y.data(), d);
  std::copy(st.probe_min, st.probe_min + d, r.begin());
  blas::gemv<TS>(Op::N, d, d, 1, st.U, d, y.data(), -1, r.data());
  const double residual = norm2(r.data(), d);
  blas::gemv<TS>(Op::T, d, d, 1, st.U_inv, d, y.data(), 0, st.probe_min);
  scale_to_unit(st.probe_min, d);
  const double sigma_min = inv_norm > 0 ? 1.0 / inv_norm : 0.0;
  st.stats[kStatSigmaMax] = sigma_max;
  st.stats[kStatSigmaMin] = sigma_min;
  st.stats[kStatInverseResidual] = residual;
  if (needs_correction(sigma_max, sigma_min, residual, opt)) correct(st, opt);
}

template <class TV, class TS>
void refresh(FactoredState<TV, TS>& st) {
  const int d = st.d;
  const std::size_t dd = static_cast<std::size_t>(d) * d;
  // V^T V and V^T 1 in float64, tile by tile.
  std::vector<double> VtV(dd, 0.0), Vt1(d, 0.0);
  std::vector<TV> part(dd);
  for (std::int64_t r0 = 0; r0 < st.D; r0 += kTileRows) {
    const int rows = static_cast<int>(std::min<std::int64_t>(kTileRows, st.D - r0));
    const TV* tile = row_ptr(static_cast<const TV*>(st.V), r0, d);
    blas::syrk_t<TV>(d, rows, 1, tile, d, 0, part.data(), d);
    for (int i = 0; i < d; ++i)
      for (int j = i; j < d; ++j) VtV[static_cast<std::size_t>(i) * d + j] += part[static_cast<std::size_t>(i) * d + j];
    for (int r = 0; r < rows; ++r) {
      const TV* v = tile + static_cast<std::ptrdiff_t>(r) * d;
      for (int i = 0; i < d; ++i) Vt1[i] += v[i];
    }
  }
  refresh_small(d, st.D, VtV, Vt1, st.U, st.omega, st.Q, st.w_bar, st.U_inv);
  st.stats[kStatRefreshes] += 1;
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

template <class TV, class TS>
double inverse_error(const FactoredState<TV, TS>& st) {
  return inverse_error_of(st.d, st.U, st.U_inv);
}

#define ST_INSTANTIATE(TV, TS)                                                                       \
  template void after_step<TV, TS>(FactoredState<TV, TS>&, const StabilizeOptions&);                \
  template CorrectionReport correct<TV, TS>(FactoredState<TV, TS>&, const StabilizeOptions&);       \
  template void refresh<TV, TS>(FactoredState<TV, TS>&);                                             \
  template double inverse_error<TV, TS>(const FactoredState<TV, TS>&);
ST_INSTANTIATE(float, float)
ST_INSTANTIATE(float, double)
ST_INSTANTIATE(double, float)
ST_INSTANTIATE(double, double)
#undef ST_INSTANTIATE

#define ST_INSTANTIATE_SMALL(TS)                                                                                  \
  template struct CorrectionPlan<TS>;                                                                             \
  template void CorrectionPlan<TS>::low_rank_factors<float>(std::vector<float>&, std::vector<float>&) const;      \
  template void CorrectionPlan<TS>::low_rank_factors<double>(std::vector<double>&, std::vector<double>&) const;   \
  template void CorrectionPlan<TS>::dense_factor<float>(std::vector<float>&) const;                               \
  template void CorrectionPlan<TS>::dense_factor<double>(std::vector<double>&) const;                             \
  template CorrectionPlan<TS> plan_correction<TS>(int, const TS*, const StabilizeOptions&);                       \
  template void refresh_small<TS>(int, std::int64_t, std::vector<double>&, const std::vector<double>&, const TS*, \
                                  const TS*, TS*, TS*, TS*);                                                      \
  template double inverse_error_of<TS>(int, const TS*, const TS*);
ST_INSTANTIATE_SMALL(float)
ST_INSTANTIATE_SMALL(double)
#undef ST_INSTANTIATE_SMALL

}  // namespace sparsetarget
