// The elementwise parts of the step and of the monitoring, each written once as a functor that a backend runs
// over an index range (loops on the CPU, kernels on a GPU). Formulas: docs/algorithm.md §4-§5 and §8.
#pragma once

#include <cmath>
#include <cstddef>

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

// G_ij = g_i . g_j from o_i . o_j (in G) and o_i . W^T z_j (in P2); the sparse overlaps z_i . z_j come after (§5.3).
template <class TS>
struct Gram {
  const TS *dq, *ds, *s, *z_sum, *P2;
  TS* G;
  TS D;
  int m;
  ST_HD void operator()(int i, int j) const {
    const std::size_t ij = static_cast<std::size_t>(i) * m + j, ji = static_cast<std::size_t>(j) * m + i;
    const TS ai = 2 * dq[i], aj = 2 * dq[j];
    G[ij] = ai * aj * G[ij] + ai * ds[j] * s[i] + ds[i] * aj * s[j] + D * ds[i] * ds[j] + ai * P2[ij] + aj * P2[ji] +
            ds[i] * z_sum[j] + ds[j] * z_sum[i];
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

// S = I_m - (lr / c) diag(alpha) H H^T, the m x m system of the Woodbury branch (§5.5).
template <class TS>
struct WoodburySystem {
  const TS *dq, *HHt;
  TS* S;
  TS lr_over_c;
  int m;
  ST_HD void operator()(int i, int j) const {
    const std::size_t x = static_cast<std::size_t>(i) * m + j;
    S[x] = (i == j ? TS(1) : TS(0)) - lr_over_c * (2 * dq[i]) * HHt[x];
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

// x_i <- x_i / norm, or the uniform unit vector when the norm is 0 or not finite (§8.2: power-iteration probes).
template <class TS>
struct ScaleToUnit {
  const TS* x;
  const double* norm;
  TS* out;
  int n;
  const StepFlags* flags;  // nothing moves after a failed step: the probes are part of the state
  ST_HD void operator()(std::size_t i) const {
    if (flags->error != kOk) return;
    const double nrm = *norm;
    out[i] = static_cast<TS>(nrm > 0 && std::isfinite(nrm) ? x[i] / nrm : 1.0 / std::sqrt(static_cast<double>(n)));
  }
};

// The monitoring decision from the norms (sigma_max = |U p|, |U^-1 p'| = 1 / sigma_min, residual |U U^-1 p' - p'|),
// recorded in the stats; raises flags->needs_correction (§8.2-§8.3). Runs once.
struct FinishMonitor {
  const double* norms;  // sigma_max, |U^-1 p|, residual
  double* stats;
  StepFlags* flags;
  StabilizeOptions opt;
  ST_HD void operator()(std::size_t) const {
    if (flags->error != kOk) return;  // a failed step leaves nothing to monitor
    const double sigma_max = norms[0], inv_norm = norms[1], residual = norms[2];
    const double sigma_min = inv_norm > 0 ? 1.0 / inv_norm : 0.0;
    stats[kStatSigmaMax] = sigma_max;
    stats[kStatSigmaMin] = sigma_min;
    stats[kStatInverseResidual] = residual;
    if (needs_correction(sigma_max, sigma_min, residual, opt)) flags->needs_correction = 1;
  }
};

}  // namespace sparsetarget::parts
