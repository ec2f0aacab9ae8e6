// The interface between the algorithm and a backend. The step (factored_step.h) and the stabilisation policy
// (stabilize.h) are written once as templates over a Backend type; cpu/backend_cpu.h and cuda/backend_cuda.cuh
// supply the primitives, mirrored name for name:
//
//   scratch<T>(slot, n)                 reusable memory of the backend (slots below), at least n elements
//   gemm, gemv, mirror_upper, sym_rank2k and gram (both triangles, exactly symmetric)
//                                       BLAS on ROW-MAJOR matrices (see cpu/blas_cpu.h), on the backend's stream
//   for_each(n, f), for_rows(rows, cols, f[, row_work])
//                                       elementwise loops running a functor of step_parts.h as f(i) / f(i, j)
//   concurrently(f, g, shared, flops)   runs two independent parts of the step, at the same time where the backend
//                                       can (the CPU's threads), then shared(part, parts) for the parts of a third
//                                       job of about `flops` in the threads that are free (or shared(0, 1)); none may
//                                       take scratch the others have not been given
//   copy, fill, scale, row_dots, norm2  small dense helpers (norm2 writes a double into the backend's memory)
//   invert(n, a, inverse, floor_one)    the inverse of a small matrix, written to `inverse` (a is overwritten), and
//                                       its reciprocal condition
//   gather_outputs, combine_target_rows, target_row_sums, order_targets, add_target_overlaps,
//   target_overlaps_times, scatter_rows
//                                       the sparse parts: gathers from and a deterministic scatter into rows of V
//   require_rcond, require_finite, require_finite_input
//                                       failure reports: the CPU throws before the commit; CUDA records the failure in
//                                       StepFlags on the device and the commit becomes a no-op
//   stage(dst, n, slot, keep) / commit(staged, dst, n)
//                                       where the new state is written: the CPU writes in place after every check
//                                       passed; CUDA writes a copy and commits it only if no failure was recorded
//   count_step, steps, flags, correction_requested, correction_done, synchronize, can_wait, download, upload,
//   accumulate_gram, exact_math, monitor_may_be_due
//                                       bookkeeping of the stabilisation policy
#pragma once

namespace sparsetarget {

enum class Op { N, T };  // use the matrix as stored, or its transpose

// Scratch slots of the step and of the stabilisation (a backend keeps one buffer per slot and reuses it).
enum Slot : int {
  kSlotUH,
  kSlotHQ,
  kSlotQ,
  kSlotS,
  kSlotHw,
  kSlotZv,
  kSlotWZ,
  kSlotZSum,
  kSlotGOne,
  kSlotV,
  kSlotG,
  kSlotGramA,  // A = (alpha H) R^T, whose sum with its transpose is in G (§5.3)
  kSlotGramR,  // rows (alpha_j / 2) Q h_j + W^T z_j of the Gram matrix's product (§5.3)
  kSlotAH,
  kSlotHHt,
  kSlotSmall,
  kSlotSmallInv,
  kSlotHU,  // H U^-1 (Woodbury)
  kSlotX,
  kSlotUInvNew,
  kSlotOmegaNew,
  kSlotWBarNew,
  kSlotB,
  kSlotStageU,
  kSlotStageUInv,
  kSlotStageQ,
  kSlotStageOmega,
  kSlotStageWBar,
  kSlotMonitor,  // 5 vectors of d
  kSlotNorms,
  kSlotTile,
  kSlotFactorA,
  kSlotFactorB,
  kSlotVtV,
  kSlotVt1,
  kSlotBounds,         // norms and bounds of the commit's products (double)
  kSlotScatterStep,    // per target entry: a bound on what the V scatter adds (double)
  kSlotScatterRow,     // per target entry: the largest |entry| of its row of V (double)
  kSlotRowNorms,
  kSlotGfA,  // the Q update without the Gram matrix (large m): d x d pieces, T (m x d), vectors, dQ, ||Gamma||^2
  kSlotGfE,
  kSlotGfT,
  kSlotGfF,
  kSlotGfR,
  kSlotGfVec,
  kSlotGfDQ,
  kSlotGfEnergy,
  kSlotCount,
  kSlotBackend = 48,  // and up: the backend's own (sorting, LU pivots, ...)
};
static_assert(kSlotCount <= kSlotBackend, "the algorithm's scratch slots overlap the backend's");

// Edge `part` of `parts` blocks of [0, n): multiples of 16 (whole vectors and cache lines), 0 first and n last.
inline int block_edge(int n, int part, int parts) {
  if (part >= parts) return n;
  const int edge = static_cast<int>((static_cast<long long>(n) * part / parts + 15) / 16 * 16);
  return edge < n ? edge : n;
}

}  // namespace sparsetarget
