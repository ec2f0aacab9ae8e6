// Non-owning views of a factored output layer and of a minibatch's sparse targets.
// The arrays belong to the caller (NumPy arrays or torch tensors); the core updates them in place.
#pragma once

#include <cstdint>

namespace sparsetarget {

// Sparse targets of a minibatch in CSR form: row j holds entries indptr[j] .. indptr[j+1]-1 (in the memory of the
// backend that uses them; m and nnz are known on the host). Duplicate indices within a row act as their sum.
struct Targets {
  std::int64_t m = 0;                     // rows (examples)
  std::int64_t nnz = 0;                   // entries
  const std::int64_t* indptr = nullptr;   // m + 1
  const std::int64_t* indices = nullptr;  // nnz, each in [0, D)
  const double* values = nullptr;         // nnz target values y (built-in losses only)
};

// Indices of the monitoring scalars kept with the state (so that a saved layer resumes bit-exactly).
enum Stat : int {
  kStatSteps = 0,          // SGD steps applied
  kStatCorrections,        // stabilisation passes over V (rank-k corrections)
  kStatCorrectedValues,    // singular values of U moved back into range, summed over corrections
  kStatRefreshes,          // full recomputations of U^-1, Q and w_bar
  kStatSigmaMax,           // running estimate of the largest singular value of U
  kStatSigmaMin,           // running estimate of the smallest singular value of U
  kStatInverseResidual,    // latest ||U U^-1 x - x|| / ||x|| on the monitoring vector
  kStatCount
};

// W = V U + 1 omega^T, with U^-1, Q = W^T W and w_bar = W^T 1 kept alongside.
template <class TV, class TS>
struct FactoredState {
  using weight_type = TV;
  using state_type = TS;
  std::int64_t D = 0;  // rows of W (outputs)
  int d = 0;           // columns of W (hidden size)
  TV* V = nullptr;     // D x d
  TS* U = nullptr;     // d x d
  TS* U_inv = nullptr; // d x d
  TS* Q = nullptr;     // d x d
  TS* omega = nullptr; // d
  TS* w_bar = nullptr; // d
  TS* probe_max = nullptr;  // d: power-iteration vector for the largest singular value of U
  TS* probe_min = nullptr;  // d: power-iteration vector for the smallest singular value of U
  double* stats = nullptr;  // kStatCount monitoring scalars
};

}  // namespace sparsetarget
