// The non-template members of the CUDA backend (mirror of the inline ones in ../cpu/backend_cpu.h).
#include "backend_cuda_impl.cuh"

namespace sparsetarget::cuda {

namespace {

__global__ void iota_kernel(std::int64_t* out, std::int64_t n) {
  ST_GRID_LOOP(i, static_cast<std::size_t>(n)) out[i] = static_cast<std::int64_t>(i);
}

__global__ void count_step_kernel(const StepFlags* flags, double* stats) {
  if (!failed(flags)) stats[kStatSteps] += 1;
}

int key_bits(std::int64_t D) {
  int bits = 1;
  while (bits < 63 && (std::int64_t{1} << bits) < D) ++bits;
  return bits;
}

}  // namespace

__global__ void check_rcond_kernel(const double* rcond, double min_rcond, StepFlags* flags) {
  if (!(*rcond > 0 && *rcond >= min_rcond) && atomicCAS(&flags->error, kOk, kSingularUpdate) == kOk) flags->rcond = *rcond;
}

CudaBackend::CudaBackend() : flags_(sizeof(StepFlags)) {
  check(cudaMemset(flags_.get(), 0, sizeof(StepFlags)), "cudaMemset");
}

void CudaBackend::require_rcond(const double* rcond, double min_rcond) {
  check_rcond_kernel<<<1, 1, 0, stream()>>>(rcond, min_rcond, flags());
  check_launch("check_rcond");
}

// The target entries sorted by index (CUB radix sort over the bits D needs; stable).
TargetOrder CudaBackend::order_targets(const Targets& t, std::int64_t D) {
  if (t.nnz == 0) return {};
  const std::size_t n = static_cast<std::size_t>(t.nnz);
  std::int64_t* ids = ws_.get<std::int64_t>(kSlotSortIds, n);
  std::int64_t* keys_out = ws_.get<std::int64_t>(kSlotSortKeysOut, n);
  std::int64_t* ids_out = ws_.get<std::int64_t>(kSlotSortIdsOut, n);
  iota_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(ids, t.nnz);
  check_launch("iota");
  std::size_t temp_bytes = 0;
  const int bits = key_bits(D);
  check(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, t.indices, keys_out, ids, ids_out, t.nnz, 0, bits,
                                        stream()),
        "radix sort (size query)");
  void* temp = ws_.get<unsigned char>(kSlotSortTemp, temp_bytes);
  check(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, t.indices, keys_out, ids, ids_out, t.nnz, 0, bits,
                                        stream()),
        "radix sort");
  return {keys_out, ids_out};
}

void CudaBackend::count_step(double* stats) {
  count_step_kernel<<<1, 1, 0, stream()>>>(flags(), stats);
  check_launch("count_step");
  ++steps_;
}

bool CudaBackend::capturing() const {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream(), &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

bool CudaBackend::correction_requested() {
  if (published().needs_correction == 0 || capturing()) return false;
  finish_pending();
  return published().error == kOk;  // a failed step leaves nothing to correct; its error is raised next
}

void CudaBackend::synchronize() { check(cudaStreamSynchronize(stream()), "synchronize"); }

void CudaBackend::publish() {
  check(cudaMemcpyAsync(host_flags_.get(), flags_.get(), sizeof(StepFlags), cudaMemcpyDeviceToHost, stream()),
        "status copy");
}

// Stream waits, not device-wide ones: other streams (a communication library's, say) are left alone.
void CudaBackend::finish_pending() {
  publish();
  check(cudaStreamSynchronize(stream()), "synchronize");
}

void CudaBackend::clear() {
  check(cudaMemsetAsync(flags_.get(), 0, sizeof(StepFlags), stream()), "cudaMemset");
  check(cudaStreamSynchronize(stream()), "synchronize");
  *host_flags_.get() = StepFlags{};
}

}  // namespace sparsetarget::cuda
