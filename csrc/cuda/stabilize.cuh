// Keeping the factorisation healthy on the GPU (mirror of ../stabilize.h). The O(d^2) monitoring runs on the
// device after a step and only raises DeviceStatus::needs_correction; the host runs the correction when it next
// reads the status (Layer::poll). Corrections and refreshes take the d x d halves from ../stabilize.cpp on host
// copies of the small state and do the O(D d) passes over V on the device; they synchronise (they are rare).
#pragma once

#include "../stabilize.h"
#include "../state.h"
#include "factored_step.cuh"

namespace sparsetarget::cuda {

// One power-iteration step for U's extreme singular values and the inverse residual, as ../stabilize.cpp's
// after_step; writes the probes and the monitoring stats and sets needs_correction. Skipped when a step failed.
template <class TV, class TS>
void monitor(Context& ctx, FactoredState<TV, TS>& st, const StabilizeOptions& opt);

// SVD-based correction now; synchronises.
template <class TV, class TS>
CorrectionReport correct(Context& ctx, FactoredState<TV, TS>& st, const StabilizeOptions& opt);

// Recompute U^-1, Q and w_bar from V, U and omega (V^T V accumulated in float64 on the device); synchronises.
template <class TV, class TS>
void refresh(Context& ctx, FactoredState<TV, TS>& st);

// ||U U^-1 - I||_F; synchronises.
template <class TV, class TS>
double inverse_error(Context& ctx, const FactoredState<TV, TS>& st);

}  // namespace sparsetarget::cuda
