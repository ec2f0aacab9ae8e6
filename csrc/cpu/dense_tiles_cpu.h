// The O(D d) views of the layer (dense W, logits, top-k), computed in row tiles of V so that no temporary grows
// with D beyond the requested output.
#pragma once

#include <cstdint>

#include "../state.h"

namespace sparsetarget {

// out[r - start] = W[r] = V[r] U + omega for r in [start, stop); out is (stop - start) x d in the weight dtype.
template <class TV, class TS>
void weight_rows(const FactoredState<TV, TS>& st, std::int64_t start, std::int64_t stop, TV* out);

// out (m x (stop - start)) = H W[start:stop]^T.
template <class TV, class TS>
void logits(const FactoredState<TV, TS>& st, const TS* H, int m, std::int64_t start, std::int64_t stop, TS* out);

// How topk ranks the outputs o of a row: by o itself, or by a loss's unnormalised probability, which is
// monotone in o^2 for spherical softmax (o^2 + eps) and equal to 1 + o + o^2/2 for Taylor softmax.
enum class TopkRank { Output, Square, Taylor };

// The k best outputs of each row of H W^T under `rank`, best first (ties: smaller index first). values holds the
// outputs o themselves, whatever the ranking.
template <class TV, class TS>
void topk(const FactoredState<TV, TS>& st, const TS* H, int m, int k, TopkRank rank, TS* values,
          std::int64_t* indices);

}  // namespace sparsetarget
