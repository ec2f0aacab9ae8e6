// Forward and exact SGD step of the factored layer on the GPU (mirror of ../factored_step.h), with the same
// formulas and the same order of operations. All pointers are device pointers; every call is queued on the
// context's stream and none waits for the device.
//
// Failures (a singular update factor, NaN or inf, a target index out of range) cannot be raised where they happen
// without a synchronisation. They are recorded in the context's DeviceStatus instead: the step that meets one
// commits nothing, and every later step is skipped on the device until the host has read the status (see
// Context::poll), so the state is the state before the failing step.
#pragma once

#include <cstdint>

#include "../factored_step.h"
#include "../state.h"
#include "blas.cuh"
#include "state.cuh"

namespace sparsetarget::cuda {

// What one layer keeps on the GPU besides its state: the cuBLAS handle, scratch and the status word.
class Context {
 public:
  Context();

  blas::Handle blas;
  Workspace ws;

  DeviceStatus* status() const { return static_cast<DeviceStatus*>(status_.get()); }
  // The status as the last publish() left it in page-locked host memory; may lag behind the queued work.
  const DeviceStatus& published() const { return *host_status_.get(); }
  // Queues a copy of the device status to the host (no wait).
  void publish();
  // Waits for the device, then clears the status on both sides.
  void clear();
  cudaStream_t stream() const { return blas.stream(); }

 private:
  DeviceBuffer status_;
  PinnedValue<DeviceStatus> host_status_;
};

// UH = H U^T, HQ = H Q, q_j = h_j^T Q h_j, s = H w_bar, Hw = H omega (each m rows).
template <class TV, class TS>
void project(Context& ctx, const FactoredState<TV, TS>& st, const TS* H, int m, TS* UH, TS* HQ, TS* q, TS* s, TS* Hw);

// A[e] = V[k_e] . (U h_j) + omega . h_j for target entry e of row j.
template <class TV, class TS>
void gather_outputs(Context& ctx, const FactoredState<TV, TS>& st, const ProjectionsView<TS>& p,
                    const DeviceTargets& t, TS* A);

// grad_H = dL/dH (m x d) at the current weights; no state change.
template <class TV, class TS>
void hidden_gradient(Context& ctx, const FactoredState<TV, TS>& st, const DeviceTargets& t,
                     const ProjectionsView<TS>& p, const TS* dA, const TS* dq, const TS* ds, TS* grad_H);

// One exact SGD step (see ../factored_step.h). With grad_H_known, grad_H holds dL/dH from hidden_gradient on the
// same minibatch and weights; otherwise it is written. The commit is conditional on the device status.
template <class TV, class TS>
void backward_step(Context& ctx, FactoredState<TV, TS>& st, const TS* H, const DeviceTargets& t,
                   const ProjectionsView<TS>& p, const TS* dA, const TS* dq, const TS* ds, const StepOptions& opt,
                   TS* grad_H, bool grad_H_known);

}  // namespace sparsetarget::cuda
