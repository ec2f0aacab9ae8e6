// The elementwise parts of the step and of the monitoring, each written once as a functor that a backend runs
// over an index range (loops on the CPU, kernels on a GPU). Formulas: docs/algorithm.md §4-§5 and §8.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "host_device.h"
#include "stabilize_policy.h"
#include "state.h"

namespace sparsetarget::parts {

// W^T z_j = U^T Zv_j + z_sum_j omega (completed in place in WZ), then
// grad_h_j = alpha_j Q h_j + beta_j w_bar + W^T z_j with alpha = 2 dL/dq, beta = dL/ds (§4).
template <class TS>
struct GradRow {
  const TS *dq, *ds, *HQ, *w_bar, *omega, *z_sum;
  TS *WZ, *grad_H;
  int d;
  ST_HD void operator()(int j, int i) const {
    const std::size_t x = static_cast<std::size_t>(j) * d + i;
    const TS wz = WZ[x] + z_sum[j] * omega[i];
    WZ[x] = wz;
    grad_H[x] = 2 * dq[j] * HQ[x] + ds[j] * w_bar[i] + wz;
  }
};

// W^T z_j = grad_h_j - alpha_j Q h_j - beta_j w_bar, from a grad_H already computed at these weights.
template <class TS>
struct WZFromKnown {
  const TS *dq, *ds, *HQ, *w_bar, *grad_H;
  TS* WZ;
  int d;
  ST_HD void operator()(int j, int i) const {
    const std::size_t x = static_cast<std::size_t>(j) * d + i;
    WZ[x] = grad_H[x] - 2 * dq[j] * HQ[x] - ds[j] * w_bar[i];
  }
};

// g_one_j = g_j . 1 = alpha_j s_j + beta_j D + sum_k z_jk, and v_j = alpha_j (omega . h_j) + beta_j (§5.8-§5.9).
template <class TS>
struct RowScalars {
  const TS *dq, *ds, *s, *Hw, *z_sum;
  TS *g_one, *v;
  TS D;
  ST_HD void operator()(std::size_t j) const {
    const TS alpha = 2 * dq[j];
    g_one[j] = alpha * s[j] + ds[j] * D + z_sum[j];
    v[j] = alpha * Hw[j] + ds[j];
  }
};

// Row j of R = (alpha_j / 2) Q h_j + W^T z_j, so that A = (alpha H) R^T has A_ij + A_ji = alpha_i alpha_j o_i . o_j
// + alpha_i o_i . z_j + alpha_j o_j . z_i (§5.3).
template <class TS>
struct GramRow {
  const TS *dq, *HQ, *WZ;
  TS* R;
  int d;
  ST_HD void operator()(int j, int i) const {
    const std::size_t x = static_cast<std::size_t>(j) * d + i;
    R[x] = dq[j] * HQ[x] + WZ[x];
  }
};

// G_ij = g_i . g_j from A (GramRow) and the scalars; the sparse overlaps z_i . z_j come after (§5.3).
template <class TS>
struct Gram {
  const TS *dq, *ds, *s, *z_sum, *A;
  TS* G;
  TS D;
  int m;
  ST_HD void operator()(int i, int j) const {
    const std::size_t ij = static_cast<std::size_t>(i) * m + j, ji = static_cast<std::size_t>(j) * m + i;
    const TS ai = 2 * dq[i], aj = 2 * dq[j];
    G[ij] = A[ij] + A[ji] + ai * ds[j] * s[i] + ds[i] * aj * s[j] + D * ds[i] * ds[j] + ds[i] * z_sum[j] +
            ds[j] * z_sum[i];
  }
};

// out_j = alpha_j h_j
template <class TS>
struct ScaleRows {
  const TS *dq, *H;
  TS* out;
  int d;
  ST_HD void operator()(int j, int i) const {
    const std::size_t x = static_cast<std::size_t>(j) * d + i;
    out[x] = 2 * dq[j] * H[x];
  }
};

// S^T = I_m - (lr / c) H H^T diag(alpha), the transposed m x m system of the Woodbury branch (§5.5; H H^T is
// symmetric): entry (i, j) is that of S at (j, i).
template <class TS>
struct WoodburySystemT {
  const TS *dq, *HHt;
  TS* St;
  TS lr_over_c;
  int m;
  ST_HD void operator()(int i, int j) const {
    const std::size_t x = static_cast<std::size_t>(i) * m + j;
    St[x] = (i == j ? TS(1) : TS(0)) - lr_over_c * (2 * dq[j]) * HHt[x];
  }
};

// M = c I (the explicit branch then adds -lr H^T diag(alpha) H).
template <class TS>
struct ScaledIdentity {
  TS* M;
  TS c;
  int n;
  ST_HD void operator()(int i, int j) const { M[static_cast<std::size_t>(i) * n + j] = i == j ? c : TS(0); }
};

// What the commit adds to U, Q and U^-1 is a product A^T B of checked factors; every entry of it is at most
// ||A||_F ||B||_F. out[0] is 0 when these bounds stay below limit (half the state dtype's range, so that adding them
// to entries of the state below that half cannot overflow), inf otherwise (§9.3).
// norms: ||UH||, ||aH||, ||H||, ||B||, ||X|| (0 in the explicit branch, where U^-1 is copied).
struct CommitBound {
  const double* norms;
  double lr, inv_c, limit;
  double* out;
  bool q_update_given = false;  // norms[3] is ||dQ||_F itself (large m), not ||B||
  ST_HD void operator()(std::size_t) const {
    const double u = lr * norms[0] * norms[1], u_inv = lr * inv_c * norms[1] * norms[4];
    const double q = q_update_given ? norms[3] : 2 * lr * norms[2] * norms[3];
    out[0] = u <= limit && q <= limit && u_inv <= limit ? 0.0 : static_cast<double>(INFINITY);
  }
};

// The dense W must stay within its dtype's range too (a correction would otherwise carry an overflow of W into V):
// ||W_new||_F <= ||W||_F + lr sum_j ||g_j|| ||h_j|| <= sqrt(tr Q) + lr sqrt(tr G) ||H||_F. out[0] is 0 when that
// stays below limit, inf otherwise. Runs once: O(d + m).
// Without G (large m), ||Gamma^T H||_F (from GammaEnergy) takes the place of sum_j ||g_j|| ||h_j||, which it never exceeds.
template <class TS>
struct WeightBound {
  const TS *Q, *G;  // G: nullptr when gamma_energy is given
  const double* H_norm;
  const double* gamma_energy;
  double lr, limit;
  int d, m;
  double* out;
  ST_HD void operator()(std::size_t) const {
    double trace_Q = 0, trace_G = 0;
    for (int i = 0; i < d; ++i) trace_Q += fabs(static_cast<double>(Q[static_cast<std::size_t>(i) * d + i]));
    if (G == nullptr) {
      out[0] = sqrt(trace_Q) + lr * sqrt(fabs(gamma_energy[0])) <= limit ? 0.0 : static_cast<double>(INFINITY);
      return;
    }
    for (int j = 0; j < m; ++j) trace_G += fabs(static_cast<double>(G[static_cast<std::size_t>(j) * m + j]));
    out[0] = sqrt(trace_Q) + lr * sqrt(trace_G) * H_norm[0] <= limit ? 0.0 : static_cast<double>(INFINITY);
  }
};

// For the V scatter, per target entry e of row j: step_e = |lr z_e| max_i |X_ji| and row_max_e = max_i |V[k_e]_i|
// (an index outside [0, D) is left to the backend's own report).
template <class TV, class TS>
struct ScatterBound {
  const TV* V;
  const std::int64_t *indptr, *indices;
  const TS *dA, *X;
  std::int64_t D;
  double lr;
  int d;
  double *step, *row_max;
  ST_HD void operator()(int j, int) const {
    const double x_max = abs_max(X + static_cast<std::size_t>(j) * d, d);
    for (std::int64_t e = indptr[j]; e < indptr[j + 1]; ++e) {
      const std::int64_t k = indices[e];
      step[e] = fabs(lr * static_cast<double>(dA[e])) * x_max;
      row_max[e] = k >= 0 && k < D ? abs_max(V + k * d, d) : 0.0;
    }
  }
  // max |x_i| (NaN entries ignored, as fmax does), written so that the loop vectorises
  template <class T>
  ST_HD static double abs_max(const T* x, int n) {
    T m = 0;
#pragma omp simd reduction(max : m)
    for (int i = 0; i < n; ++i) {
      const T a = x[i] < T(0) ? -x[i] : x[i];
      m = a > m ? a : m;
    }
    return static_cast<double>(m);
  }
};

// A row of V moves by at most the sum of the step bounds of all entries, which is at most sqrt(nnz) ||step||_2:
// out_e is 0 when row_max_e plus that stays within V's dtype (limit), inf otherwise.
struct FinishScatterBound {
  const double *row_max, *step_norm;
  double sqrt_nnz, limit;
  double* out;
  ST_HD void operator()(std::size_t e) const {
    out[e] = row_max[e] + sqrt_nnz * step_norm[0] <= limit ? 0.0 : static_cast<double>(INFINITY);
  }
};

// out_i <- keep out_i + scale x_i + offset, with (keep, scale, offset) from FinishMonitor: the new power-iteration
// probe x / ||x||, the uniform unit vector when ||x|| is 0 or not finite, or the old probe after a failed step (the
// probes are part of the state) (§8.2). One multiply-add per entry.
template <class TS>
struct UpdateProbe {
  const TS* x;
  const double* coef;  // keep, scale, offset
  TS* out;
  ST_HD void operator()(std::size_t i) const {
    out[i] = static_cast<TS>(coef[0] * out[i] + coef[1] * x[i] + coef[2]);
  }
};

// The Q update without the m x m Gram matrix (§5.10, large m): Gamma = sum_j g_j h_j^T = W A + 1 b^T + Z^T H with
// A = H^T diag(alpha) H and b = H^T beta, so Gamma^T Gamma = R + R^T + b v^T + v b^T with R = A Q A / 2 + A E +
// H^T Z Z^T H / 2 (E = sum_j (W^T z_j) h_j^T) and v = A w_bar + H^T z_sum + (D / 2) b.
// v <- u + e + (D / 2) b, in place in u.
template <class TS>
struct GammaVector {
  const TS *b, *e;
  TS* u;
  TS half_D;
  ST_HD void operator()(std::size_t i) const { u[i] = u[i] + e[i] + half_D * b[i]; }
};

// dQ_ij += lr^2 (R_ij + R_ji + b_i v_j + v_i b_j)
template <class TS>
struct AddGammaGram {
  const TS *R, *b, *v;
  TS lr2;
  TS* dQ;
  int d;
  ST_HD void operator()(int i, int j) const {
    const std::size_t ij = static_cast<std::size_t>(i) * d + j, ji = static_cast<std::size_t>(j) * d + i;
    dQ[ij] += lr2 * ((R[ij] + R[ji]) + (b[i] * v[j] + v[i] * b[j]));
  }
};

// ||Gamma||_F^2 = tr(Gamma^T Gamma) = 2 tr(R) + 2 b . v, for the weight bound. Runs once.
template <class TS>
struct GammaEnergy {
  const TS *R, *b, *v;
  int d;
  double* out;
  ST_HD void operator()(std::size_t) const {
    double acc = 0;
    for (int i = 0; i < d; ++i)
      acc += 2 * (static_cast<double>(R[static_cast<std::size_t>(i) * d + i]) + static_cast<double>(b[i]) * v[i]);
    out[0] = acc;
  }
};

// out <- scale out + add (the commit of a precomputed update).
template <class TS>
struct ScaleAdd {
  const TS* add;
  TS scale;
  TS* out;
  int d;
  ST_HD void operator()(int i, int j) const {
    const std::size_t x = static_cast<std::size_t>(i) * d + j;
    out[x] = scale * out[x] + add[x];
  }
};

// After a committed step U <- U M with the symmetric factor M = c I - lr H^T diag(alpha) H: every singular value of M
// lies in [c - lr tau, c + lr tau] with tau = sum_j |alpha_j| ||h_j||^2 >= ||H^T diag(alpha) H|| (Weyl), so
// sigma_max(U M) <= sigma_max(U) (c + lr tau) and sigma_min(U M) >= sigma_min(U) (c - lr tau). The monitored values
// in the stats widen by these factors until the next check replaces them (§8.2). hh_j = ||h_j||^2. Runs once.
template <class TS>
struct WidenMonitorBounds {
  const TS *dq, *hh;
  double lr, c;
  double* stats;
  const StepFlags* flags;
  int m;
  ST_HD void operator()(std::size_t) const {
    if (flags->error != kOk) return;  // nothing was committed
    double tau = 0;
    for (int j = 0; j < m; ++j) tau += std::fabs(2.0 * static_cast<double>(dq[j])) * static_cast<double>(hh[j]);
    const double lo = c - lr * tau;
    stats[kStatSigmaMax] *= c + lr * tau;
    stats[kStatSigmaMin] *= lo > 0 ? lo : 0.0;
  }
};

// The monitoring decision from the norms (sigma_max = |U p|, |U^-1 p'| = 1 / sigma_min, residual |U U^-1 p' - p'|),
// recorded in the stats; raises flags->needs_correction (§8.2-§8.3); and the coefficients of the two UpdateProbe
// passes. Runs once.
struct FinishMonitor {
  double* norms;  // in: sigma_max, |U^-1 p|, residual, |new p_max|, |new p_min|; out: 6 UpdateProbe coefficients
  double* stats;
  StepFlags* flags;
  StabilizeOptions opt;
  int n;
  ST_HD void operator()(std::size_t) const {
    const bool failed = flags->error != kOk;  // a failed step leaves nothing to monitor, and the probes unchanged
    for (int p = 0; p < 2; ++p) {
      const double nrm = norms[3 + p];
      const bool ok = nrm > 0 && std::isfinite(nrm);
      double* coef = norms + 5 + 3 * p;
      coef[0] = failed ? 1.0 : 0.0;
      coef[1] = failed ? 0.0 : (ok ? 1.0 / nrm : 0.0);
      coef[2] = failed || ok ? 0.0 : 1.0 / std::sqrt(static_cast<double>(n));
    }
    if (failed) return;
    const double sigma_max = norms[0], inv_norm = norms[1], residual = norms[2];
    const double sigma_min = inv_norm > 0 ? 1.0 / inv_norm : 0.0;
    stats[kStatSigmaMax] = sigma_max;
    stats[kStatSigmaMin] = sigma_min;
    stats[kStatInverseResidual] = residual;
    if (needs_correction(sigma_max, sigma_min, residual, opt)) flags->needs_correction = 1;
  }
};

}  // namespace sparsetarget::parts
