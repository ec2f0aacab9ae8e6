// pybind11 bindings of the CUDA backend (module sparsetarget._cuda, host code), mirror of ../cpu/bindings_cpu.cpp:
// the same FactoredCore (../bindings_common.h) over torch CUDA tensors instead of NumPy arrays. Each tensor's dtype,
// shape, device and contiguity are checked here with errors naming the argument; what only the device can see
// (NaN/inf, a target index out of range, a singular update) is recorded on the device and raised by a later call
// (see backend_cuda.cuh). Outputs are allocated by torch (its caching allocator). No maths here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "../bindings_common.h"
#include "../state.h"
#include "backend_cuda.cuh"
#include "factored_step_cuda.cuh"

namespace py = pybind11;

namespace sparsetarget::cuda {
namespace {

using AnyState = std::variant<FactoredState<float, float>, FactoredState<float, double>,
                              FactoredState<double, float>, FactoredState<double, double>>;

template <class T>
const char* torch_dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "torch.float32";
  if constexpr (std::is_same_v<T, double>) return "torch.float64";
  return "torch.int64";
}

std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// A CUDA tensor's memory, checked: dtype T, the expected shape (-1: any; the actual one in *shape_out if given),
// contiguous, on a CUDA device (the layer's, when device >= 0).
struct DeviceTensor {
  std::uintptr_t address = 0;
  std::vector<std::int64_t> shape;
  int device = 0;
};

DeviceTensor device_tensor(const py::handle& obj, const char* name) {
  if (!py::hasattr(obj, "data_ptr") || !py::hasattr(obj, "is_cuda"))
    throw py::type_error(std::string(name) + " must be a torch CUDA tensor, got " +
                         py::str(py::type::of(obj)).cast<std::string>());
  if (!obj.attr("is_cuda").cast<bool>()) throw py::value_error(std::string(name) + " must be on a CUDA device");
  DeviceTensor t;
  for (const auto& n : obj.attr("shape")) t.shape.push_back(n.cast<std::int64_t>());
  if (!obj.attr("is_contiguous")().cast<bool>()) throw py::value_error(std::string(name) + " must be contiguous");
  t.address = obj.attr("data_ptr")().cast<std::uintptr_t>();
  t.device = obj.attr("device").attr("index").cast<int>();
  return t;
}

template <class T>
T* checked(const py::handle& obj, const char* name, std::initializer_list<std::int64_t> shape, int device = -1,
           std::vector<std::int64_t>* shape_out = nullptr) {
  const DeviceTensor t = device_tensor(obj, name);
  if (device >= 0 && t.device != device)
    throw py::value_error(std::string(name) + " is on cuda:" + std::to_string(t.device) + ", the layer on cuda:" +
                          std::to_string(device));
  const std::string dtype = py::str(obj.attr("dtype")).cast<std::string>();
  if (dtype != torch_dtype_name<T>())
    throw py::type_error(std::string(name) + " must have dtype " + torch_dtype_name<T>() + ", got " + dtype);
  if (t.shape.size() != shape.size())
    throw py::value_error(std::string(name) + " must have " + std::to_string(shape.size()) +
                          " dimensions, got shape " + shape_str(t.shape));
  std::size_t i = 0;
  for (std::int64_t n : shape) {
    if (n >= 0 && t.shape[i] != n)
      throw py::value_error(std::string(name) + " has shape " + shape_str(t.shape) + ", expected dimension " +
                            std::to_string(i) + " to be " + std::to_string(n));
    ++i;
  }
  if (shape_out) *shape_out = t.shape;
  return reinterpret_cast<T*>(t.address);
}

// torch.empty(shape, dtype=like.dtype, device=like.device)
py::object empty_like_device(const py::handle& like, std::initializer_list<std::int64_t> shape) {
  static py::handle empty = py::object(py::module_::import("torch").attr("empty")).release();  // kept to exit
  py::tuple dims(shape.size());
  std::size_t i = 0;
  for (std::int64_t n : shape) dims[i++] = py::int_(n);
  return empty(dims, py::arg("dtype") = like.attr("dtype"), py::arg("device") = like.attr("device"));
}

class Core {
 public:
  Core(py::handle V, py::handle U, py::handle U_inv, py::handle Q, py::handle omega, py::handle w_bar,
       py::handle probe_max, py::handle probe_min, py::handle stats)
      : tensors_{py::reinterpret_borrow<py::object>(V),         py::reinterpret_borrow<py::object>(U),
                 py::reinterpret_borrow<py::object>(U_inv),     py::reinterpret_borrow<py::object>(Q),
                 py::reinterpret_borrow<py::object>(omega),     py::reinterpret_borrow<py::object>(w_bar),
                 py::reinterpret_borrow<py::object>(probe_max), py::reinterpret_borrow<py::object>(probe_min),
                 py::reinterpret_borrow<py::object>(stats)} {
    const DeviceTensor v = device_tensor(V, "V");
    if (v.shape.size() != 2 || v.shape[0] < 1 || v.shape[1] < 1)
      throw py::value_error("V must have at least one row and one column, got shape " + shape_str(v.shape));
    device_ = v.device;
    select_device();
    const std::string vt = py::str(V.attr("dtype")).cast<std::string>();
    const std::string ut = py::str(U.attr("dtype")).cast<std::string>();
    const bool v64 = vt == "torch.float64", s64 = ut == "torch.float64";
    if (!v64 && vt != "torch.float32") throw py::type_error("V must be float32 or float64, got " + vt);
    if (!s64 && ut != "torch.float32") throw py::type_error("U must be float32 or float64, got " + ut);
    if (!v64 && !s64) state_ = make<float, float>();
    if (!v64 && s64) state_ = make<float, double>();
    if (v64 && !s64) state_ = make<double, float>();
    if (v64 && s64) state_ = make<double, double>();
    stabilize_ = s64 ? default_stabilize_options<double>() : default_stabilize_options<float>();
    backend_.emplace();
    sync_step_count();
  }

  std::int64_t D() const { return std::visit([](const auto& s) { return s.D; }, state_); }
  int d() const { return std::visit([](const auto& s) { return s.d; }, state_); }

  py::tuple forward(const py::handle& H, const py::handle& indptr, const py::handle& indices, bool keep_projections) {
    enter();
    return std::visit([&](auto& st) -> py::tuple {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      const std::int64_t d = st.d;
      std::int64_t m = 0;
      const TS* h = checked_H<TS>(H, d, &m);
      const Targets t = targets(indptr, indices, m);
      py::object A = empty_like_device(H, {t.nnz}), q = empty_like_device(H, {m}), s = empty_like_device(H, {m});
      py::object UH = empty_like_device(H, {m, d}), HQ = empty_like_device(H, {m, d}), Hw = empty_like_device(H, {m});
      const ProjectionsView<TS> p = view<TS>(m, py::make_tuple(UH, HQ, q, s, Hw));
      project(*backend_, st, h, static_cast<int>(m), const_cast<TS*>(p.UH), const_cast<TS*>(p.HQ),
              const_cast<TS*>(p.q), const_cast<TS*>(p.s), const_cast<TS*>(p.Hw));
      gather_outputs(*backend_, st, p, t, checked<TS>(A, "A", {t.nnz}, device_));
      backend_->publish();
      if (!keep_projections) return py::make_tuple(A, q, s);
      return py::make_tuple(A, q, s, py::make_tuple(UH, HQ, q, s, Hw));
    }, state_);
  }

  py::object grad_hidden(const py::handle& H, const py::handle& indptr, const py::handle& indices,
                         const py::handle& dA, const py::handle& dq, const py::handle& ds,
                         const py::handle& projections) {
    enter();
    return std::visit([&](auto& st) -> py::object {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      const auto in = backward_inputs<TS>(st, H, indptr, indices, dA, dq, ds, projections);
      py::object grad_H = empty_like_device(H, {in.m, st.d});
      hidden_gradient(*backend_, st, in.t, in.p, in.dA, in.dq, in.ds,
                      checked<TS>(grad_H, "grad_H", {in.m, st.d}, device_));
      return grad_H;
    }, state_);
  }

  py::object backward_step(const py::handle& H, const py::handle& indptr, const py::handle& indices,
                           const py::handle& dA, const py::handle& dq, const py::handle& ds, double lr,
                           double weight_decay, const py::handle& projections, const py::handle& known_grad_H) {
    // lr and weight_decay are checked by the step itself (check_step_options), before anything is queued
    enter();
    return std::visit([&](auto& st) -> py::object {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      const auto in = backward_inputs<TS>(st, H, indptr, indices, dA, dq, ds, projections);
      const bool known = !known_grad_H.is_none();
      py::object grad_H = known ? py::reinterpret_borrow<py::object>(known_grad_H) : empty_like_device(H, {in.m, st.d});
      StepOptions opt;
      opt.lr = lr;
      opt.weight_decay = weight_decay;
      opt.min_rcond = min_rcond >= 0 ? min_rcond : default_min_rcond<TS>();
      sparsetarget::backward_step(*backend_, st, in.h, in.t, in.p, in.dA, in.dq, in.ds, opt,
                                  checked<TS>(grad_H, "grad_H", {in.m, st.d}, device_), known);
      after_step(*backend_, st, stabilize_, in.m);
      backend_->publish();
      return grad_H;
    }, state_);
  }

  void refresh() {
    enter_synchronized();
    std::visit([&](auto& st) { sparsetarget::refresh(*backend_, st); }, state_);
  }

  py::dict stabilize() {
    enter_synchronized();
    return report_dict(std::visit([&](auto& st) { return sparsetarget::correct(*backend_, st, stabilize_, true); }, state_));
  }

  double inverse_error() {
    enter_synchronized();
    return std::visit([&](const auto& st) { return sparsetarget::inverse_error(*backend_, st); }, state_);
  }

  // Waits for the layer's queued work and raises its error, if any.
  void synchronize() { enter_synchronized(); }
  // Raises the error of an earlier step, if the device has reported one by now (never waits otherwise).
  void poll() { enter(); }

  std::uintptr_t get_stream() const { return stream_; }
  void set_stream(std::uintptr_t s) { stream_ = s; }
  bool tf32() const { return backend_->blas.tf32(); }
  void set_tf32(bool on) {
    select_device();
    backend_->blas.set_tf32(on);
  }
  std::size_t workspace_bytes() const { return backend_->workspace_bytes(); }

  StabilizeOptions stabilize_;
  double min_rcond = -1;  // negative: the default for the state dtype

 private:
  template <class TV, class TS>
  FactoredState<TV, TS> make() {
    FactoredState<TV, TS> st;
    const DeviceTensor v = device_tensor(tensors_[0], "V");
    st.D = v.shape[0];
    st.d = static_cast<int>(v.shape[1]);
    const std::int64_t d = st.d;
    st.V = checked<TV>(tensors_[0], "V", {st.D, d}, device_);
    st.U = checked<TS>(tensors_[1], "U", {d, d}, device_);
    st.U_inv = checked<TS>(tensors_[2], "U_inv", {d, d}, device_);
    st.Q = checked<TS>(tensors_[3], "Q", {d, d}, device_);
    st.omega = checked<TS>(tensors_[4], "omega", {d}, device_);
    st.w_bar = checked<TS>(tensors_[5], "w_bar", {d}, device_);
    st.probe_max = checked<TS>(tensors_[6], "probe_max", {d}, device_);
    st.probe_min = checked<TS>(tensors_[7], "probe_min", {d}, device_);
    st.stats = checked<double>(tensors_[8], "stats", {kStatCount}, device_);
    return st;
  }

  // The inputs of grad_hidden and backward_step, checked.
  template <class TS>
  struct BackwardInputs {
    std::int64_t m;
    const TS* h;
    Targets t;
    ProjectionsView<TS> p;
    const TS *dA, *dq, *ds;
  };

  // Without projections (the engine always passes those of its forward), they are computed now into scratch.
  template <class TS, class State>
  BackwardInputs<TS> backward_inputs(const State& st, const py::handle& H, const py::handle& indptr,
                                     const py::handle& indices, const py::handle& dA, const py::handle& dq,
                                     const py::handle& ds, const py::handle& projections) {
    const std::int64_t d = st.d;
    std::int64_t m = 0;
    const TS* h = checked_H<TS>(H, d, &m);
    const Targets t = targets(indptr, indices, m);
    ProjectionsView<TS> p;
    if (projections.is_none()) {
      const std::size_t md = static_cast<std::size_t>(m) * d;
      TS *UH = backend_->scratch<TS>(kSlotUH, md), *HQ = backend_->scratch<TS>(kSlotHQ, md);
      TS *q = backend_->scratch<TS>(kSlotQ, m), *s = backend_->scratch<TS>(kSlotS, m);
      TS* Hw = backend_->scratch<TS>(kSlotHw, m);
      project(*backend_, st, h, static_cast<int>(m), UH, HQ, q, s, Hw);
      p = {static_cast<int>(m), UH, HQ, q, s, Hw};
    } else {
      p = view<TS>(m, projections);
    }
    return {m, h, t, p, checked<TS>(dA, "dA", {t.nnz}, device_), checked<TS>(dq, "dq", {m}, device_),
            checked<TS>(ds, "ds", {m}, device_)};
  }

  // H (m, d), checked once; m in [1, 2^31).
  template <class TS>
  const TS* checked_H(const py::handle& H, std::int64_t d, std::int64_t* m) const {
    std::vector<std::int64_t> shape;
    const TS* h = checked<TS>(H, "H", {-1, d}, device_, &shape);
    if (shape[0] < 1 || shape[0] > (std::int64_t{1} << 31) - 1)
      throw py::value_error("H must have between 1 and 2^31 - 1 rows, got shape " + shape_str(shape));
    *m = shape[0];
    return h;
  }

  Targets targets(const py::handle& indptr, const py::handle& indices, std::int64_t m) const {
    Targets t;
    t.m = m;
    t.indptr = checked<std::int64_t>(indptr, "targets indptr", {m + 1}, device_);
    std::vector<std::int64_t> shape;
    t.indices = checked<std::int64_t>(indices, "targets indices", {-1}, device_, &shape);
    t.nnz = shape[0];
    return t;
  }

  template <class TS>
  ProjectionsView<TS> view(std::int64_t m, const py::handle& projections) const {
    if (!py::isinstance<py::tuple>(projections) || py::len(projections) != 5)
      throw py::type_error("projections must be the tuple (UH, HQ, q, s, Hw) returned by forward");
    const auto p = py::reinterpret_borrow<py::tuple>(projections);
    const std::int64_t d = this->d();
    return {static_cast<int>(m), checked<TS>(p[0], "projections UH", {m, d}, device_),
            checked<TS>(p[1], "projections HQ", {m, d}, device_), checked<TS>(p[2], "projections q", {m}, device_),
            checked<TS>(p[3], "projections s", {m}, device_), checked<TS>(p[4], "projections Hw", {m}, device_)};
  }

  void select_device() const {
    int current = -1;
    check(cudaGetDevice(&current), "cudaGetDevice");
    if (current != device_) check(cudaSetDevice(device_), "cudaSetDevice");
  }

  // Every entry point: the right device, the caller's stream, and the error of an earlier step if known by now.
  void enter() {
    select_device();
    backend_->set_stream(reinterpret_cast<cudaStream_t>(stream_));
    if (backend_->published().error != kOk) {
      backend_->finish_pending();
      raise_reported();
    }
  }

  // The entry of the calls that wait for the device anyway: every queued step has run, so its error (if any) is
  // raised here rather than cleared by the work that follows.
  void enter_synchronized() {
    select_device();
    backend_->set_stream(reinterpret_cast<cudaStream_t>(stream_));
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
      backend_->set_steps(static_cast<std::int64_t>(backend_->download(st.stats + kStatSteps, 1)[0]));
    }, state_);
  }

  int device_ = 0;
  std::uintptr_t stream_ = 0;  // cudaStream_t of the caller (torch's current stream), set before each call
  std::vector<py::object> tensors_;  // keeps the state tensors alive
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

  py::class_<Core> core_class(m, "FactoredCore",
                              "In-place operations on the CUDA tensors of a factored layer W = V U + 1 omega^T.");
  def_factored_core(core_class);
  // The GPU's own: how much scratch memory the layer holds on the device.
  core_class.def_property_readonly("workspace_bytes", &Core::workspace_bytes, "Device scratch memory held, in bytes.");
}
