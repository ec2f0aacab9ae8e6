// The exact minibatch step of Vincent et al. (NIPS 2015; arXiv 1606.08061) with weight decay folded in.
// Notation and derivations: docs in README ("The algorithm"). Per minibatch of m rows:
//   alpha = 2 dL/dq, beta = dL/ds, z = dL/dA (sparse), c = 1 - lr wd,
//   M = c I - lr H^T diag(alpha) H, U <- U M, U^-1 <- M^-1 U^-1, omega <- M^T omega - lr H^T beta,
//   Q <- c^2 Q - lr (H^T B + B^T H) with B = c G_H - (lr/2) G H, w_bar <- c w_bar - lr H^T (g . 1),
//   V[k] <- V[k] - lr sum_j z_jk (h_j^T U_new^-1).
#include "factored_step.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>

#include "blas.h"
#include "kernels.h"

namespace sparsetarget {

using blas::Op;

template <class TV, class TS>
Projections<TS> project(const FactoredState<TV, TS>& st, const TS* H, int m) {
  const int d = st.d;
  Projections<TS> p;
  p.m = m;
  p.UH.resize(static_cast<std::size_t>(m) * d);
  p.HQ.resize(static_cast<std::size_t>(m) * d);
  p.q.resize(m);
  p.s.resize(m);
  p.Hw.resize(m);
  blas::gemm<TS>(Op::N, Op::T, m, d, d, 1, H, d, st.U, d, 0, p.UH.data(), d);
  blas::gemm<TS>(Op::N, Op::N, m, d, d, 1, H, d, st.Q, d, 0, p.HQ.data(), d);
  blas::gemv<TS>(Op::N, m, d, 1, H, d, st.w_bar, 0, p.s.data());
  blas::gemv<TS>(Op::N, m, d, 1, H, d, st.omega, 0, p.Hw.data());
  for (int j = 0; j < m; ++j) p.q[j] = dot_row(row_ptr(p.HQ.data(), j, d), row_ptr(H, j, d), d);
  return p;
}

template <class TV, class TS>
void gather_outputs(const FactoredState<TV, TS>& st, const Projections<TS>& p, const Targets& t, TS* A) {
  const int d = st.d;
  for (std::int64_t j = 0; j < t.m; ++j) {
    const TS* uh = row_ptr(p.UH.data(), j, d);
    for (std::int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e)
      A[e] = dot_row(row_ptr(static_cast<const TV*>(st.V), t.indices[e], d), uh, d) + p.Hw[j];
  }
}

namespace {

// Z Z^T for the sparse output gradients z_j: entry (i, j) = sum over target entries of rows i and j that share an
// index. Grouping entries by index costs O(nnz log nnz + sum_k n_k^2).
template <class TS>
void add_target_overlaps(const Targets& t, const TS* dA, int m, TS* G) {
  struct Entry {
    std::int64_t index;
    std::int64_t row;
    TS z;
  };
  std::vector<Entry> entries;
  entries.reserve(static_cast<std::size_t>(t.nnz()));
  for (std::int64_t j = 0; j < t.m; ++j)
    for (std::int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e)
      if (dA[e] != TS(0)) entries.push_back({t.indices[e], j, dA[e]});
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return std::tie(a.index, a.row) < std::tie(b.index, b.row); });
  for (std::size_t lo = 0; lo < entries.size();) {
    std::size_t hi = lo;
    while (hi < entries.size() && entries[hi].index == entries[lo].index) ++hi;
    for (std::size_t a = lo; a < hi; ++a)
      for (std::size_t b = lo; b < hi; ++b)
        G[entries[a].row * static_cast<std::ptrdiff_t>(m) + entries[b].row] += entries[a].z * entries[b].z;
    lo = hi;
  }
}

template <class TS>
double inf_norm(int n, const TS* a) {
  double norm = 0;
  for (int i = 0; i < n; ++i) {
    double row = 0;
    for (int j = 0; j < n; ++j) row += std::abs(static_cast<double>(a[static_cast<std::size_t>(i) * n + j]));
    norm = std::max(norm, row);
  }
  return norm;
}

template <class TS>
void require_finite(const std::vector<TS>& x, const char* what) {
  if (!all_finite(x.data(), x.size()))
    throw std::domain_error(std::string("the step produced non-finite values in ") + what +
                            " (overflow: lower lr or check the loss derivatives); the layer is unchanged");
}

}  // namespace

template <class TV, class TS>
void backward_step(FactoredState<TV, TS>& st, const TS* H, const Targets& t, const Projections<TS>& p, const TS* dA,
                   const TS* dq, const TS* ds, const StepOptions& opt, TS* grad_H) {
  const int d = st.d, m = p.m;
  const std::size_t md = static_cast<std::size_t>(m) * d, dd = static_cast<std::size_t>(d) * d;
  const TS lr = static_cast<TS>(opt.lr);
  const TS c = static_cast<TS>(1.0 - opt.lr * opt.weight_decay);
  const TS D = static_cast<TS>(st.D);
  if (!(static_cast<double>(c) > 0))
    throw std::invalid_argument("lr * weight_decay must be < 1 (got " + std::to_string(opt.lr * opt.weight_decay) + ")");

  std::vector<TS> alpha(m), z_sum(m, TS(0)), g_one(m);
  for (int j = 0; j < m; ++j) alpha[j] = 2 * dq[j];
  std::vector<TS> Zv(md, TS(0));  // row j: sum_k z_jk V[k]
  for (int j = 0; j < m; ++j) {
    TS* zv = row_ptr(Zv.data(), j, d);
    for (std::int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e) {
      z_sum[j] += dA[e];
      if (dA[e] != TS(0)) axpy_row(dA[e], row_ptr(static_cast<const TV*>(st.V), t.indices[e], d), zv, d);
    }
    g_one[j] = alpha[j] * p.s[j] + ds[j] * D + z_sum[j];
  }

  // W^T z_j = U^T (sum_k z_jk V[k]) + (sum_k z_jk) omega, as rows of WZ.
  std::vector<TS> WZ(md);
  blas::gemm<TS>(Op::N, Op::N, m, d, d, 1, Zv.data(), d, st.U, d, 0, WZ.data(), d);
  // grad_H_j = alpha_j Q h_j + beta_j w_bar + W^T z_j
  for (int j = 0; j < m; ++j) {
    TS* wz = row_ptr(WZ.data(), j, d);
    axpy_row(z_sum[j], st.omega, wz, d);
    TS* gh = row_ptr(grad_H, j, d);
    const TS* hq = row_ptr(p.HQ.data(), j, d);
#pragma omp simd
    for (int i = 0; i < d; ++i) gh[i] = alpha[j] * hq[i] + ds[j] * st.w_bar[i] + wz[i];
  }

  // Gram matrix of the output gradients g_j = alpha_j o_j + beta_j 1 + z_j, from small quantities only.
  std::vector<TS> G(static_cast<std::size_t>(m) * m), P2(static_cast<std::size_t>(m) * m);
  blas::gemm<TS>(Op::N, Op::T, m, m, d, 1, H, d, p.HQ.data(), d, 0, G.data(), m);   // o_i . o_j
  blas::gemm<TS>(Op::N, Op::T, m, m, d, 1, H, d, WZ.data(), d, 0, P2.data(), m);    // o_i . z_j
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j) {
      const std::size_t ij = static_cast<std::size_t>(i) * m + j, ji = static_cast<std::size_t>(j) * m + i;
      G[ij] = alpha[i] * alpha[j] * G[ij] + alpha[i] * ds[j] * p.s[i] + ds[i] * alpha[j] * p.s[j] +
              D * ds[i] * ds[j] + alpha[i] * P2[ij] + alpha[j] * P2[ji] + ds[i] * z_sum[j] + ds[j] * z_sum[i];
    }
  add_target_overlaps(t, dA, m, G.data());

  // alpha H, used by the U, U^-1 and omega updates.
  std::vector<TS> aH(H, H + md);
  for (int j = 0; j < m; ++j)
    for (int i = 0; i < d; ++i) aH[static_cast<std::size_t>(j) * d + i] *= alpha[j];

  // U^-1 <- M^-1 U^-1 and the conditioning check of M.
  std::vector<TS> U_inv(dd);
  double rcond = 0;
  if (m < d) {
    // Woodbury: with S = I_m - (lr/c) diag(alpha) H H^T and K = (lr/c) S^-1 diag(alpha) H,
    // M^-1 = (I + H^T K) / c, so U^-1_new = (U^-1 + H^T (K U^-1)) / c.
    std::vector<TS> S(static_cast<std::size_t>(m) * m);
    blas::gemm<TS>(Op::N, Op::T, m, m, d, -lr / c, aH.data(), d, H, d, 0, S.data(), m);
    for (int j = 0; j < m; ++j) S[static_cast<std::size_t>(j) * m + j] += 1;
    // M / c = I - H^T K' has the eigenvalues of S plus ones, so its condition is about
    // max(1, ||S||) max(1, ||S^-1||); rcond(S) alone misses an S close to 0 when m = 1.
    const double S_norm = inf_norm(m, S.data());
    rcond = blas::invert<TS>(m, S.data()) > 0 ? 1.0 / (std::max(1.0, S_norm) * std::max(1.0, inf_norm(m, S.data()))) : 0.0;
    if (rcond >= opt.min_rcond) {
      std::vector<TS> K(md), KU(md);
      blas::gemm<TS>(Op::N, Op::N, m, d, m, lr / c, S.data(), m, aH.data(), d, 0, K.data(), d);
      blas::gemm<TS>(Op::N, Op::N, m, d, d, 1, K.data(), d, st.U_inv, d, 0, KU.data(), d);
      std::copy(st.U_inv, st.U_inv + dd, U_inv.begin());
      blas::gemm<TS>(Op::T, Op::N, d, d, m, 1 / c, H, d, KU.data(), d, 1 / c, U_inv.data(), d);
    }
  } else {
    std::vector<TS> M(dd, TS(0));
    for (int i = 0; i < d; ++i) M[static_cast<std::size_t>(i) * d + i] = c;
    blas::gemm<TS>(Op::T, Op::N, d, d, m, -lr, H, d, aH.data(), d, 1, M.data(), d);
    rcond = blas::invert<TS>(d, M.data());
    if (rcond >= opt.min_rcond)
      blas::gemm<TS>(Op::N, Op::N, d, d, d, 1, M.data(), d, st.U_inv, d, 0, U_inv.data(), d);
  }
  if (!(rcond >= opt.min_rcond)) {
    char msg[256];
    std::snprintf(msg, sizeof msg,
                  "the update factor M = (1 - lr*weight_decay) I - lr H^T diag(2 dL/dq) H is singular or nearly so "
                  "(reciprocal condition %.3g < min_rcond %.3g): lower lr; the layer is unchanged",
                  rcond, opt.min_rcond);
    throw SingularUpdateError(msg);
  }

  // U <- c U - lr (U H^T) diag(alpha) H
  std::vector<TS> U(st.U, st.U + dd);
  blas::gemm<TS>(Op::T, Op::N, d, d, m, -lr, p.UH.data(), d, aH.data(), d, c, U.data(), d);
  // omega <- c omega - lr H^T (alpha * (H omega) + beta);  w_bar <- c w_bar - lr H^T (g . 1)
  std::vector<TS> v(m), omega(st.omega, st.omega + d), w_bar(st.w_bar, st.w_bar + d);
  for (int j = 0; j < m; ++j) v[j] = alpha[j] * p.Hw[j] + ds[j];
  blas::gemv<TS>(Op::T, m, d, -lr, H, d, v.data(), c, omega.data());
  blas::gemv<TS>(Op::T, m, d, -lr, H, d, g_one.data(), c, w_bar.data());
  // Q <- c^2 Q - lr (H^T B + B^T H), B = c G_H - (lr/2) G H
  std::vector<TS> B(md), Q(st.Q, st.Q + dd);
  blas::gemm<TS>(Op::N, Op::N, m, d, m, -lr / 2, G.data(), m, H, d, 0, B.data(), d);
  for (std::size_t i = 0; i < md; ++i) B[i] += c * grad_H[i];
  blas::syr2k_t<TS>(d, m, -lr, H, d, B.data(), d, c * c, Q.data(), d);
  blas::mirror_upper<TS>(d, Q.data(), d);
  // X = H U_new^-1: row j is what V's target rows of example j move along.
  std::vector<TS> X(md);
  blas::gemm<TS>(Op::N, Op::N, m, d, d, 1, H, d, U_inv.data(), d, 0, X.data(), d);

  require_finite(U, "U");
  require_finite(U_inv, "U^-1");
  require_finite(Q, "Q");
  require_finite(omega, "omega");
  require_finite(w_bar, "w_bar");
  require_finite(X, "the V update");
  if (!all_finite(grad_H, md)) throw std::domain_error("grad_H is not finite; the layer is unchanged");

  // Commit: nothing below can fail.
  std::copy(U.begin(), U.end(), st.U);
  std::copy(U_inv.begin(), U_inv.end(), st.U_inv);
  std::copy(Q.begin(), Q.end(), st.Q);
  std::copy(omega.begin(), omega.end(), st.omega);
  std::copy(w_bar.begin(), w_bar.end(), st.w_bar);
  for (int j = 0; j < m; ++j) {
    const TS* x = row_ptr(X.data(), j, d);
    for (std::int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e)
      if (dA[e] != TS(0)) axpy_row(-lr * dA[e], x, row_ptr(st.V, t.indices[e], d), d);
  }
  st.stats[kStatSteps] += 1;
}

#define ST_INSTANTIATE(TV, TS)                                                                                     \
  template Projections<TS> project<TV, TS>(const FactoredState<TV, TS>&, const TS*, int);                          \
  template void gather_outputs<TV, TS>(const FactoredState<TV, TS>&, const Projections<TS>&, const Targets&, TS*); \
  template void backward_step<TV, TS>(FactoredState<TV, TS>&, const TS*, const Targets&, const Projections<TS>&,  \
                                      const TS*, const TS*, const TS*, const StepOptions&, TS*);
ST_INSTANTIATE(float, float)
ST_INSTANTIATE(float, double)
ST_INSTANTIATE(double, float)
ST_INSTANTIATE(double, double)
#undef ST_INSTANTIATE

}  // namespace sparsetarget
