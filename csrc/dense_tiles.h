// The O(D d) views of the layer (dense W, logits, top-k), computed in row tiles of V so that no temporary grows
// with D beyond the requested output.
#pragma once

#include <cstdint>

#include "state.h"

namespace sparsetarget {

// out[r - start] = W[r] = V[r] U + omega for r in [start, stop); out is (stop - start) x d in the weight dtype.
template <class TV, class TS>
void weight_rows(const FactoredState<TV, TS>& st, std::int64_t start, std::int64_t stop, TV* out);

// out (m x (stop - start)) = H W[start:stop]^T.
template <class TV, class TS>
void logits(const FactoredState<TV, TS>& st, const TS* H, int m, std::int64_t start, std::int64_t stop, TS* out);

// The k largest outputs of each row of H W^T, in descending order (ties: smaller index first).
template <class TV, class TS>
void topk(const FactoredState<TV, TS>& st, const TS* H, int m, int k, TS* values, std::int64_t* indices);

}  // namespace sparsetarget
