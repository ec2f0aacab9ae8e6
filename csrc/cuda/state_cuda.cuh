// Device memory of the CUDA backend: owned device buffers, page-locked host values and the per-layer scratch.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sparsetarget::cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err) +
                             (err == cudaErrorStreamCaptureUnsupported || err == cudaErrorStreamCaptureInvalidated
                                  ? " (run one training step before capturing it in a CUDA graph, so that the "
                                    "layer's scratch memory already exists)"
                                  : ""));
}

// Checks the launch of the kernel just queued (configuration errors; faults show up at the next synchronisation).
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline unsigned blocks_for(std::size_t n, unsigned threads, unsigned cap = 65535u * 8u) {
  const std::size_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > cap ? cap : b));
}

// Owned device memory (cudaMalloc / cudaFree).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) : size_(bytes) {
    if (bytes) check(cudaMalloc(&ptr_, bytes), "cudaMalloc");
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : ptr_(std::exchange(other.ptr_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      if (ptr_) cudaFree(ptr_);
      ptr_ = std::exchange(other.ptr_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  std::size_t size() const { return size_; }

 private:
  void* ptr_ = nullptr;
  std::size_t size_ = 0;
};

// Owned page-locked host memory (cudaMallocHost / cudaFreeHost), the target of asynchronous status copies.
template <class T>
class PinnedValue {
 public:
  PinnedValue() {
    check(cudaMallocHost(reinterpret_cast<void**>(&ptr_), sizeof(T)), "cudaMallocHost");
    *ptr_ = T{};
  }
  ~PinnedValue() {
    if (ptr_) cudaFreeHost(ptr_);
  }
  PinnedValue(const PinnedValue&) = delete;
  PinnedValue& operator=(const PinnedValue&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

// Scratch of a layer, one buffer per slot, grown on demand and reused by every later step: a steady-state step
// allocates nothing (so it can be captured in a CUDA graph). Growing frees the old buffer with cudaFree, which
// waits for the device, so queued work never sees its scratch disappear.
class Workspace {
 public:
  template <class T>
  T* get(int slot, std::size_t count) {
    if (slot >= static_cast<int>(slots_.size())) slots_.resize(static_cast<std::size_t>(slot) + 1);
    const std::size_t bytes = count * sizeof(T);
    if (slots_[slot].size() < bytes) {
      slots_[slot] = DeviceBuffer();
      slots_[slot] = DeviceBuffer(bytes + bytes / 4 + 256);  // headroom: minibatch sizes vary a little
    }
    return static_cast<T*>(slots_[slot].get());
  }
  std::size_t bytes() const {
    std::size_t total = 0;
    for (const auto& s : slots_) total += s.size();
    return total;
  }

 private:
  std::vector<DeviceBuffer> slots_;
};

}  // namespace sparsetarget::cuda
