// Forward and exact SGD step of the factored layer, O(m d^2 + m^2 d + nnz d) per minibatch, never O(D d).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "state.h"

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

template <class TS>
struct Projections {
  int m = 0;
  std::vector<TS> UH, HQ, q, s, Hw;  // as in ProjectionsView
  ProjectionsView<TS> view() const { return {m, UH.data(), HQ.data(), q.data(), s.data(), Hw.data()}; }
};

// The result lives in a per-thread buffer that the next call on this thread overwrites.
template <class TV, class TS>
const Projections<TS>& project(const FactoredState<TV, TS>& st, const TS* H, int m);

// A[e] = o_{k_e} for target entry e of row j: V[k_e] . (U h_j) + omega . h_j.
template <class TV, class TS>
void gather_outputs(const FactoredState<TV, TS>& st, const ProjectionsView<TS>& p, const Targets& t, TS* A);

// grad_H = dL/dH (m x d) for a loss with per-example partials dA (per target entry), dq and ds, at the current
// weights: grad_h_j = 2 dq_j Q h_j + ds_j w_bar + W^T z_j. No state change.
template <class TV, class TS>
void hidden_gradient(const FactoredState<TV, TS>& st, const Targets& t, const ProjectionsView<TS>& p, const TS* dA,
                     const TS* dq, const TS* ds, TS* grad_H);

struct StepOptions {
  double lr = 0;
  double weight_decay = 0;
  double min_rcond = 0;  // refuse the step when rcond(M) (Woodbury: rcond of the m x m system) is below this
};

// One exact SGD step W <- (1 - lr wd) W - lr dL/dW for a loss with per-example partials dA (per target entry),
// dq and ds, evaluated at the current weights. Writes grad_H = dL/dH (m x d) at the weights before the step; with
// grad_H_known, grad_H already holds it (from hidden_gradient on the same minibatch and weights) and is reused.
// Everything is computed and checked before the state is written: on any exception the state is unchanged.
template <class TV, class TS>
void backward_step(FactoredState<TV, TS>& st, const TS* H, const Targets& t, const ProjectionsView<TS>& p, const TS* dA,
                   const TS* dq, const TS* ds, const StepOptions& opt, TS* grad_H, bool grad_H_known = false);

}  // namespace sparsetarget
