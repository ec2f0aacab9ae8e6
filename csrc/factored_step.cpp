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
const Projections<TS>& project(const FactoredState<TV, TS>& st, const TS* H, int m) {
  thread_local Projections<TS> scratch;
  Projections<TS>& p = scratch;
  const int d = st.d;
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
void gather_outputs(const FactoredState<TV, TS>& st, const ProjectionsView<TS>& p, const Targets& t, TS* A) {
  const int d = st.d;
  for (std::int64_t j = 0; j < t.m; ++j) {
    const TS* uh = row_ptr(p.UH, j, d);
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


namespace {
// Scratch of one step, kept per thread and reused: fresh d x d allocations every step would cost page faults
// comparable to the arithmetic of a single-example step.
template <class TS>
struct StepScratch {
  std::vector<TS> alpha, z_sum, g_one, Zv, WZ, G, P2, aH, U_inv, S, K, KU, M, v, omega, w_bar, B, X;
};

template <class TS>
std::vector<TS>& sized(std::vector<TS>& buf, std::size_t n) {
  buf.resize(n);
  return buf;
}
template <class TS>
std::vector<TS>& filled(std::vector<TS>& buf, std::size_t n, TS value) {
  buf.assign(n, value);
  return buf;
}
template <class TS>
std::vector<TS>& copied(std::vector<TS>& buf, const TS* src, std::size_t n) {
  buf.assign(src, src + n);
  return buf;
}

// grad_H, leaving alpha = 2 dq, z_sum_j = sum_k z_jk and WZ (row j = W^T z_j) in the scratch for the step.
template <class TV, class TS>
void hidden_gradient_into(const FactoredState<TV, TS>& st, const Targets& t, const ProjectionsView<TS>& p,
                          const TS* dA, const TS* dq, const TS* ds, TS* grad_H, StepScratch<TS>& w) {
  const int d = st.d, m = p.m;
  const std::size_t md = static_cast<std::size_t>(m) * d;
  auto& alpha = sized(w.alpha, m);
  auto& z_sum = filled(w.z_sum, m, TS(0));
  for (int j = 0; j < m; ++j) alpha[j] = 2 * dq[j];
  auto& Zv = filled(w.Zv, md, TS(0));  // row j: sum_k z_jk V[k]
  for (int j = 0; j < m; ++j) {
    TS* zv = row_ptr(Zv.data(), j, d);
    for (std::int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e) {
      z_sum[j] += dA[e];
      if (dA[e] != TS(0)) axpy_row(dA[e], row_ptr(static_cast<const TV*>(st.V), t.indices[e], d), zv, d);
    }
  }
  // W^T z_j = U^T (sum_k z_jk V[k]) + (sum_k z_jk) omega, as rows of WZ.
  auto& WZ = sized(w.WZ, md);
  blas::gemm<TS>(Op::N, Op::N, m, d, d, 1, Zv.data(), d, st.U, d, 0, WZ.data(), d);
  for (int j = 0; j < m; ++j) {
    TS* wz = row_ptr(WZ.data(), j, d);
    axpy_row(z_sum[j], st.omega, wz, d);
    TS* gh = row_ptr(grad_H, j, d);
    const TS* hq = row_ptr(p.HQ, j, d);
#pragma omp simd
    for (int i = 0; i < d; ++i) gh[i] = alpha[j] * hq[i] + ds[j] * st.w_bar[i] + wz[i];
  }
}

// The same scratch from a grad_H that hidden_gradient already computed for this minibatch and these weights:
// W^T z_j = grad_h_j - alpha_j Q h_j - beta_j w_bar, O(m d + nnz) instead of a pass over V's rows and a GEMM.
template <class TV, class TS>
void gradient_parts_from_known(const FactoredState<TV, TS>& st, const Targets& t, const ProjectionsView<TS>& p,
                               const TS* dA, const TS* dq, const TS* ds, const TS* grad_H, StepScratch<TS>& w) {
  const int d = st.d, m = p.m;
  auto& alpha = sized(w.alpha, m);
  auto& z_sum = filled(w.z_sum, m, TS(0));
  auto& WZ = sized(w.WZ, static_cast<std::size_t>(m) * d);
  for (int j = 0; j < m; ++j) {
    alpha[j] = 2 * dq[j];
    for (std::int64_t e = t.indptr[j]; e < t.indptr[j + 1]; ++e) z_sum[j] += dA[e];
    TS* wz = row_ptr(WZ.data(), j, d);
    const TS* gh = row_ptr(grad_H, j, d);
    const TS* hq = row_ptr(p.HQ, j, d);
#pragma omp simd
    for (int i = 0; i < d; ++i) wz[i] = gh[i] - alpha[j] * hq[i] - ds[j] * st.w_bar[i];
  }
}

}  // namespace

template <class TV, class TS>
void hidden_gradient(const FactoredState<TV, TS>& st, const Targets& t, const ProjectionsView<TS>& p, const TS* dA,
                     const TS* dq, const TS* ds, TS* grad_H) {
  thread_local StepScratch<TS> scratch;
  hidden_gradient_into(st, t, p, dA, dq, ds, grad_H, scratch);
}

template <class TV, class TS>
void backward_step(FactoredState<TV, TS>& st, const TS* H, const Targets& t, const ProjectionsView<TS>& p, const TS* dA,
                   const TS* dq, const TS* ds, const StepOptions& opt, TS* grad_H, bool grad_H_known) {
  thread_local StepScratch<TS> scratch;
  StepScratch<TS>& w = scratch;
  const int d = st.d, m = p.m;
  const std::size_t md = static_cast<std::size_t>(m) * d, dd = static_cast<std::size_t>(d) * d;
  const TS lr = static_cast<TS>(opt.lr);
  const TS c = static_cast<TS>(1.0 - opt.lr * opt.weight_decay);
  const TS D = static_cast<TS>(st.D);
  if (!(static_cast<double>(c) > 0))
    throw std::invalid_argument("lr * weight_decay must be < 1 (got " + std::to_string(opt.lr * opt.weight_decay) + ")");

  if (grad_H_known)
    gradient_parts_from_known(st, t, p, dA, dq, ds, grad_H, w);
  else
    hidden_gradient_into(st, t, p, dA, dq, ds, grad_H, w);
  const auto& alpha = w.alpha;
  const auto& z_sum = w.z_sum;
  const auto& WZ = w.WZ;
  auto& g_one = sized(w.g_one, m);
  for (int j = 0; j < m; ++j) g_one[j] = alpha[j] * p.s[j] + ds[j] * D + z_sum[j];

  // Gram matrix of the output gradients g_j = alpha_j o_j + beta_j 1 + z_j, from small quantities only.
  auto& G = sized(w.G, static_cast<std::size_t>(m) * m);
  auto& P2 = sized(w.P2, static_cast<std::size_t>(m) * m);
  blas::gemm<TS>(Op::N, Op::T, m, m, d, 1, H, d, p.HQ, d, 0, G.data(), m);   // o_i . o_j
  blas::gemm<TS>(Op::N, Op::T, m, m, d, 1, H, d, WZ.data(), d, 0, P2.data(), m);    // o_i . z_j
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j) {
      const std::size_t ij = static_cast<std::size_t>(i) * m + j, ji = static_cast<std::size_t>(j) * m + i;
      G[ij] = alpha[i] * alpha[j] * G[ij] + alpha[i] * ds[j] * p.s[i] + ds[i] * alpha[j] * p.s[j] +
              D * ds[i] * ds[j] + alpha[i] * P2[ij] + alpha[j] * P2[ji] + ds[i] * z_sum[j] + ds[j] * z_sum[i];
    }
  add_target_overlaps(t, dA, m, G.data());

  // alpha H, used by the U, U^-1 and omega updates.
  auto& aH = copied(w.aH, H, md);
  for (int j = 0; j < m; ++j)
    for (int i = 0; i < d; ++i) aH[static_cast<std::size_t>(j) * d + i] *= alpha[j];

  // U^-1 <- M^-1 U^-1 and the conditioning check of M.
  // The explicit branch computes the new U^-1 into U_inv; Woodbury keeps only the m x d factor K U^-1 (in KHU).
  auto& U_inv = w.U_inv;
  bool inverse_is_delta = false;
  double rcond = 0;
  auto& X = sized(w.X, md);  // X = H U_new^-1: row j is what V's target rows of example j move along
  if (m < d) {
    // Woodbury: with S = I_m - (lr/c) diag(alpha) H H^T and K = (lr/c) S^-1 diag(alpha) H,
    // M^-1 = (I + H^T K) / c, so U^-1_new = (U^-1 + H^T (K U^-1)) / c and X = (H U^-1 + (H H^T)(K U^-1)) / c.
    auto& HHt = sized(w.P2, static_cast<std::size_t>(m) * m);  // P2 is free again
    blas::gemm<TS>(Op::N, Op::T, m, m, d, 1, H, d, H, d, 0, HHt.data(), m);
    auto& S = sized(w.S, static_cast<std::size_t>(m) * m);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j)
        S[static_cast<std::size_t>(i) * m + j] = (i == j ? TS(1) : TS(0)) - lr / c * alpha[i] * HHt[static_cast<std::size_t>(i) * m + j];
    // M / c = I - H^T K' has the eigenvalues of S plus ones, so its condition is about
    // max(1, ||S||) max(1, ||S^-1||); rcond(S) alone misses an S close to 0 when m = 1.
    const double S_norm = inf_norm(m, S.data());
    rcond = blas::invert<TS>(m, S.data()) > 0 ? 1.0 / (std::max(1.0, S_norm) * std::max(1.0, inf_norm(m, S.data()))) : 0.0;
    if (rcond >= opt.min_rcond) {
      // [K; H] U^-1 in one GEMM: rows 0..m-1 give K U^-1, rows m..2m-1 give H U^-1.
      auto& KH = sized(w.K, 2 * md);
      auto& KHU = sized(w.KU, 2 * md);
      blas::gemm<TS>(Op::N, Op::N, m, d, m, lr / c, S.data(), m, aH.data(), d, 0, KH.data(), d);
      std::copy(H, H + md, KH.begin() + static_cast<std::ptrdiff_t>(md));
      blas::gemm<TS>(Op::N, Op::N, 2 * m, d, d, 1, KH.data(), d, st.U_inv, d, 0, KHU.data(), d);
      inverse_is_delta = true;  // U^-1 <- (U^-1 + H^T (K U^-1)) / c is applied at commit from KHU
      std::copy(KHU.begin() + static_cast<std::ptrdiff_t>(md), KHU.end(), X.begin());
      blas::gemm<TS>(Op::N, Op::N, m, d, m, 1, HHt.data(), m, KHU.data(), d, 1, X.data(), d);
      for (auto& x : X) x /= c;
    }
  } else {
    U_inv.resize(dd);
    auto& M = filled(w.M, dd, TS(0));
    for (int i = 0; i < d; ++i) M[static_cast<std::size_t>(i) * d + i] = c;
    blas::gemm<TS>(Op::T, Op::N, d, d, m, -lr, H, d, aH.data(), d, 1, M.data(), d);
    rcond = blas::invert<TS>(d, M.data());
    if (rcond >= opt.min_rcond) {
      blas::gemm<TS>(Op::N, Op::N, d, d, d, 1, M.data(), d, st.U_inv, d, 0, U_inv.data(), d);
      blas::gemm<TS>(Op::N, Op::N, m, d, d, 1, H, d, U_inv.data(), d, 0, X.data(), d);
    }
  }
  if (!(rcond >= opt.min_rcond)) {
    char msg[256];
    std::snprintf(msg, sizeof msg,
                  "the update factor M = (1 - lr*weight_decay) I - lr H^T diag(2 dL/dq) H is singular or nearly so "
                  "(reciprocal condition %.3g < min_rcond %.3g): lower lr; the layer is unchanged",
                  rcond, opt.min_rcond);
    throw SingularUpdateError(msg);
  }

  // omega <- c omega - lr H^T (alpha * (H omega) + beta);  w_bar <- c w_bar - lr H^T (g . 1)
  auto& v = sized(w.v, m);
  auto& omega = copied(w.omega, st.omega, d);
  auto& w_bar = copied(w.w_bar, st.w_bar, d);
  for (int j = 0; j < m; ++j) v[j] = alpha[j] * p.Hw[j] + ds[j];
  blas::gemv<TS>(Op::T, m, d, -lr, H, d, v.data(), c, omega.data());
  blas::gemv<TS>(Op::T, m, d, -lr, H, d, g_one.data(), c, w_bar.data());
  // Q <- c^2 Q - lr (H^T B + B^T H), B = c G_H - (lr/2) G H
  auto& B = sized(w.B, md);
  blas::gemm<TS>(Op::N, Op::N, m, d, m, -lr / 2, G.data(), m, H, d, 0, B.data(), d);
  for (std::size_t i = 0; i < md; ++i) B[i] += c * grad_H[i];

  // The d x d updates are products of these m x d factors, checked here so that the in-place commit below
  // cannot meet a NaN or inf.
  if (!all_finite(p.UH, md)) throw std::domain_error("the step produced non-finite values in U; the layer is unchanged");
  require_finite(aH, "U");
  require_finite(B, "Q");
  require_finite(inverse_is_delta ? w.KU : U_inv, "U^-1");
  require_finite(omega, "omega");
  require_finite(w_bar, "w_bar");
  require_finite(X, "the V update");
  if (!all_finite(grad_H, md)) throw std::domain_error("grad_H is not finite; the layer is unchanged");

  // Commit, in place: nothing below can fail.
  blas::gemm<TS>(Op::T, Op::N, d, d, m, -lr, p.UH, d, aH.data(), d, c, st.U, d);  // U <- c U - lr U H^T aH
  blas::syr2k_t<TS>(d, m, -lr, H, d, B.data(), d, c * c, st.Q, d);  // Q <- c^2 Q - lr (H^T B + B^T H)
  blas::mirror_upper<TS>(d, st.Q, d);
  if (inverse_is_delta)
    blas::gemm<TS>(Op::T, Op::N, d, d, m, 1 / c, H, d, w.KU.data(), d, 1 / c, st.U_inv, d);
  else
    std::copy(U_inv.begin(), U_inv.end(), st.U_inv);
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
  template const Projections<TS>& project<TV, TS>(const FactoredState<TV, TS>&, const TS*, int);                          \
  template void gather_outputs<TV, TS>(const FactoredState<TV, TS>&, const ProjectionsView<TS>&, const Targets&, \
                                       TS*);                                                                     \
  template void hidden_gradient<TV, TS>(const FactoredState<TV, TS>&, const Targets&, const ProjectionsView<TS>&, \
                                        const TS*, const TS*, const TS*, TS*);                                   \
  template void backward_step<TV, TS>(FactoredState<TV, TS>&, const TS*, const Targets&, const ProjectionsView<TS>&, \
                                      const TS*, const TS*, const TS*, const StepOptions&, TS*, bool);
ST_INSTANTIATE(float, float)
ST_INSTANTIATE(float, double)
ST_INSTANTIATE(double, float)
ST_INSTANTIATE(double, double)
#undef ST_INSTANTIATE

}  // namespace sparsetarget
