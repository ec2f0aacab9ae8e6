// Keeping the factorisation W = V U + 1 omega^T healthy without changing W, written once over the backend
// primitives (backend.h). docs/algorithm.md §8:
// - monitoring after a step, O(d^2): one warm-started power-iteration step each for the largest singular values of
//   U and U^-1 and the residual ||U (U^-1 x) - x|| on the same vector; the decision is needs_correction();
// - correction, one BLAS-3 pass over V: the plan comes from the SVD of U (stabilize_policy.h), V <- V T^-1 in row
//   tiles (rank k when k < d/2, else one d x d product per tile, or a scale only), U and U^-1 from the plan;
// - refresh, O(D d^2): U^-1, Q and w_bar recomputed from V, U and omega, V^T V accumulated in float64.
// A backend decides when a requested correction can run (the CPU at once; a GPU when the host next sees the flag).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "backend.h"
#include "stabilize_policy.h"
#include "state.h"
#include "step_parts.h"

namespace sparsetarget {

template <class B, class TV, class TS>
void monitor(B& b, FactoredState<TV, TS>& st, const StabilizeOptions& opt) {
  const int d = st.d;
  TS* work = b.template scratch<TS>(kSlotMonitor, 5 * static_cast<std::size_t>(d));
  TS *u = work, *pmax_new = work + d, *y = work + 2 * d, *r = work + 3 * d, *pmin_new = work + 4 * d;
  double* norms = b.template scratch<double>(kSlotNorms, 11);
  b.gemv(Op::N, d, d, TS(1), st.U, d, st.probe_max, TS(0), u);                // u = U p_max
  b.gemv(Op::T, d, d, TS(1), st.U, d, u, TS(0), pmax_new);                    // U^T U p_max
  b.gemv(Op::N, d, d, TS(1), st.U_inv, d, st.probe_min, TS(0), y);            // y = U^-1 p_min
  b.copy(st.probe_min, r, static_cast<std::size_t>(d));
  b.gemv(Op::N, d, d, TS(1), st.U, d, y, TS(-1), r);                          // r = U U^-1 p_min - p_min
  b.gemv(Op::T, d, d, TS(1), st.U_inv, d, y, TS(0), pmin_new);                // U^-T U^-1 p_min
  b.norm2(u, d, norms + 0);
  b.norm2(y, d, norms + 1);
  b.norm2(r, d, norms + 2);
  b.norm2(pmax_new, d, norms + 3);
  b.norm2(pmin_new, d, norms + 4);
  b.for_each(1, parts::FinishMonitor{norms, st.stats, b.flags(), opt, d});
  b.for_each(static_cast<std::size_t>(d), parts::UpdateProbe<TS>{pmax_new, norms + 5, st.probe_max});
  b.for_each(static_cast<std::size_t>(d), parts::UpdateProbe<TS>{pmin_new, norms + 8, st.probe_min});
}

// f(tile, rows) for consecutive row tiles of V.
template <class B, class TV, class TS, class F>
void for_row_tiles(FactoredState<TV, TS>& st, F f) {
  for (std::int64_t r0 = 0; r0 < st.D; r0 += B::kTileRows)
    f(st.V + r0 * st.d, static_cast<int>(std::min<std::int64_t>(B::kTileRows, st.D - r0)));
}

// V <- V T^-1 in row tiles (see CorrectionPlan).
template <class B, class TV, class TS>
void apply_to_V(B& b, FactoredState<TV, TS>& st, const CorrectionPlan<TS>& plan) {
  const int d = st.d, k = static_cast<int>(plan.cols.size());
  const std::int64_t tile_rows = B::kTileRows;
  if (k == 0) {  // a scale only: O(D d)
    b.scale(st.V, static_cast<std::size_t>(st.D) * d, plan.a);
    return;
  }
  const TV a = static_cast<TV>(plan.a);
  if (plan.low_rank()) {
    std::vector<TV> Pk, CPkT;
    plan.low_rank_factors(Pk, CPkT);
    TV* Pk_b = b.template scratch<TV>(kSlotFactorA, Pk.size());
    TV* CPkT_b = b.template scratch<TV>(kSlotFactorB, CPkT.size());
    b.upload(Pk, Pk_b);
    b.upload(CPkT, CPkT_b);
    TV* Y = b.template scratch<TV>(kSlotTile, static_cast<std::size_t>(tile_rows) * k);
    for_row_tiles<B>(st, [&](TV* tile, int rows) {
      b.gemm(Op::N, Op::N, rows, k, d, TV(1), tile, d, Pk_b, k, TV(0), Y, k);
      b.gemm(Op::N, Op::N, rows, d, k, TV(1), Y, k, CPkT_b, d, a, tile, d);
    });
  } else {
    std::vector<TV> Tinv;
    plan.dense_factor(Tinv);
    TV* Tinv_b = b.template scratch<TV>(kSlotFactorA, Tinv.size());
    b.upload(Tinv, Tinv_b);
    TV* out = b.template scratch<TV>(kSlotTile, static_cast<std::size_t>(tile_rows) * d);
    for_row_tiles<B>(st, [&](TV* tile, int rows) {
      b.gemm(Op::N, Op::N, rows, d, d, TV(1), tile, d, Tinv_b, d, TV(0), out, d);
      b.copy(out, tile, static_cast<std::size_t>(rows) * d);
    });
  }
}

// SVD-based correction now, W unchanged (§8.4-§8.8): the singular values of U out of band move back when its spread
// exceeds the trigger or on demand (`whole_band`, stabilize()); U's scale is reset when far from 1; U^-1 is rebuilt.
// Synchronous.
template <class B, class TV, class TS>
CorrectionReport correct(B& b, FactoredState<TV, TS>& st, const StabilizeOptions& opt, bool whole_band) {
  [[maybe_unused]] const auto exact = b.exact_math();  // no reduced-precision products while W is re-expressed
  [[maybe_unused]] const auto passes = b.pass_scope();
  const std::size_t dd = static_cast<std::size_t>(st.d) * st.d;
  b.synchronize();
  const std::vector<TS> U = b.download(st.U, dd);
  const CorrectionPlan<TS> plan = plan_correction(st.d, U.data(), opt, whole_band);
  if (plan.report.corrected) {
    apply_to_V(b, st, plan);
    b.upload(plan.U, st.U);
  }
  b.upload(plan.U_inv, st.U_inv);
  std::vector<double> stats = b.download(st.stats, kStatCount);
  record_correction(plan.report, stats.data());
  b.upload(stats, st.stats);
  b.correction_done();
  return plan.report;
}

// Recompute U^-1, Q = W^T W and w_bar = W^T 1 from V, U and omega (§8.9). Synchronous.
template <class B, class TV, class TS>
void refresh(B& b, FactoredState<TV, TS>& st) {
  [[maybe_unused]] const auto exact = b.exact_math();
  [[maybe_unused]] const auto passes = b.pass_scope();
  const int d = st.d;
  const std::size_t dd = static_cast<std::size_t>(d) * d;
  double* VtV = b.template scratch<double>(kSlotVtV, dd);
  double* Vt1 = b.template scratch<double>(kSlotVt1, static_cast<std::size_t>(d));
  b.fill(VtV, dd, 0.0);
  b.fill(Vt1, static_cast<std::size_t>(d), 0.0);
  for_row_tiles<B>(st, [&](TV* tile, int rows) { b.accumulate_gram(tile, rows, d, VtV, Vt1); });
  b.synchronize();
  std::vector<double> VtV_host = b.download(VtV, dd);
  const std::vector<double> Vt1_host = b.download(Vt1, static_cast<std::size_t>(d));
  const std::vector<TS> U = b.download(st.U, dd), omega = b.download(st.omega, static_cast<std::size_t>(d));
  std::vector<TS> Q(dd), w_bar(d), U_inv(dd);
  refresh_small(d, st.D, VtV_host, Vt1_host, U.data(), omega.data(), Q.data(), w_bar.data(), U_inv.data());
  b.upload(Q, st.Q);
  b.upload(w_bar, st.w_bar);
  b.upload(U_inv, st.U_inv);
  std::vector<double> stats = b.download(st.stats, kStatCount);
  stats[kStatRefreshes] += 1;
  b.upload(stats, st.stats);
}

// ||U U^-1 - I||_F, O(d^3), for diagnostics. Synchronous.
template <class B, class TV, class TS>
double inverse_error(B& b, const FactoredState<TV, TS>& st) {
  const std::size_t dd = static_cast<std::size_t>(st.d) * st.d;
  b.synchronize();
  const std::vector<TS> U = b.download(st.U, dd), U_inv = b.download(st.U_inv, dd);
  return inverse_error_of(st.d, U.data(), U_inv.data());
}

// The policy after a step: a refresh every refresh_every steps, else monitoring at least every check_every steps
// and earlier whenever the bounds carried since the last check no longer keep U's singular values in band (a
// backend that would have to wait to read them monitors every step), and a correction when one has been requested
// and the backend can run it now. A refresh needs to wait for the device, so
// a GPU skips it while a CUDA graph is being captured; a correction that fails (U singular) is not asked for again.
template <class B, class TV, class TS>
void after_step(B& b, FactoredState<TV, TS>& st, const StabilizeOptions& opt, std::int64_t rows) {
  const std::int64_t steps = b.steps(st);
  const std::int64_t refresh_every = refresh_period(opt, st.D, rows);
  if (refresh_every > 0 && steps % refresh_every == 0 && b.can_wait()) {
    refresh(b, st);
    return;
  }
  if (opt.check_every > 0 && (steps % opt.check_every == 0 || b.monitor_may_be_due(st, opt))) monitor(b, st, opt);
  if (!b.correction_requested()) return;
  try {
    correct(b, st, opt, false);
  } catch (...) {
    b.correction_done();
    throw;
  }
}

}  // namespace sparsetarget
