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
// How far the overall scale of U may drift from 1 before one O(D d) pass resets it. A uniform scale costs no
// accuracy (V and U^-1 carry the inverse scale; Q, w_bar and omega do not depend on it); this only keeps the
// entries far from float32's range limits.
constexpr double kScaleLimit = 16777216.0;  // 2^24

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

// Applies V <- V T^-1 row tile by row tile, T^-1 = a I + P_k diag(coef) P_k^T (k columns of P).
template <class TV, class TS>
void apply_to_V(FactoredState<TV, TS>& st, double a, const std::vector<TS>& P, const std::vector<int>& cols,
                const std::vector<double>& coef) {
  const int d = st.d, k = static_cast<int>(cols.size());
  if (k == 0) {  // a scale only: O(D d)
    const TV scale = static_cast<TV>(a);
    const std::size_t n = static_cast<std::size_t>(st.D) * d;
    for (std::size_t i = 0; i < n; ++i) st.V[i] *= scale;
  } else if (2 * k < d) {
    std::vector<TV> Pk(static_cast<std::size_t>(d) * k), CPkT(static_cast<std::size_t>(k) * d);
    for (int i = 0; i < d; ++i)
      for (int c = 0; c < k; ++c) {
        const TS pic = P[static_cast<std::size_t>(i) * d + cols[c]];
        Pk[static_cast<std::size_t>(i) * k + c] = static_cast<TV>(pic);
        CPkT[static_cast<std::size_t>(c) * d + i] = static_cast<TV>(coef[c] * pic);
      }
    std::vector<TV> Y(static_cast<std::size_t>(kTileRows) * k);
    for (std::int64_t r0 = 0; r0 < st.D; r0 += kTileRows) {
      const int rows = static_cast<int>(std::min<std::int64_t>(kTileRows, st.D - r0));
      TV* tile = row_ptr(st.V, r0, d);
      blas::gemm<TV>(Op::N, Op::N, rows, k, d, 1, tile, d, Pk.data(), k, 0, Y.data(), k);
      blas::gemm<TV>(Op::N, Op::N, rows, d, k, 1, Y.data(), k, CPkT.data(), d, static_cast<TV>(a), tile, d);
    }
  } else {
    std::vector<TV> Tinv(static_cast<std::size_t>(d) * d, TV(0));
    for (int i = 0; i < d; ++i) {
      Tinv[static_cast<std::size_t>(i) * d + i] = static_cast<TV>(a);
      for (int j = 0; j < d; ++j) {
        double acc = 0;
        for (int c = 0; c < k; ++c)
          acc += P[static_cast<std::size_t>(i) * d + cols[c]] * coef[c] * P[static_cast<std::size_t>(j) * d + cols[c]];
        Tinv[static_cast<std::size_t>(i) * d + j] += static_cast<TV>(acc);
      }
    }
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

template <class TV, class TS>
CorrectionReport correct(FactoredState<TV, TS>& st, const StabilizeOptions& opt) {
  const int d = st.d;
  CorrectionReport report;
  std::vector<TS> P, sigma, Rt;
  blas::svd<TS>(d, st.U, P, sigma, Rt);
  report.sigma_max_before = sigma.front();
  report.sigma_min_before = sigma.back();
  if (!(sigma.back() > 0)) throw std::domain_error("U is singular: the factorisation cannot be corrected");
  // Relative to the geometric mean s of the singular values: a uniform scale of U does not hurt, so it is kept
  // (and needs no pass over V) unless s itself drifts far from 1, where it is reset to t = 1 by scaling V.
  double log_sum = 0;
  for (const TS x : sigma) log_sum += std::log(static_cast<double>(x));
  const double s = std::exp(log_sum / d);
  const double t = (s >= 1 / std::sqrt(kScaleLimit) && s <= std::sqrt(kScaleLimit)) ? s : 1.0;
  const double a = s / t;
  const double lo = std::sqrt(opt.sigma_low), hi = std::sqrt(opt.sigma_high);
  // V <- V U U_new^-1 = V P diag(sigma / new_sigma) P^T = a V + V P_k diag(sigma_k / t - a) P_k^T.
  std::vector<int> cols;
  std::vector<double> coef;
  std::vector<TS> new_sigma(sigma);
  for (int i = 0; i < d; ++i) {
    const double ratio = sigma[i] / s;
    if (ratio < lo || ratio > hi) {
      cols.push_back(i);
      coef.push_back(static_cast<double>(sigma[i]) / t - a);
      new_sigma[i] = static_cast<TS>(t);
    } else {
      new_sigma[i] = static_cast<TS>(sigma[i] / a);
    }
  }
  if (!cols.empty() || a != 1.0) {
    apply_to_V(st, a, P, cols, coef);
    report.corrected = true;
    report.values_corrected = static_cast<int>(cols.size());
    st.stats[kStatCorrections] += 1;
    st.stats[kStatCorrectedValues] += static_cast<double>(cols.size());
  }
  // U = P diag(new_sigma) R^T (only when something moved) and U^-1 = R diag(1/new_sigma) P^T, from the factors.
  std::vector<TS> scaled(static_cast<std::size_t>(d) * d);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) scaled[static_cast<std::size_t>(i) * d + j] = P[static_cast<std::size_t>(i) * d + j] * new_sigma[j];
  if (report.corrected) blas::gemm<TS>(Op::N, Op::N, d, d, d, 1, scaled.data(), d, Rt.data(), d, 0, st.U, d);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j)
      scaled[static_cast<std::size_t>(i) * d + j] = Rt[static_cast<std::size_t>(j) * d + i] / new_sigma[j];
  blas::gemm<TS>(Op::N, Op::T, d, d, d, 1, scaled.data(), d, P.data(), d, 0, st.U_inv, d);
  report.sigma_max_after = *std::max_element(new_sigma.begin(), new_sigma.end());
  report.sigma_min_after = *std::min_element(new_sigma.begin(), new_sigma.end());
  st.stats[kStatSigmaMax] = report.sigma_max_after;
  st.stats[kStatSigmaMin] = report.sigma_min_after;
  st.stats[kStatInverseResidual] = 0;
  return report;
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
  const bool spread = !(sigma_max <= opt.sigma_high / opt.sigma_low * sigma_min);
  const bool scale = !(sigma_max <= kScaleLimit) || !(sigma_min >= 1 / kScaleLimit);
  if (spread || scale || !(residual <= opt.inverse_tol)) correct(st, opt);
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
  blas::mirror_upper<double>(d, VtV.data(), d);
  std::vector<double> U(st.U, st.U + dd), omega(st.omega, st.omega + d), tmp(dd), Q(dd);
  // Q = U^T (V^T V) U + U^T (V^T 1) omega^T + omega (1^T V) U + D omega omega^T ; w_bar = U^T V^T 1 + D omega
  blas::gemm<double>(Op::N, Op::N, d, d, d, 1, VtV.data(), d, U.data(), d, 0, tmp.data(), d);
  blas::gemm<double>(Op::T, Op::N, d, d, d, 1, U.data(), d, tmp.data(), d, 0, Q.data(), d);
  std::vector<double> Ut1(d);
  blas::gemv<double>(Op::T, d, d, 1, U.data(), d, Vt1.data(), 0, Ut1.data());
  const double D = static_cast<double>(st.D);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j)
      Q[static_cast<std::size_t>(i) * d + j] += Ut1[i] * omega[j] + omega[i] * Ut1[j] + D * omega[i] * omega[j];
  for (std::size_t i = 0; i < dd; ++i) st.Q[i] = static_cast<TS>(Q[i]);
  for (int i = 0; i < d; ++i) st.w_bar[i] = static_cast<TS>(Ut1[i] + D * omega[i]);
  double rcond = blas::invert<double>(d, U.data());
  if (!(rcond > 0)) throw std::domain_error("U is singular: cannot refresh U^-1");
  for (std::size_t i = 0; i < dd; ++i) st.U_inv[i] = static_cast<TS>(U[i]);
  st.stats[kStatRefreshes] += 1;
}

template <class TV, class TS>
double inverse_error(const FactoredState<TV, TS>& st) {
  const int d = st.d;
  std::vector<double> U(st.U, st.U + static_cast<std::size_t>(d) * d), Ui(st.U_inv, st.U_inv + static_cast<std::size_t>(d) * d),
      prod(static_cast<std::size_t>(d) * d);
  blas::gemm<double>(Op::N, Op::N, d, d, d, 1, U.data(), d, Ui.data(), d, 0, prod.data(), d);
  double acc = 0;
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) {
      const double e = prod[static_cast<std::size_t>(i) * d + j] - (i == j ? 1.0 : 0.0);
      acc += e * e;
    }
  return std::sqrt(acc);
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

}  // namespace sparsetarget
