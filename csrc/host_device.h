// Functions and types that both backends run: on the host for the CPU, in device code when compiled by nvcc.
#pragma once

#if defined(__CUDACC__)
#define ST_HD __host__ __device__
#else
#define ST_HD
#endif

namespace sparsetarget {

// Codes of StepFlags::error. On the CPU a failure throws at once and the flags stay clear; on a GPU it is recorded
// in device memory (the first error wins) and reported to the caller later, without a host synchronisation.
enum ErrorCode : int {
  kOk = 0,
  kSingularUpdate = 1,  // rcond of the update factor below min_rcond
  kNonFinite = 2,       // NaN or inf in the step's results (or in its inputs)
  kBadTarget = 3,       // a target index outside [0, D)
};

// What a step and the monitoring after it report to the host.
struct StepFlags {
  int error = kOk;
  int needs_correction = 0;  // monitoring found U's singular values out of band
  double rcond = 0;          // of the failing step, for kSingularUpdate
  long long bad_index = 0;   // for kBadTarget
};

}  // namespace sparsetarget
