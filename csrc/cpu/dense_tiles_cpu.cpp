#include "dense_tiles_cpu.h"

#include "thread_pool_cpu.h"

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "blas_cpu.h"
#include "kernels_cpu.h"

namespace sparsetarget {



namespace {

constexpr std::int64_t kTileRows = 4096;

// Rows [r0, r0 + rows) of V in the state dtype: a view when the dtypes agree, else a converted copy in buf.
template <class TV, class TS>
const TS* tile_as_state(const FactoredState<TV, TS>& st, std::int64_t r0, int rows, std::vector<TS>& buf) {
  const TV* src = row_ptr(static_cast<const TV*>(st.V), r0, st.d);
  if constexpr (std::is_same_v<TV, TS>) {
    return src;
  } else {
    buf.resize(static_cast<std::size_t>(rows) * st.d);
    std::copy(src, src + static_cast<std::ptrdiff_t>(rows) * st.d, buf.begin());
    return buf.data();
  }
}

// UH (m x d) = H U^T and Hw (m) = H omega: the products every logit tile shares.
template <class TV, class TS>
void hidden_products(const FactoredState<TV, TS>& st, const TS* H, int m, std::vector<TS>& UH, std::vector<TS>& Hw) {
  const int d = st.d;
  UH.resize(static_cast<std::size_t>(m) * d);
  Hw.resize(m);
  blas::gemm<TS>(Op::N, Op::T, m, d, d, 1, H, d, st.U, d, 0, UH.data(), d);
  blas::gemv<TS>(Op::N, m, d, 1, H, d, st.omega, 0, Hw.data());
}

// out (m x rows, leading dimension ld) = UH V_tile^T + Hw 1^T
template <class TV, class TS>
void logit_tile(const FactoredState<TV, TS>& st, const std::vector<TS>& UH, const std::vector<TS>& Hw, int m,
                std::int64_t r0, int rows, std::vector<TS>& buf, TS* out, std::int64_t ld) {
  const int d = st.d;
  const TS* tile = tile_as_state(st, r0, rows, buf);
  blas::gemm<TS>(Op::N, Op::T, m, rows, d, 1, UH.data(), d, tile, d, 0, out, static_cast<int>(ld));
  for (int j = 0; j < m; ++j)
    for (int r = 0; r < rows; ++r) out[static_cast<std::ptrdiff_t>(j) * ld + r] += Hw[j];
}

}  // namespace

template <class TV, class TS>
void weight_rows(const FactoredState<TV, TS>& st, std::int64_t start, std::int64_t stop, TV* out) {
  const cpu::PassThreads passes;
  const int d = st.d;
  std::vector<TS> buf, result(static_cast<std::size_t>(std::min<std::int64_t>(kTileRows, stop - start)) * d);
  for (std::int64_t r0 = start; r0 < stop; r0 += kTileRows) {
    const int rows = static_cast<int>(std::min<std::int64_t>(kTileRows, stop - r0));
    const TS* tile = tile_as_state(st, r0, rows, buf);
    blas::gemm<TS>(Op::N, Op::N, rows, d, d, 1, tile, d, st.U, d, 0, result.data(), d);
    TV* dst = row_ptr(out, r0 - start, d);
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < d; ++i)
        dst[static_cast<std::ptrdiff_t>(r) * d + i] = static_cast<TV>(result[static_cast<std::size_t>(r) * d + i] + st.omega[i]);
  }
}

template <class TV, class TS>
void logits(const FactoredState<TV, TS>& st, const TS* H, int m, std::int64_t start, std::int64_t stop, TS* out) {
  const cpu::PassThreads passes;
  std::vector<TS> UH, Hw, buf;
  hidden_products(st, H, m, UH, Hw);
  const std::int64_t width = stop - start;
  for (std::int64_t r0 = start; r0 < stop; r0 += kTileRows) {
    const int rows = static_cast<int>(std::min<std::int64_t>(kTileRows, stop - r0));
    logit_tile(st, UH, Hw, m, r0, rows, buf, out + (r0 - start), width);
  }
}

template <class TV, class TS>
void topk(const FactoredState<TV, TS>& st, const TS* H, int m, int k, TopkRank rank, TS* values,
          std::int64_t* indices) {
  const cpu::PassThreads passes;
  std::vector<TS> UH, Hw, buf;
  hidden_products(st, H, m, UH, Hw);
  const auto score = [rank](TS o) -> TS {
    switch (rank) {
      case TopkRank::Square: return o * o;
      case TopkRank::Taylor: return 1 + o + o * o / 2;
      default: return o;
    }
  };
  // Per row, a min-heap of the best k seen so far: larger score wins, then smaller index.
  struct Item {
    TS score;
    std::int64_t index;
    TS output;
  };
  const auto better = [](const Item& a, const Item& b) {
    return a.score > b.score || (a.score == b.score && a.index < b.index);
  };
  std::vector<std::vector<Item>> heaps(m);
  for (auto& h : heaps) h.reserve(k);
  const int tile_rows = static_cast<int>(std::min<std::int64_t>(kTileRows, st.D));
  std::vector<TS> tile_logits(static_cast<std::size_t>(m) * tile_rows);
  for (std::int64_t r0 = 0; r0 < st.D; r0 += kTileRows) {
    const int rows = static_cast<int>(std::min<std::int64_t>(kTileRows, st.D - r0));
    logit_tile(st, UH, Hw, m, r0, rows, buf, tile_logits.data(), rows);
    for (int j = 0; j < m; ++j) {
      auto& heap = heaps[j];
      const TS* row = tile_logits.data() + static_cast<std::ptrdiff_t>(j) * rows;
      for (int r = 0; r < rows; ++r) {
        const Item item{score(row[r]), r0 + r, row[r]};
        if (static_cast<int>(heap.size()) < k) {
          heap.push_back(item);
          std::push_heap(heap.begin(), heap.end(), better);
        } else if (better(item, heap.front())) {
          std::pop_heap(heap.begin(), heap.end(), better);
          heap.back() = item;
          std::push_heap(heap.begin(), heap.end(), better);
        }
      }
    }
  }
  for (int j = 0; j < m; ++j) {
    auto& heap = heaps[j];
    std::sort_heap(heap.begin(), heap.end(), better);
    for (int i = 0; i < k; ++i) {
      values[static_cast<std::ptrdiff_t>(j) * k + i] = heap[i].output;
      indices[static_cast<std::ptrdiff_t>(j) * k + i] = heap[i].index;
    }
  }
}

#define ST_INSTANTIATE(TV, TS)                                                                                   \
  template void weight_rows<TV, TS>(const FactoredState<TV, TS>&, std::int64_t, std::int64_t, TV*);              \
  template void logits<TV, TS>(const FactoredState<TV, TS>&, const TS*, int, std::int64_t, std::int64_t, TS*);   \
  template void topk<TV, TS>(const FactoredState<TV, TS>&, const TS*, int, int, TopkRank, TS*, std::int64_t*);
ST_INSTANTIATE(float, float)
ST_INSTANTIATE(float, double)
ST_INSTANTIATE(double, float)
ST_INSTANTIATE(double, double)
#undef ST_INSTANTIATE

}  // namespace sparsetarget
