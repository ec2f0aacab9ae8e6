// pybind11 bindings of the CUDA backend (module sparsetarget._cuda, host code), mirror of ../cpu/bindings_cpu.cpp for
// device memory.
// Tensors arrive as raw device addresses with their sizes: the Python side (sparsetarget.torch._cuda) checks
// shapes, dtypes, devices and contiguity and names the argument in its errors; this layer checks what it can
// without reading device memory, dispatches on the dtypes and keeps the host-side step bookkeeping.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>
#include <variant>

#include "../stabilize_bindings.h"
#include "../state.h"
#include "backend_cuda.cuh"
#include "factored_step_cuda.cuh"

namespace py = pybind11;

namespace sparsetarget::cuda {
namespace {

using AnyState = std::variant<FactoredState<float, float>, FactoredState<float, double>,
                              FactoredState<double, float>, FactoredState<double, double>>;

template <class T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t stream_of(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// The state arrays of a layer, as device addresses (same order as the CPU core: V, U, U_inv, Q, omega, w_bar,
// probe_max, probe_min, stats).
struct StateAddresses {
  std::uintptr_t V, U, U_inv, Q, omega, w_bar, probe_max, probe_min, stats;
};

class CudaCore {
 public:
  CudaCore(const StateAddresses& a, std::int64_t D, int d, bool weight64, bool state64, int device)
      : device_(device) {
    if (D < 1 || d < 1) throw py::value_error("V must have at least one row and one column");
    select_device();
    if (!weight64 && !state64) state_ = make<float, float>(a, D, d);
    if (!weight64 && state64) state_ = make<float, double>(a, D, d);
    if (weight64 && !state64) state_ = make<double, float>(a, D, d);
    if (weight64 && state64) state_ = make<double, double>(a, D, d);
    backend_.emplace();
    sync_step_count();
  }

  std::int64_t D() const { return std::visit([](const auto& s) { return s.D; }, state_); }
  int d() const { return std::visit([](const auto& s) { return s.d; }, state_); }

  void forward(std::uintptr_t stream, std::uintptr_t H, std::int64_t m, std::uintptr_t indptr, std::uintptr_t indices,
               std::int64_t nnz, std::uintptr_t A, std::uintptr_t q, std::uintptr_t s, std::uintptr_t UH,
               std::uintptr_t HQ, std::uintptr_t Hw) {
    enter(stream);
    std::visit([&](auto& st) {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      const int rows = checked_rows(m);
      project(*backend_, st, ptr<const TS>(H), rows, ptr<TS>(UH), ptr<TS>(HQ), ptr<TS>(q), ptr<TS>(s),
              ptr<TS>(Hw));
      const ProjectionsView<TS> p{rows, ptr<const TS>(UH), ptr<const TS>(HQ), ptr<const TS>(q), ptr<const TS>(s),
                                  ptr<const TS>(Hw)};
      gather_outputs(*backend_, st, p, targets(m, indptr, indices, nnz), ptr<TS>(A));
    }, state_);
    backend_->publish();
  }

  void grad_hidden(std::uintptr_t stream, std::uintptr_t H, std::int64_t m, std::uintptr_t indptr,
                   std::uintptr_t indices, std::int64_t nnz, std::uintptr_t dA, std::uintptr_t dq, std::uintptr_t ds,
                   const std::vector<std::uintptr_t>& projections, std::uintptr_t grad_H) {
    enter(stream);
    (void)H;
    std::visit([&](auto& st) {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      hidden_gradient(*backend_, st, targets(m, indptr, indices, nnz), view<TS>(m, projections), ptr<const TS>(dA),
                      ptr<const TS>(dq), ptr<const TS>(ds), ptr<TS>(grad_H));
    }, state_);
  }

  void backward_step(std::uintptr_t stream, std::uintptr_t H, std::int64_t m, std::uintptr_t indptr,
                     std::uintptr_t indices, std::int64_t nnz, std::uintptr_t dA, std::uintptr_t dq, std::uintptr_t ds,
                     const std::vector<std::uintptr_t>& projections, double lr, double weight_decay,
                     std::uintptr_t grad_H, bool grad_H_known) {
    if (!std::isfinite(lr) || lr < 0) throw py::value_error("lr must be finite and >= 0, got " + std::to_string(lr));
    if (!std::isfinite(weight_decay) || weight_decay < 0)
      throw py::value_error("weight_decay must be finite and >= 0, got " + std::to_string(weight_decay));
    if (lr * weight_decay >= 1)
      throw py::value_error("lr * weight_decay must be < 1, got " + std::to_string(lr * weight_decay));
    enter(stream);
    std::visit([&](auto& st) {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      StepOptions opt;
      opt.lr = lr;
      opt.weight_decay = weight_decay;
      opt.min_rcond = min_rcond >= 0 ? min_rcond : default_min_rcond<TS>();
      sparsetarget::backward_step(*backend_, st, ptr<const TS>(H), targets(m, indptr, indices, nnz),
                                  view<TS>(m, projections), ptr<const TS>(dA), ptr<const TS>(dq), ptr<const TS>(ds),
                                  opt, ptr<TS>(grad_H), grad_H_known);
      after_step(*backend_, st, stabilize);
    }, state_);
    backend_->publish();
  }

  // Raises the error of an earlier step, if the device has reported one by now (never waits otherwise).
  void poll(std::uintptr_t stream) { enter(stream); }

  // Waits for the layer's queued work and raises its error, if any.
  void synchronize(std::uintptr_t stream) { enter_synchronized(stream); }

  void refresh(std::uintptr_t stream) {
    enter_synchronized(stream);
    std::visit([&](auto& st) { sparsetarget::refresh(*backend_, st); }, state_);
  }

  py::dict correct(std::uintptr_t stream) {
    enter_synchronized(stream);
    const CorrectionReport r = std::visit([&](auto& st) { return sparsetarget::correct(*backend_, st, stabilize); },
                                          state_);
    return report_dict(r);
  }

  double inverse_error(std::uintptr_t stream) {
    enter_synchronized(stream);
    return std::visit([&](const auto& st) { return sparsetarget::inverse_error(*backend_, st); }, state_);
  }

  void set_tf32(bool on) {
    select_device();
    backend_->blas.set_tf32(on);
  }
  bool tf32() const { return backend_->blas.tf32(); }
  std::size_t workspace_bytes() const { return backend_->workspace_bytes(); }

  StabilizeOptions stabilize;
  double min_rcond = -1;  // negative: the default for the state dtype

 private:
  template <class TV, class TS>
  static FactoredState<TV, TS> make(const StateAddresses& a, std::int64_t D, int d) {
    FactoredState<TV, TS> st;
    st.D = D;
    st.d = d;
    st.V = ptr<TV>(a.V);
    st.U = ptr<TS>(a.U);
    st.U_inv = ptr<TS>(a.U_inv);
    st.Q = ptr<TS>(a.Q);
    st.omega = ptr<TS>(a.omega);
    st.w_bar = ptr<TS>(a.w_bar);
    st.probe_max = ptr<TS>(a.probe_max);
    st.probe_min = ptr<TS>(a.probe_min);
    st.stats = ptr<double>(a.stats);
    return st;
  }

  void select_device() const {
    int current = -1;
    check(cudaGetDevice(&current), "cudaGetDevice");
    if (current != device_) check(cudaSetDevice(device_), "cudaSetDevice");
  }

  // Every entry point: the right device, the caller's stream, and the error of an earlier step if known by now.
  void enter(std::uintptr_t stream) {
    select_device();
    backend_->set_stream(stream_of(stream));
    if (backend_->published().error != kOk) {
      backend_->finish_pending();
      raise_reported();
    }
  }

  // The entry of the calls that wait for the device anyway: every queued step has run, so its error (if any) is
  // raised here rather than cleared by the work that follows.
  void enter_synchronized(std::uintptr_t stream) {
    select_device();
    backend_->set_stream(stream_of(stream));
    backend_->finish_pending();
    raise_reported();
  }

  void raise_reported() {
    const StepFlags status = backend_->published();
    if (status.error == kOk) return;
    backend_->clear();
    sync_step_count();
    char msg[400];
    switch (status.error) {
      case kSingularUpdate:
        std::snprintf(msg, sizeof msg,
                      "an optimizer step on the GPU was not applied: its update factor M = (1 - lr*weight_decay) I - "
                      "lr H^T diag(2 dL/dq) H is singular or nearly so (reciprocal condition %.3g): lower lr. The "
                      "layer is as it was before that step (later steps queued before this report were skipped too)",
                      status.rcond);
        throw SingularUpdateError(msg);
      case kBadTarget:
        std::snprintf(msg, sizeof msg,
                      "a target index (%lld) is out of range [0, %lld): the forward pass that met it gave 0 for that "
                      "entry and no step since then was applied; the layer is as it was before",
                      status.bad_index, static_cast<long long>(D()));
        throw py::value_error(msg);
      default:
        throw std::domain_error(
            "an optimizer step on the GPU was not applied: its inputs (H, dL/dA, dL/dq, dL/ds) or results "
            "contained NaN or inf (overflow: lower lr or check the loss). The layer is as it was before that step "
            "(later steps queued before this report were skipped too)");
    }
  }

  void sync_step_count() {
    std::visit([&](const auto& st) {
      double steps = 0;
      check(cudaMemcpy(&steps, st.stats + kStatSteps, sizeof(double), cudaMemcpyDeviceToHost), "copy to host");
      backend_->set_steps(static_cast<std::int64_t>(steps));
    }, state_);
  }

  int checked_rows(std::int64_t m) const {
    if (m < 1 || m > (std::int64_t{1} << 31) - 1) throw py::value_error("H must have between 1 and 2^31-1 rows");
    return static_cast<int>(m);
  }

  Targets targets(std::int64_t m, std::uintptr_t indptr, std::uintptr_t indices, std::int64_t nnz) const {
    checked_rows(m);
    if (nnz < 0) throw py::value_error("targets nnz must be >= 0");
    Targets t;
    t.m = m;
    t.nnz = nnz;
    t.indptr = ptr<const std::int64_t>(indptr);
    t.indices = ptr<const std::int64_t>(indices);
    return t;
  }

  template <class TS>
  ProjectionsView<TS> view(std::int64_t m, const std::vector<std::uintptr_t>& p) const {
    if (p.size() != 5) throw py::value_error("projections must be the 5 addresses (UH, HQ, q, s, Hw)");
    return {checked_rows(m), ptr<const TS>(p[0]), ptr<const TS>(p[1]), ptr<const TS>(p[2]), ptr<const TS>(p[3]),
            ptr<const TS>(p[4])};
  }

  int device_;
  AnyState state_;
  std::optional<CudaBackend> backend_;
};

// (usable, reason): whether a CUDA device can run this build, and why not.
py::tuple device_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return py::make_tuple(false, std::string("no usable CUDA device: ") + cudaGetErrorString(err));
  }
  if (count == 0) return py::make_tuple(false, std::string("no CUDA device is visible"));
  int major = 0, minor = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0), "cudaDeviceGetAttribute");
  if (major < 8)
    return py::make_tuple(false, "device 0 has compute capability " + std::to_string(major) + "." +
                                     std::to_string(minor) + "; this build needs 8.0 or newer");
  return py::make_tuple(true, std::to_string(count) + " CUDA device(s), device 0 compute capability " +
                                  std::to_string(major) + "." + std::to_string(minor));
}

}  // namespace
}  // namespace sparsetarget::cuda

PYBIND11_MODULE(_cuda, m) {
  using namespace sparsetarget;
  using namespace sparsetarget::cuda;
  m.doc() = "sparsetarget CUDA backend: the factored layer's step on device memory (cuBLAS + own kernels)";
  m.attr("__version__") = SPARSETARGET_VERSION;
  m.attr("CUDA_ARCHITECTURES") = SPARSETARGET_CUDA_ARCHITECTURES;

  // The exception types live in _core, so that one `except` catches them from either backend.
  static py::handle core_module = py::module_::import("sparsetarget._core").release();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const SingularUpdateError& e) {
      PyErr_SetString(core_module.attr("SingularUpdateError").ptr(), e.what());
    } catch (const std::domain_error& e) {
      PyErr_SetString(core_module.attr("DomainError").ptr(), e.what());
    }
  });

  m.def("device_status", &device_status, "(usable, reason): whether a CUDA device can run this build.");
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  }, "CUDA runtime version this module was linked with (major * 1000 + minor * 10).");

  py::class_<StateAddresses>(m, "StateAddresses")
      .def(py::init<std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                    std::uintptr_t, std::uintptr_t, std::uintptr_t>(),
           py::arg("V"), py::arg("U"), py::arg("U_inv"), py::arg("Q"), py::arg("omega"), py::arg("w_bar"),
           py::arg("probe_max"), py::arg("probe_min"), py::arg("stats"));

  py::class_<CudaCore> cuda_class(m, "CudaCore");
  cuda_class
      .def(py::init<const StateAddresses&, std::int64_t, int, bool, bool, int>(), py::arg("state"), py::arg("D"),
           py::arg("d"), py::arg("weight64"), py::arg("state64"), py::arg("device"))
      .def_property_readonly("D", &CudaCore::D)
      .def_property_readonly("d", &CudaCore::d)
      .def("forward", &CudaCore::forward, py::arg("stream"), py::arg("H"), py::arg("m"), py::arg("indptr"),
           py::arg("indices"), py::arg("nnz"), py::arg("A"), py::arg("q"), py::arg("s"), py::arg("UH"), py::arg("HQ"),
           py::arg("Hw"))
      .def("grad_hidden", &CudaCore::grad_hidden, py::arg("stream"), py::arg("H"), py::arg("m"), py::arg("indptr"),
           py::arg("indices"), py::arg("nnz"), py::arg("dA"), py::arg("dq"), py::arg("ds"), py::arg("projections"),
           py::arg("grad_H"))
      .def("backward_step", &CudaCore::backward_step, py::arg("stream"), py::arg("H"), py::arg("m"),
           py::arg("indptr"), py::arg("indices"), py::arg("nnz"), py::arg("dA"), py::arg("dq"), py::arg("ds"),
           py::arg("projections"), py::arg("lr"), py::arg("weight_decay"), py::arg("grad_H"), py::arg("grad_H_known"))
      .def("poll", &CudaCore::poll, py::arg("stream"))
      .def("synchronize", &CudaCore::synchronize, py::arg("stream"))
      .def("refresh", &CudaCore::refresh, py::arg("stream"))
      .def("correct", &CudaCore::correct, py::arg("stream"))
      .def("inverse_error", &CudaCore::inverse_error, py::arg("stream"))
      .def_property("tf32", &CudaCore::tf32, &CudaCore::set_tf32)
      .def_property_readonly("workspace_bytes", &CudaCore::workspace_bytes)
      .def_readwrite("min_rcond", &CudaCore::min_rcond);
  def_stabilization(cuda_class, &CudaCore::stabilize);
}
