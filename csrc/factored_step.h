// Forward and exact SGD step of the factored layer, O(m d^2 + m^2 d + nnz d) per minibatch, never O(D d), written
// once over the backend primitives (backend.h) and instantiated for the CPU (cpu/factored_step_cpu.cpp) and CUDA
// (cuda/factored_step_cuda.cu). Derivations: docs/algorithm.md §3-§5. Per minibatch of m rows, with
// alpha = 2 dL/dq, beta = dL/ds, z = dL/dA (sparse) and c = 1 - lr wd:
//   M = c I - lr H^T diag(alpha) H, U <- U M, U^-1 <- M^-1 U^-1, omega <- M^T omega - lr H^T beta,
//   Q <- c^2 Q - lr (H^T B + B^T H) with B = c G_H - (lr/2) G H, w_bar <- c w_bar - lr H^T (g . 1),
//   V[k] <- V[k] - lr sum_j z_jk (h_j^T U_new^-1).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "backend.h"
#include "state.h"
#include "step_parts.h"

namespace sparsetarget {

// Raised when the step's factor M = (1 - lr wd) I - lr H^T diag(alpha) H is singular or nearly so: applying it
// would make U (numerically) singular. The state is left untouched.
struct SingularUpdateError : std::domain_error {
  using std::domain_error::domain_error;
};

// Products of a minibatch H (m x d, row-major, state dtype) with the small state, row j from h_j alone: the
// projections of several minibatches stacked are the projections of the stacked minibatch.
template <class TS>
struct ProjectionsView {
  int m = 0;
  const TS* UH = nullptr;  // m x d, row j = (U h_j)^T
  const TS* HQ = nullptr;  // m x d, row j = (Q h_j)^T
  const TS* q = nullptr;   // m, ||o_j||^2 = h_j^T Q h_j
  const TS* s = nullptr;   // m, sum(o_j) = w_bar . h_j
  const TS* Hw = nullptr;  // m, omega . h_j
};

// The default floor on the reciprocal condition of the step's factor: sqrt of the state dtype's machine epsilon
// (a factor that would cost more than half the digits is refused).
template <class TS>
constexpr double default_min_rcond() {
  return std::is_same_v<TS, float> ? 3.4526698300124393e-04 : 1.4901161193847656e-08;
}

struct StepOptions {
  double lr = 0;
  double weight_decay = 0;
  double min_rcond = 0;  // refuse the step when rcond(M) (Woodbury: of the m x m system, §5.7) is below this
};

// lr and weight_decay finite and >= 0 with lr * weight_decay < 1 (so that c = 1 - lr wd > 0, §5.12); throws
// std::invalid_argument naming the argument.
inline void check_step_options(double lr, double weight_decay) {
  if (!std::isfinite(lr) || lr < 0)
    throw std::invalid_argument("lr must be finite and >= 0, got " + std::to_string(lr));
  if (!std::isfinite(weight_decay) || weight_decay < 0)
    throw std::invalid_argument("weight_decay must be finite and >= 0, got " + std::to_string(weight_decay));
  if (!(lr * weight_decay < 1))
    throw std::invalid_argument("lr * weight_decay must be < 1, got " + std::to_string(lr * weight_decay));
}

// UH = H U^T, HQ = H Q, q_j = h_j^T Q h_j, s = H w_bar, Hw = H omega (§3).
template <class B, class TV, class TS>
void project(B& b, const FactoredState<TV, TS>& st, const TS* H, int m, TS* UH, TS* HQ, TS* q, TS* s, TS* Hw) {
  const int d = st.d;
  // Q first, U last: a step's commit ends with Q, and the hidden gradient reads U next; a d x d matrix read right
  // after it was last touched is still partly in cache (the order matters at small m, where these are memory bound).
  b.gemm(Op::N, Op::N, m, d, d, TS(1), H, d, st.Q, d, TS(0), HQ, d);
  b.gemm(Op::N, Op::T, m, d, d, TS(1), H, d, st.U, d, TS(0), UH, d);
  b.gemv(Op::N, m, d, TS(1), H, d, st.w_bar, TS(0), s);
  b.gemv(Op::N, m, d, TS(1), H, d, st.omega, TS(0), Hw);
  b.row_dots(HQ, H, m, d, q);
}

// A[e] = o_{k_e} = V[k_e] . (U h_j) + omega . h_j for target entry e of row j (§3).
template <class B, class TV, class TS>
void gather_outputs(B& b, const FactoredState<TV, TS>& st, const ProjectionsView<TS>& p, const Targets& t, TS* A) {
  b.gather_outputs(st.V, st.D, st.d, p.UH, p.Hw, t, A);
}

namespace detail {

// grad_H, leaving z_sum_j = sum_k z_jk and WZ (row j = W^T z_j) in the backend's scratch for the step (§4).
template <class B, class TV, class TS>
void hidden_gradient_parts(B& b, const FactoredState<TV, TS>& st, const Targets& t, const ProjectionsView<TS>& p,
                           const TS* dA, const TS* dq, const TS* ds, TS* grad_H, TS* z_sum, TS* WZ) {
  const int d = st.d, m = p.m;
  TS* Zv = b.template scratch<TS>(kSlotZv, static_cast<std::size_t>(m) * d);  // row j: sum_k z_jk V[k]
  b.combine_target_rows(st.V, st.D, d, t, dA, Zv, z_sum);
  // W^T z_j = U^T (sum_k z_jk V[k]) + (sum_k z_jk) omega, as rows of WZ
  b.gemm(Op::N, Op::N, m, d, d, TS(1), Zv, d, st.U, d, TS(0), WZ, d);
  b.for_rows(m, d, parts::GradRow<TS>{dq, ds, p.HQ, st.w_bar, st.omega, z_sum, WZ, grad_H, d});
}

// The Q update dQ (Q_new = c^2 Q + dQ) for large m, from d x d pieces: -lr c (H^T G_H + G_H^T H) + lr^2 Gamma^T Gamma
// (see parts::GammaVector). O(m d^2 + d^3 + nnz d), memory O(m d + d^2): no m x m matrix. Writes ||Gamma||_F^2 into
// *energy. §5.10.
template <class B, class TV, class TS, class Order>
void q_update_without_gram(B& b, const FactoredState<TV, TS>& st, const TS* H, int m, const Targets& t, const TS* dA,
                           const Order& order, const TS* grad_H, const TS* aH, const TS* WZ, const TS* z_sum,
                           const TS* ds, TS lr, TS c, TS D, TS* dQ, double* energy) {
  const int d = st.d;
  const std::size_t dd = static_cast<std::size_t>(d) * d, md = static_cast<std::size_t>(m) * d;
  TS* A = b.template scratch<TS>(kSlotGfA, dd);
  TS* E = b.template scratch<TS>(kSlotGfE, dd);
  TS* T = b.template scratch<TS>(kSlotGfT, md);
  TS* F = b.template scratch<TS>(kSlotGfF, dd);
  TS* R = b.template scratch<TS>(kSlotGfR, dd);
  TS* vec = b.template scratch<TS>(kSlotGfVec, 3 * static_cast<std::size_t>(d));
  TS *bv = vec, *v = vec + d, *e = vec + 2 * d;
  b.gemm(Op::T, Op::N, d, d, m, TS(1), H, d, aH, d, TS(0), A, d);    // A = H^T diag(alpha) H
  b.gemm(Op::T, Op::N, d, d, m, TS(1), WZ, d, H, d, TS(0), E, d);    // E = sum_j (W^T z_j) h_j^T
  b.target_overlaps_times(t, st.D, dA, order, H, d, T);              // T = Z Z^T H
  b.gemm(Op::N, Op::N, d, d, d, TS(1), A, d, st.Q, d, TS(0), F, d);  // F = A Q
  b.gemm(Op::N, Op::N, d, d, d, TS(0.5), F, d, A, d, TS(0), R, d);   // R = A Q A / 2
  b.gemm(Op::N, Op::N, d, d, d, TS(1), A, d, E, d, TS(1), R, d);     //   + A E
  b.gemm(Op::T, Op::N, d, d, m, TS(0.5), H, d, T, d, TS(1), R, d);   //   + H^T Z Z^T H / 2
  b.gemv(Op::T, m, d, TS(1), H, d, ds, TS(0), bv);                   // b = H^T beta
  b.gemv(Op::T, m, d, TS(1), H, d, z_sum, TS(0), e);                 // e = H^T z_sum
  b.gemv(Op::N, d, d, TS(1), A, d, st.w_bar, TS(0), v);              // v = A w_bar ...
  b.for_each(static_cast<std::size_t>(d), parts::GammaVector<TS>{bv, e, v, D / 2});  // ... + e + (D / 2) b
  b.sym_rank2k(d, m, -lr * c, H, d, grad_H, d, TS(0), dQ, d);        // -lr c (H^T G_H + G_H^T H)
  b.for_rows(d, d, parts::AddGammaGram<TS>{R, bv, v, lr * lr, dQ, d});
  b.mirror_upper(d, dQ, d);  // exactly symmetric on every backend
  b.for_each(1, parts::GammaEnergy<TS>{R, bv, v, d, energy});
}

}  // namespace detail

// Above this many rows per hidden unit, the Q update is formed from d x d pieces instead of the m x m Gram matrix
// of the output gradients: 4 m^2 d flops (the Gram product and B) and m^2 memory against 8 m d^2 + 6 d^3 (equal at
// m = 2.6 d); from 2d the m x m buffers are what counts (data-parallel ranks applying their combined batch).
constexpr int kGramFreeRowsPerUnit = 2;

// grad_H = dL/dH (m x d) for a loss with per-example partials dA (per target entry), dq and ds, at the current
// weights: grad_h_j = 2 dq_j Q h_j + ds_j w_bar + W^T z_j. No state change.
template <class B, class TV, class TS>
void hidden_gradient(B& b, const FactoredState<TV, TS>& st, const Targets& t, const ProjectionsView<TS>& p,
                     const TS* dA, const TS* dq, const TS* ds, TS* grad_H) {
  const std::size_t md = static_cast<std::size_t>(p.m) * st.d;
  detail::hidden_gradient_parts(b, st, t, p, dA, dq, ds, grad_H, b.template scratch<TS>(kSlotZSum, p.m),
                                b.template scratch<TS>(kSlotWZ, md));
}

// One exact SGD step W <- (1 - lr wd) W - lr dL/dW for a loss with per-example partials dA (per target entry), dq
// and ds evaluated at the current weights (§5; order and commit: §5.13). Writes grad_H = dL/dH (m x d) at the
// weights before the step; with grad_H_known, grad_H already holds it (from hidden_gradient on the same minibatch
// and weights) and is only read.
// All-or-nothing: every check runs before the first write to the state (CPU), or the commit is skipped on the device
// when one failed (CUDA).
template <class B, class TV, class TS>
void backward_step(B& b, FactoredState<TV, TS>& st, const TS* H, const Targets& t, const ProjectionsView<TS>& p,
                   const TS* dA, const TS* dq, const TS* ds, const StepOptions& opt, TS* grad_H,
                   bool grad_H_known = false) {
  const int d = st.d, m = p.m;
  const std::size_t md = static_cast<std::size_t>(m) * d, dd = static_cast<std::size_t>(d) * d,
                    mm = static_cast<std::size_t>(m) * m;
  check_step_options(opt.lr, opt.weight_decay);
  constexpr double kStateLimit = std::is_same_v<TS, float> ? 3.4028234663852886e38 : 1.7976931348623157e308;
  constexpr double kWeightLimit = std::is_same_v<TV, float> ? 3.4028234663852886e38 : 1.7976931348623157e308;
  if (!(opt.lr <= kStateLimit) || !(static_cast<TS>(1.0 - opt.lr * opt.weight_decay) > 0))
  {
    char msg[160];
    std::snprintf(msg, sizeof msg, "lr = %.6g (with weight_decay %.6g) is out of the state dtype's range: lower lr",
                  opt.lr, opt.weight_decay);
    throw std::invalid_argument(msg);
  }
  const TS lr = static_cast<TS>(opt.lr);
  const TS c = static_cast<TS>(1.0 - opt.lr * opt.weight_decay);
  const TS D = static_cast<TS>(st.D);

  // Inputs the caller could not check without reading device memory.
  b.require_finite_input(H, md, "H");
  b.require_finite_input(dA, static_cast<std::size_t>(t.nnz), "dA");
  b.require_finite_input(dq, static_cast<std::size_t>(m), "dq");
  b.require_finite_input(ds, static_cast<std::size_t>(m), "ds");

  TS* z_sum = b.template scratch<TS>(kSlotZSum, m);
  TS* WZ = b.template scratch<TS>(kSlotWZ, md);
  if (grad_H_known) {
    b.require_finite_input(grad_H, md, "grad_H");
    b.target_row_sums(t, st.D, dA, z_sum);
    b.for_rows(m, d, parts::WZFromKnown<TS>{dq, ds, p.HQ, st.w_bar, grad_H, WZ, d});
  } else {
    detail::hidden_gradient_parts(b, st, t, p, dA, dq, ds, grad_H, z_sum, WZ);
  }
  TS* g_one = b.template scratch<TS>(kSlotGOne, m);
  TS* v = b.template scratch<TS>(kSlotV, m);
  b.for_each(static_cast<std::size_t>(m), parts::RowScalars<TS>{dq, ds, p.s, p.Hw, z_sum, g_one, v, D});

  // Gram matrix of the output gradients g_j = alpha_j o_j + beta_j 1 + z_j, from small quantities only (§5.3);
  // for large m the Q update is formed without it (q_update_without_gram).
  const bool gram_free = static_cast<std::int64_t>(m) >= static_cast<std::int64_t>(kGramFreeRowsPerUnit) * d;
  const auto order = b.order_targets(t, st.D);
  TS* G = gram_free ? nullptr : b.template scratch<TS>(kSlotG, mm);
  TS* GA = gram_free ? nullptr : b.template scratch<TS>(kSlotGramA, mm);
  TS* R = gram_free ? nullptr : b.template scratch<TS>(kSlotGramR, md);
  TS* aH = b.template scratch<TS>(kSlotAH, md);  // alpha H: the Gram product, the U and U^-1 updates (and Gram-free Q)
  b.for_rows(m, d, parts::ScaleRows<TS>{dq, H, aH, d});
  const auto form_gram = [&] {  // independent of the factor's inverse below (takes no scratch of its own)
    if (gram_free) return;
    b.for_rows(m, d, parts::GramRow<TS>{dq, p.HQ, WZ, R, d});
    b.gemm(Op::N, Op::T, m, m, d, TS(1), aH, d, R, d, TS(0), GA, m);  // its transpose added holds the o . o, o . z
    b.for_rows(m, m, parts::Gram<TS>{dq, ds, p.s, z_sum, GA, G, D, m});
    b.add_target_overlaps(t, st.D, dA, order, G);
  };

  // omega <- c omega - lr H^T (alpha * (H omega) + beta);  w_bar <- c w_bar - lr H^T (g . 1)  (§5.8-§5.9)
  // Q <- c^2 Q - lr (H^T B + B^T H), B = c G_H - (lr/2) G H  (§5.10); for large m, Q <- c^2 Q + dQ
  TS* omega = b.template scratch<TS>(kSlotOmegaNew, d);
  TS* w_bar = b.template scratch<TS>(kSlotWBarNew, d);
  TS* Bq = gram_free ? nullptr : b.template scratch<TS>(kSlotB, md);
  TS* dQ = gram_free ? b.template scratch<TS>(kSlotGfDQ, dd) : nullptr;
  double* gamma_energy = gram_free ? b.template scratch<double>(kSlotGfEnergy, 1) : nullptr;
  // Independent of the factor M and of X. Beside X (Woodbury, m < d) they take no scratch of their own; the Gram-free
  // Q update, which does, needs m >= 2d and runs alone.
  const auto vector_and_q_factors = [&] {
    b.copy(st.omega, omega, static_cast<std::size_t>(d));
    b.copy(st.w_bar, w_bar, static_cast<std::size_t>(d));
    b.gemv(Op::T, m, d, -lr, H, d, v, c, omega);
    b.gemv(Op::T, m, d, -lr, H, d, g_one, c, w_bar);
    if (!gram_free) {
      b.copy(grad_H, Bq, md);
      b.gemm(Op::N, Op::N, m, d, m, -lr / 2, G, m, H, d, c, Bq, d);
    } else {
      detail::q_update_without_gram(b, st, H, m, t, dA, order, grad_H, aH, WZ, z_sum, ds, lr, c, D, dQ, gamma_energy);
    }
  };

  // U^-1_new and X = H U_new^-1 (row j: what V's target rows of example j move along), with rcond of the factor.
  TS* X = b.template scratch<TS>(kSlotX, md);
  bool woodbury = false;    // U^-1_new = (U^-1 + lr (alpha H)^T X) / c, applied at commit
  TS* U_inv_new = nullptr;  // explicit: M^-1 U^-1
  if (m < d) {
    // Woodbury (§5.5): S = I_m - (lr/c) diag(alpha) H H^T, factored as S^T; X = S^-T (H U^-1) / c.
    woodbury = true;
    TS* HHt = b.template scratch<TS>(kSlotHHt, mm);
    TS* St = b.template scratch<TS>(kSlotSmall, mm);
    TS* St_inv = b.template scratch<TS>(kSlotSmallInv, mm);
    decltype(b.factor_system(m, d, St, St_inv)) system{};
    const auto factor = [&] {  // S^T from H H^T, checked, then factored
      b.gram(m, d, TS(1), H, d, HHt, m);
      b.for_rows(m, m, parts::WoodburySystemT<TS>{dq, HHt, St, lr / c, m});
      b.require_finite(St, mm, "the update factor M");  // an overflow here would reach LAPACK as a bad argument
      // M / c = I - H^T E has the eigenvalues of S plus ones, so its condition is about max(1, ||S||) max(1, ||S^-1||)
      system = b.factor_system(m, d, St, St_inv);
    };
    TS* HU = b.template scratch<TS>(kSlotHU, md);
    const auto hu_columns = [&](int part, int parts) {  // H U^-1 in column blocks
      const int lo = block_edge(d, part, parts), hi = block_edge(d, part + 1, parts);
      if (hi > lo) b.gemm(Op::N, Op::N, m, hi - lo, d, TS(1), H, d, st.U_inv + lo, d, TS(0), HU + lo, d);
    };
    // the m x m system and its factors run on one thread (LAPACK is single-threaded here): the Gram matrix is
    // formed meanwhile where the backend can, and H U^-1, which needs neither, fills whichever thread is free first
    b.concurrently(factor, form_gram, hu_columns, 2.0 * m * d * d);
    b.require_rcond(system.rcond, opt.min_rcond);
    const auto x_columns = [&](int part, int parts) {  // X = S^-T (H U^-1) / c (§5.5) in column blocks
      const int lo = block_edge(d, part, parts), hi = block_edge(d, part + 1, parts);
      if (hi > lo) b.solve_system(system, m, hi - lo, 1 / c, HU + lo, X + lo, d);
    };
    // the vector and Q factors need neither: they take one thread while X's blocks fill the others
    b.concurrently(vector_and_q_factors, [] {}, x_columns, 2.0 * m * m * d);
  } else {
    form_gram();
    // explicit (§5.6): M = c I - lr H^T diag(alpha) H, inverted (d x d)
    TS* M = b.template scratch<TS>(kSlotSmall, dd);
    b.for_rows(d, d, parts::ScaledIdentity<TS>{M, c, d});
    b.gemm(Op::T, Op::N, d, d, m, -lr, H, d, aH, d, TS(1), M, d);
    b.require_finite(M, dd, "the update factor M");
    const auto inv = b.invert(d, M, b.template scratch<TS>(kSlotSmallInv, dd), false);
    b.require_rcond(inv.rcond, opt.min_rcond);
    U_inv_new = b.template scratch<TS>(kSlotUInvNew, dd);
    b.gemm(Op::N, Op::N, d, d, d, TS(1), inv.inverse, d, st.U_inv, d, TS(0), U_inv_new, d);
    b.gemm(Op::N, Op::N, m, d, d, TS(1), H, d, U_inv_new, d, TS(0), X, d);
    vector_and_q_factors();
  }

  // The d x d updates are products of these m x d factors, checked here so that the commit cannot meet a NaN or inf.
  b.require_finite(p.UH, md, "U");
  b.require_finite(aH, md, "U");
  if (Bq)
    b.require_finite(Bq, md, "Q");
  else
    b.require_finite(dQ, dd, "Q");
  if (!woodbury) b.require_finite(U_inv_new, dd, "U^-1");  // Woodbury: from aH and X, checked here too
  b.require_finite(omega, static_cast<std::size_t>(d), "omega");
  b.require_finite(w_bar, static_cast<std::size_t>(d), "w_bar");
  b.require_finite(X, md, "the V update");
  b.require_finite(grad_H, md, "grad_H");

  // ... and so are the products the commit forms from them: a bound on each, so that no overflow reaches U, Q, U^-1
  // or V (§9.3). O(m d + nnz d).
  {
    double* bounds = b.template scratch<double>(kSlotBounds, 8);  // 5 norms, 2 flags (5, 7), the scatter norm (6)
    b.norm2(p.UH, md, bounds + 0);
    b.norm2(aH, md, bounds + 1);
    b.norm2(H, md, bounds + 2);
    if (Bq)
      b.norm2(Bq, md, bounds + 3);
    else
      b.norm2(dQ, dd, bounds + 3);
    if (woodbury)
      b.norm2(X, md, bounds + 4);
    else
      b.fill(bounds + 4, 1, 0.0);
    b.for_each(1, parts::CommitBound{bounds, opt.lr, 1.0 / static_cast<double>(c), kStateLimit / 2, bounds + 5,
                                     dQ != nullptr});
    b.require_finite(bounds + 5, 1, "U, Q or U^-1");
    b.for_each(1, parts::WeightBound<TS>{st.Q, G, bounds + 2, gamma_energy, opt.lr, kWeightLimit / 16, d, m,
                                         bounds + 7});
    b.require_finite(bounds + 7, 1, "W (its entries would come near the limit of the weight dtype)");
    const std::size_t nnz = static_cast<std::size_t>(t.nnz);
    double* step = b.template scratch<double>(kSlotScatterStep, nnz);
    double* row_max = b.template scratch<double>(kSlotScatterRow, nnz);
    b.for_rows(m, 1, parts::ScatterBound<TV, TS>{st.V, t.indptr, t.indices, dA, X, st.D, opt.lr, d, step, row_max},
               static_cast<std::size_t>(d) * (1 + static_cast<std::size_t>(t.nnz) / static_cast<std::size_t>(m)));
    b.norm2(step, nnz, bounds + 6);
    b.for_each(nnz, parts::FinishScatterBound{row_max, bounds + 6, std::sqrt(static_cast<double>(nnz)), kWeightLimit,
                                               step});
    b.require_finite(step, nnz, "V");
  }

  // Commit: where the backend stages it (in place on the CPU, nothing below can fail there). U^-1 first (H U^-1
  // above has just read it), Q last (the next step's projection reads it first).
  TS* U_inv = b.stage(st.U_inv, dd, kSlotStageUInv, woodbury);
  if (woodbury)
    b.gemm(Op::T, Op::N, d, d, m, lr / c, aH, d, X, d, 1 / c, U_inv, d);  // U^-1 <- (U^-1 + lr aH^T X) / c
  else
    b.copy(U_inv_new, U_inv, dd);
  TS* U = b.stage(st.U, dd, kSlotStageU, true);
  b.gemm(Op::T, Op::N, d, d, m, -lr, p.UH, d, aH, d, c, U, d);  // U <- c U - lr U H^T aH
  TS* Q = b.stage(st.Q, dd, kSlotStageQ, true);
  if (Bq)
    b.sym_rank2k(d, m, -lr, H, d, Bq, d, c * c, Q, d);  // Q <- c^2 Q - lr (H^T B + B^T H), exactly symmetric
  else
    b.for_rows(d, d, parts::ScaleAdd<TS>{dQ, c * c, Q, d});  // Q <- c^2 Q + dQ
  TS* omega_out = b.stage(st.omega, static_cast<std::size_t>(d), kSlotStageOmega, false);
  TS* w_bar_out = b.stage(st.w_bar, static_cast<std::size_t>(d), kSlotStageWBar, false);
  b.copy(omega, omega_out, static_cast<std::size_t>(d));
  b.copy(w_bar, w_bar_out, static_cast<std::size_t>(d));
  // On a GPU the staged results are checked too: an overflow in a product turns the commit into a no-op.
  b.require_finite_staged(U, dd);
  b.require_finite_staged(Q, dd);
  b.require_finite_staged(U_inv, dd);
  b.scatter_rows(st.V, st.D, d, t, dA, order, X, -lr);  // V[k] <- V[k] - lr sum_j z_jk X_j
  b.commit(U, st.U, dd);
  b.commit(Q, st.Q, dd);
  b.commit(U_inv, st.U_inv, dd);
  b.commit(omega_out, st.omega, static_cast<std::size_t>(d));
  b.commit(w_bar_out, st.w_bar, static_cast<std::size_t>(d));
  b.count_step(st.stats);
  // What the monitoring knows about U's singular values, carried across this step as bounds (§8.2).
  TS* hh = b.template scratch<TS>(kSlotRowNorms, m);
  b.row_dots(H, H, m, d, hh);
  b.for_each(1, parts::WidenMonitorBounds<TS>{dq, hh, opt.lr, 1.0 - opt.lr * opt.weight_decay, st.stats, b.flags(), m});
}

}  // namespace sparsetarget
