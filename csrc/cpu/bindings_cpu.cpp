// pybind11 bindings of the CPU backend (module sparsetarget._core): argument checks (each error names the argument
// and what was expected) and dispatch on the weight/state dtypes. No maths here. Mirror of ../cuda/bindings_cuda.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <variant>
#include <vector>

#include "../losses.h"
#include "../bindings_common.h"
#include "../state.h"
#include "blas_cpu.h"
#include "dense_tiles_cpu.h"
#include "factored_step_cpu.h"
#include "kernels_cpu.h"
#include "small_gemm_cpu.h"

namespace py = pybind11;
using namespace sparsetarget;
using cpu::cpu_backend;

namespace {

using AnyState = std::variant<FactoredState<float, float>, FactoredState<float, double>,
                              FactoredState<double, float>, FactoredState<double, double>>;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// dtype equivalence, not identity: an array that went through pickle (DataLoader workers, multiprocessing) carries
// a dtype equal to, but not the same object as, NumPy's cached one.
template <class T>
bool has_dtype(const py::array& a) {
  return py::detail::npy_api::get().PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<T>().ptr());
}

// Scratch above a size is released when a call returns, so that the m x m buffers of one huge minibatch do not
// stay resident (cpu::CpuBackend::release_large_scratch).
struct ReleaseLargeScratch {
  ReleaseLargeScratch() = default;
  ReleaseLargeScratch(const ReleaseLargeScratch&) = delete;
  ReleaseLargeScratch& operator=(const ReleaseLargeScratch&) = delete;
  ~ReleaseLargeScratch() { cpu_backend().release_large_scratch(); }
};

template <class T>
py::array_t<T> checked(const py::handle& obj, const char* name, std::initializer_list<py::ssize_t> shape,
                       bool writeable) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + " must be a numpy array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!has_dtype<T>(a))
    throw py::type_error(std::string(name) + " must have dtype " + py::str(py::dtype::of<T>()).cast<std::string>() +
                         ", got " + dtype_name(a));
  if (a.ndim() != static_cast<py::ssize_t>(shape.size()))
    throw py::value_error(std::string(name) + " must have " + std::to_string(shape.size()) + " dimensions, got shape " +
                          shape_str(a));
  py::ssize_t i = 0;
  for (py::ssize_t n : shape) {
    if (n >= 0 && a.shape(i) != n)
      throw py::value_error(std::string(name) + " has shape " + shape_str(a) + ", expected dimension " +
                            std::to_string(i) + " to be " + std::to_string(n));
    ++i;
  }
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (writeable && !a.writeable()) throw py::value_error(std::string(name) + " must be writeable");
  return py::reinterpret_borrow<py::array_t<T>>(a);
}

py::array as_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + " must be a numpy array");
  return py::reinterpret_borrow<py::array>(obj);
}

struct TargetArrays {
  py::array_t<std::int64_t> indptr, indices;
  Targets view;
};

TargetArrays checked_targets(const py::handle& indptr, const py::handle& indices, std::int64_t m, std::int64_t D) {
  TargetArrays t;
  t.indptr = checked<std::int64_t>(indptr, "targets indptr", {m + 1}, false);
  t.indices = checked<std::int64_t>(indices, "targets indices", {-1}, false);
  const std::int64_t* ip = t.indptr.data();
  const std::int64_t nnz = t.indices.shape(0);
  if (ip[0] != 0 || ip[m] != nnz)
    throw py::value_error("targets indptr must start at 0 and end at nnz = " + std::to_string(nnz));
  for (std::int64_t j = 0; j < m; ++j)
    if (ip[j + 1] < ip[j]) throw py::value_error("targets indptr must be non-decreasing (row " + std::to_string(j) + ")");
  const std::int64_t* idx = t.indices.data();
  for (std::int64_t e = 0; e < nnz; ++e)
    if (idx[e] < 0 || idx[e] >= D)
      throw py::value_error("targets index " + std::to_string(idx[e]) + " is out of range [0, " + std::to_string(D) +
                            ")");
  t.view.m = m;
  t.view.nnz = nnz;
  t.view.indptr = ip;
  t.view.indices = idx;
  return t;
}

// Class labels (m,) as CSR arrays: (indptr, indices, values (ones, float64), active (uint8 per row) or None when no
// row is ignore_index). One pass over the labels, into arrays of its own (the caller may change its labels later,
// even from another thread meanwhile); a label outside [0, D) that is not ignore_index raises ValueError naming the
// argument.
py::tuple class_targets(const py::handle& labels, std::int64_t D, std::int64_t ignore_index, const std::string& name) {
  auto y = checked<std::int64_t>(labels, name.c_str(), {-1}, false);
  const py::ssize_t m = y.shape(0);
  const std::int64_t* l = y.data();
  py::array_t<std::int64_t> indptr(m + 1), indices(m);
  py::array_t<std::uint8_t> active(m);
  std::int64_t* ip = indptr.mutable_data();
  std::int64_t* ix = indices.mutable_data();
  std::uint8_t* act = active.mutable_data();
  py::ssize_t kept = 0;
  ip[0] = 0;
  for (py::ssize_t j = 0; j < m; ++j) {
    const std::int64_t label = l[j];  // read once
    const bool on = label != ignore_index;
    if (on && (label < 0 || label >= D))
      throw py::value_error(name + " contains class " + std::to_string(label) + ", outside [0, " + std::to_string(D) +
                            ") and not ignore_index=" + std::to_string(ignore_index));
    if (on) ix[kept++] = label;
    act[j] = on;
    ip[j + 1] = kept;
  }
  py::array_t<double> values(kept);
  std::fill(values.mutable_data(), values.mutable_data() + kept, 1.0);
  if (kept == m) return py::make_tuple(indptr, indices, values, py::none());
  py::array_t<std::int64_t> kept_indices(kept);
  std::copy(ix, ix + kept, kept_indices.mutable_data());
  return py::make_tuple(indptr, kept_indices, values, active);
}

// The target values and the active mask of a built-in loss, checked; sets t.view.values.
struct LossTargets {
  py::array_t<double> values;
  py::array_t<std::uint8_t> active;
  bool has_active = false;  // false: every row is active

  LossTargets(TargetArrays& t, const py::handle& values_, const py::handle& active_, py::ssize_t m)
      : values(checked<double>(values_, "targets values", {t.indices.shape(0)}, false)) {
    if (!all_finite(values.data(), static_cast<std::size_t>(values.size())))
      throw py::value_error("targets values contain NaN or inf");
    t.view.values = values.data();
    has_active = !active_.is_none();
    if (has_active) active = checked<std::uint8_t>(active_, "active", {m}, false);
  }
  const std::uint8_t* active_ptr() const { return has_active ? active.data() : nullptr; }
};

// The projections of H (docs/algorithm.md §3) into this thread's scratch, valid until the next call on this thread.
template <class TV, class TS>
ProjectionsView<TS> project_into_scratch(const FactoredState<TV, TS>& st, const TS* H, int m) {
  auto& b = cpu_backend();
  const std::size_t md = static_cast<std::size_t>(m) * st.d;
  TS *UH = b.scratch<TS>(kSlotUH, md), *HQ = b.scratch<TS>(kSlotHQ, md), *q = b.scratch<TS>(kSlotQ, m),
     *s = b.scratch<TS>(kSlotS, m), *Hw = b.scratch<TS>(kSlotHw, m);
  project(b, st, H, m, UH, HQ, q, s, Hw);
  return {m, UH, HQ, q, s, Hw};
}

// A built-in loss at the projections p of H: the outputs at the target entries, the per-example losses and their
// partials dA (per entry), dq, ds.
template <class TV, class TS>
void loss_at(const FactoredState<TV, TS>& st, const ProjectionsView<TS>& p, const Targets& t, const LossTargets& lt,
             const LossSpec& spec, double* losses, TS* dA, TS* dq, TS* ds) {
  std::vector<TS> A(static_cast<std::size_t>(t.nnz));
  sparsetarget::gather_outputs(cpu_backend(), st, p, t, A.data());
  evaluate_loss(spec, st.D, t, lt.active_ptr(), A.data(), p.q, p.s, losses, dA, dq, ds);
}

// Inputs of grad_hidden / backward_step, checked: H, targets, the loss partials and optional projections of H.
template <class TS>
struct BackwardInputs {
  py::array_t<TS> h, dA, dq, ds;
  TargetArrays t;
  std::vector<py::array_t<TS>> given;  // UH, HQ, q, s, Hw from forward(keep_projections=True), or empty

  // The given projections, or those of H computed now into this thread's scratch.
  template <class State>
  ProjectionsView<TS> projections(const State& st) const {
    if (given.empty()) return project_into_scratch(st, h.data(), static_cast<int>(h.shape(0)));
    return {static_cast<int>(h.shape(0)), given[0].data(), given[1].data(), given[2].data(), given[3].data(),
            given[4].data()};
  }
};

class Core {
 public:
  Core(py::handle V_, py::handle U_, py::handle U_inv, py::handle Q, py::handle omega, py::handle w_bar,
       py::handle probe_max, py::handle probe_min, py::handle stats)
      : arrays_{as_array(V_, "V"),     as_array(U_, "U"),           as_array(U_inv, "U_inv"),
                as_array(Q, "Q"),      as_array(omega, "omega"),   as_array(w_bar, "w_bar"),
                as_array(probe_max, "probe_max"), as_array(probe_min, "probe_min"), as_array(stats, "stats")} {
    const py::array& V = arrays_[0];
    const py::array& U = arrays_[1];
    const bool v32 = has_dtype<float>(V), v64 = has_dtype<double>(V);
    const bool s32 = has_dtype<float>(U), s64 = has_dtype<double>(U);
    if (!v32 && !v64) throw py::type_error("V must be float32 or float64, got " + dtype_name(V));
    if (!s32 && !s64) throw py::type_error("U must be float32 or float64, got " + dtype_name(U));
    if (v32 && s32) state_ = make<float, float>();
    if (v32 && s64) state_ = make<float, double>();
    if (v64 && s32) state_ = make<double, float>();
    if (v64 && s64) state_ = make<double, double>();
    stabilize_ = s64 ? default_stabilize_options<double>() : default_stabilize_options<float>();
  }

  std::int64_t D() const { return std::visit([](const auto& s) { return s.D; }, state_); }
  int d() const { return std::visit([](const auto& s) { return s.d; }, state_); }

  // (A, q, s), plus the projections (UH, HQ, q, s, Hw) of H when keep_projections: a later grad_hidden or
  // backward_step on the same H and unchanged state can take them instead of recomputing them.
  py::tuple forward(const py::handle& H, const py::handle& indptr, const py::handle& indices, bool keep_projections) {
    return std::visit([&](auto& st) -> py::tuple {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      auto h = checked_H<TS>(H);
      const py::ssize_t m = h.shape(0), d = st.d;
      auto t = checked_targets(indptr, indices, m, st.D);
      py::array_t<TS> A(t.indices.shape(0)), q(m), s(m), UH, HQ, Hw;
      if (keep_projections) {
        UH = py::array_t<TS>({m, d});
        HQ = py::array_t<TS>({m, d});
        Hw = py::array_t<TS>(m);
      }
      {
        py::gil_scoped_release release;
        const ReleaseLargeScratch release_scratch;
        auto& b = cpu_backend();
        const int rows = static_cast<int>(m);
        ProjectionsView<TS> p;
        if (keep_projections) {
          project(b, st, h.data(), rows, UH.mutable_data(), HQ.mutable_data(), q.mutable_data(), s.mutable_data(),
                  Hw.mutable_data());
          p = {rows, UH.data(), HQ.data(), q.data(), s.data(), Hw.data()};
        } else {
          p = project_into_scratch(st, h.data(), rows);
          std::copy(p.q, p.q + m, q.mutable_data());
          std::copy(p.s, p.s + m, s.mutable_data());
        }
        sparsetarget::gather_outputs(b, st, p, t.view, A.mutable_data());
      }
      if (!keep_projections) return py::make_tuple(A, q, s);
      return py::make_tuple(A, q, s, py::make_tuple(UH, HQ, q, s, Hw));
    }, state_);
  }

  // Loss only (step=false) or loss + exact SGD step (step=true). Returns losses or (losses, grad_H).
  py::object loss_step(const py::handle& H, const py::handle& indptr, const py::handle& indices,
                       const py::handle& values, const py::handle& active, const LossSpec& spec, bool do_step,
                       double lr, double weight_decay) {
    if (do_step) check_step_options(lr, weight_decay);
    return std::visit([&](auto& st) -> py::object {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      auto h = checked_H<TS>(H);
      const auto m = h.shape(0);
      auto t = checked_targets(indptr, indices, m, st.D);
      const LossTargets lt(t, values, active, m);
      py::array_t<double> losses(m);
      py::array_t<TS> grad_H({m, static_cast<py::ssize_t>(st.d)});
      {
        py::gil_scoped_release release;
        const ReleaseLargeScratch release_scratch;
        auto& b = cpu_backend();
        const auto p = project_into_scratch(st, h.data(), static_cast<int>(m));
        std::vector<TS> dA(t.indices.shape(0)), dq(m), ds(m);
        loss_at(st, p, t.view, lt, spec, losses.mutable_data(), dA.data(), dq.data(), ds.data());
        if (do_step) {
          sparsetarget::backward_step(b, st, h.data(), t.view, p, dA.data(), dq.data(), ds.data(),
                                      step_options(lr, weight_decay), grad_H.mutable_data());
          after_step(b, st, stabilize_, m);
        }
      }
      if (!do_step) return losses;
      return py::make_tuple(losses, grad_H);
    }, state_);
  }

  // A built-in loss and everything a backward pass and a later step need, in one pass over the state: (losses
  // (float64), dL/dA per entry, dL/dq, dL/ds, the projections (UH, HQ, q, s, Hw) of H, grad_H = dL/dH or None).
  // grad_H is computed only with_grad. No state change.
  py::tuple loss_gradient(const py::handle& H, const py::handle& indptr, const py::handle& indices,
                          const py::handle& values, const py::handle& active, const LossSpec& spec, bool with_grad,
                          bool copy_hidden) {
    return std::visit([&](auto& st) -> py::tuple {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      auto h = checked_H<TS>(H);
      const py::ssize_t m = h.shape(0), d = st.d;
      auto t = checked_targets(indptr, indices, m, st.D);
      const LossTargets lt(t, values, active, m);
      const py::ssize_t nnz = t.indices.shape(0);
      py::array_t<double> losses(m);
      py::array_t<TS> dA(nnz), dq(m), ds(m), UH({m, d}), HQ({m, d}), q(m), s(m), Hw(m);
      py::object grad_H = py::none(), H_copy = py::none();
      if (with_grad) grad_H = py::array_t<TS>({m, d});
      if (copy_hidden) H_copy = py::array_t<TS>({m, d});
      TS* grad_out = with_grad ? py::cast<py::array_t<TS>>(grad_H).mutable_data() : nullptr;
      TS* copy_out = copy_hidden ? py::cast<py::array_t<TS>>(H_copy).mutable_data() : nullptr;
      double total = 0;
      {
        py::gil_scoped_release release;
        const ReleaseLargeScratch release_scratch;
        auto& b = cpu_backend();
        project(b, st, h.data(), static_cast<int>(m), UH.mutable_data(), HQ.mutable_data(), q.mutable_data(),
                s.mutable_data(), Hw.mutable_data());
        const ProjectionsView<TS> p{static_cast<int>(m), UH.data(), HQ.data(), q.data(), s.data(), Hw.data()};
        loss_at(st, p, t.view, lt, spec, losses.mutable_data(), dA.mutable_data(), dq.mutable_data(),
                ds.mutable_data());
        total = std::accumulate(losses.data(), losses.data() + m, 0.0);
        if (with_grad)
          sparsetarget::hidden_gradient(b, st, t.view, p, dA.data(), dq.data(), ds.data(), grad_out);
        if (copy_hidden) std::copy(h.data(), h.data() + m * d, copy_out);
      }
      return py::make_tuple(losses, dA, dq, ds, py::make_tuple(UH, HQ, q, s, Hw), grad_H, total, H_copy);
    }, state_);
  }

  // grad_H for a loss with partials (dA, dq, ds), no state change.
  py::array grad_hidden(const py::handle& H, const py::handle& indptr, const py::handle& indices,
                           const py::handle& dA, const py::handle& dq, const py::handle& ds,
                           const py::handle& projections) const {
    return std::visit([&](const auto& st) -> py::array {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      auto in = checked_backward_inputs<TS>(st, H, indptr, indices, dA, dq, ds, projections);
      py::array_t<TS> grad_H({in.h.shape(0), static_cast<py::ssize_t>(st.d)});
      {
        py::gil_scoped_release release;
        const ReleaseLargeScratch release_scratch;
        sparsetarget::hidden_gradient(cpu_backend(), st, in.t.view, in.projections(st), in.dA.data(), in.dq.data(),
                                      in.ds.data(), grad_H.mutable_data());
      }
      return grad_H;
    }, state_);
  }

  py::array backward_step(const py::handle& H, const py::handle& indptr, const py::handle& indices,
                             const py::handle& dA, const py::handle& dq, const py::handle& ds, double lr,
                             double weight_decay, const py::handle& projections, const py::handle& known_grad_H) {
    return std::visit([&](auto& st) -> py::array {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      auto in = checked_backward_inputs<TS>(st, H, indptr, indices, dA, dq, ds, projections);
      const py::ssize_t m = in.h.shape(0), d = st.d;
      const bool known = !known_grad_H.is_none();
      if (known && in.given.empty())
        throw py::value_error("grad_H can only be reused together with the projections it was computed from");
      // A known grad_H is only read by the step (as on the GPU), so it is used in place and returned as given.
      py::array_t<TS> grad_H;
      TS* grad_out = nullptr;
      if (known) {
        grad_H = checked<TS>(known_grad_H, "grad_H", {m, d}, false);
        if (!all_finite(grad_H.data(), static_cast<std::size_t>(grad_H.size())))
          throw py::value_error("grad_H contains NaN or inf");
        grad_out = const_cast<TS*>(grad_H.data());  // read only: backward_step writes grad_H only when not known
      } else {
        grad_H = py::array_t<TS>({m, d});
        grad_out = grad_H.mutable_data();
      }
      {
        py::gil_scoped_release release;
        const ReleaseLargeScratch release_scratch;
        auto& b = cpu_backend();
        sparsetarget::backward_step(b, st, in.h.data(), in.t.view, in.projections(st), in.dA.data(), in.dq.data(),
                                    in.ds.data(), step_options(lr, weight_decay), grad_out, known);
        after_step(b, st, stabilize_, m);
      }
      return grad_H;
    }, state_);
  }

  void refresh() {
    std::visit([&](auto& st) {
      py::gil_scoped_release release;
      sparsetarget::refresh(cpu_backend(), st);
    }, state_);
  }

  py::dict stabilize() {
    CorrectionReport r = std::visit([&](auto& st) {
      py::gil_scoped_release release;
      return sparsetarget::correct(cpu_backend(), st, stabilize_, true);
    }, state_);
    return report_dict(r);
  }

  double inverse_error() const {
    return std::visit([](const auto& st) { return sparsetarget::inverse_error(cpu_backend(), st); }, state_);
  }

  py::array weight_rows_py(std::int64_t start, std::int64_t stop) const {
    return std::visit([&](const auto& st) -> py::array {
      using TV = typename std::decay_t<decltype(st)>::weight_type;
      check_range(start, stop, st.D);
      py::array_t<TV> out({static_cast<py::ssize_t>(stop - start), static_cast<py::ssize_t>(st.d)});
      {
        py::gil_scoped_release release;
        weight_rows(st, start, stop, out.mutable_data());
      }
      return out;
    }, state_);
  }

  py::array logits_py(const py::handle& H, std::int64_t start, std::int64_t stop) const {
    return std::visit([&](const auto& st) -> py::array {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      auto h = checked_H<TS>(H);
      check_range(start, stop, st.D);
      py::array_t<TS> out({h.shape(0), static_cast<py::ssize_t>(stop - start)});
      {
        py::gil_scoped_release release;
        logits(st, h.data(), static_cast<int>(h.shape(0)), start, stop, out.mutable_data());
      }
      return out;
    }, state_);
  }

  py::tuple topk_py(const py::handle& H, int k, const std::string& rank) const {
    const TopkRank how = rank == "output" ? TopkRank::Output
                         : rank == "square" ? TopkRank::Square
                         : rank == "taylor" ? TopkRank::Taylor
                                            : throw py::value_error("rank must be 'output', 'square' or 'taylor', got '" + rank + "'");
    return std::visit([&](const auto& st) -> py::tuple {
      using TS = typename std::decay_t<decltype(st)>::state_type;
      auto h = checked_H<TS>(H);
      if (k < 1 || k > st.D) throw py::value_error("k must be in [1, D=" + std::to_string(st.D) + "], got " + std::to_string(k));
      py::array_t<TS> values({h.shape(0), static_cast<py::ssize_t>(k)});
      py::array_t<std::int64_t> indices({h.shape(0), static_cast<py::ssize_t>(k)});
      {
        py::gil_scoped_release release;
        topk(st, h.data(), static_cast<int>(h.shape(0)), k, how, values.mutable_data(), indices.mutable_data());
      }
      return py::make_tuple(values, indices);
    }, state_);
  }

  // Nothing is asynchronous on the CPU: errors are raised by the call that meets them.
  void synchronize() const {}
  void poll() const {}
  std::uintptr_t get_stream() const { return 0; }
  void set_stream(std::uintptr_t) {}
  bool tf32() const { return false; }
  void set_tf32(bool) {}

  StabilizeOptions stabilize_;
  double min_rcond = -1;  // negative: the default for the state dtype (sqrt of its machine epsilon)

 private:
  template <class TV, class TS>
  FactoredState<TV, TS> make() {
    FactoredState<TV, TS> st;
    auto V = checked<TV>(arrays_[0], "V", {-1, -1}, true);
    st.D = V.shape(0);
    st.d = static_cast<int>(V.shape(1));
    if (st.D < 1 || st.d < 1) throw py::value_error("V must have at least one row and one column, got " + shape_str(V));
    const py::ssize_t d = st.d;
    st.V = V.mutable_data();
    st.U = checked<TS>(arrays_[1], "U", {d, d}, true).mutable_data();
    st.U_inv = checked<TS>(arrays_[2], "U_inv", {d, d}, true).mutable_data();
    st.Q = checked<TS>(arrays_[3], "Q", {d, d}, true).mutable_data();
    st.omega = checked<TS>(arrays_[4], "omega", {d}, true).mutable_data();
    st.w_bar = checked<TS>(arrays_[5], "w_bar", {d}, true).mutable_data();
    st.probe_max = checked<TS>(arrays_[6], "probe_max", {d}, true).mutable_data();
    st.probe_min = checked<TS>(arrays_[7], "probe_min", {d}, true).mutable_data();
    st.stats = checked<double>(arrays_[8], "stats", {kStatCount}, true).mutable_data();
    return st;
  }

  template <class TS>
  py::array_t<TS> checked_H(const py::handle& H) const {
    auto h = checked<TS>(H, "H", {-1, d()}, false);
    if (h.shape(0) < 1) throw py::value_error("H must have at least one row");
    if (!all_finite(h.data(), static_cast<std::size_t>(h.size()))) throw py::value_error("H contains NaN or inf");
    return h;
  }

  template <class TS, class State>
  BackwardInputs<TS> checked_backward_inputs(const State& st, const py::handle& H, const py::handle& indptr,
                                             const py::handle& indices, const py::handle& dA, const py::handle& dq,
                                             const py::handle& ds, const py::handle& projections) const {
    BackwardInputs<TS> in;
    in.h = checked_H<TS>(H);
    const py::ssize_t m = in.h.shape(0), d = st.d;
    in.t = checked_targets(indptr, indices, m, st.D);
    in.dA = checked<TS>(dA, "dA", {in.t.indices.shape(0)}, false);
    in.dq = checked<TS>(dq, "dq", {m}, false);
    in.ds = checked<TS>(ds, "ds", {m}, false);
    if (!all_finite(in.dA.data(), in.dA.size())) throw py::value_error("dA contains NaN or inf");
    if (!all_finite(in.dq.data(), in.dq.size())) throw py::value_error("dq contains NaN or inf");
    if (!all_finite(in.ds.data(), in.ds.size())) throw py::value_error("ds contains NaN or inf");
    if (!projections.is_none()) {
      auto parts = py::reinterpret_borrow<py::tuple>(projections);
      if (!py::isinstance<py::tuple>(projections) || parts.size() != 5)
        throw py::type_error("projections must be the tuple (UH, HQ, q, s, Hw) returned by forward");
      in.given.push_back(checked<TS>(parts[0], "projections UH", {m, d}, false));
      in.given.push_back(checked<TS>(parts[1], "projections HQ", {m, d}, false));
      in.given.push_back(checked<TS>(parts[2], "projections q", {m}, false));
      in.given.push_back(checked<TS>(parts[3], "projections s", {m}, false));
      in.given.push_back(checked<TS>(parts[4], "projections Hw", {m}, false));
    }
    return in;
  }

  static void check_range(std::int64_t start, std::int64_t stop, std::int64_t D) {
    if (start < 0 || stop > D || start > stop)
      throw py::value_error("row range [" + std::to_string(start) + ", " + std::to_string(stop) + ") is not within [0, " +
                            std::to_string(D) + "]");
  }


  StepOptions step_options(double lr, double weight_decay) const {
    StepOptions o;
    o.lr = lr;
    o.weight_decay = weight_decay;
    const bool single = std::visit([](const auto& s) { return std::is_same_v<typename std::decay_t<decltype(s)>::state_type, float>; }, state_);
    o.min_rcond = min_rcond >= 0 ? min_rcond : (single ? default_min_rcond<float>() : default_min_rcond<double>());
    return o;
  }

  std::vector<py::array> arrays_;  // keeps the caller's buffers alive
  AnyState state_;
};

}  // namespace

// C <- alpha op(A) op(B) + beta C (product) or C <- alpha (A^T B + B^T A) + beta C, both triangles (sym_rank2k), on
// C-contiguous float32 or float64 arrays, by the vendor BLAS ("vendor") or the core's own loops ("own",
// small_gemm_cpu.h, one thread) whatever the shape, or as the step calls them ("step": blas::gemm / blas::sym_rank2k,
// which choose by shape, e.g. the one-pass rows of a rank-1 or rank-2 update, and may split over the core's
// threads): the tests check the loops on every path against NumPy, and benchmarks/bench_small_gemm.py times one
// against the other.
template <class T>
void routed_product(py::array a_arr, py::array b_arr, py::array c_arr, bool ta, bool tb, double alpha, double beta,
                    const std::string& route) {
  const auto a = a_arr.cast<py::array_t<T, py::array::c_style>>(), b = b_arr.cast<py::array_t<T, py::array::c_style>>();
  auto c = c_arr.cast<py::array_t<T, py::array::c_style>>();
  const int m = static_cast<int>(c.shape(0)), n = static_cast<int>(c.shape(1));
  const int k = static_cast<int>(ta ? a.shape(0) : a.shape(1));
  if ((ta ? a.shape(1) : a.shape(0)) != m || (tb ? b.shape(1) : b.shape(0)) != k || (tb ? b.shape(0) : b.shape(1)) != n)
    throw std::invalid_argument("a, b and c have shapes that do not make c = op(a) op(b)");
  const Op oa = ta ? Op::T : Op::N, ob = tb ? Op::T : Op::N;
  const T* ap = a.data();
  const T* bp = b.data();
  T* cp = c.mutable_data();
  const int lda = static_cast<int>(a.shape(1)), ldb = static_cast<int>(b.shape(1));
  py::gil_scoped_release release;
  if (route == "own")
    blas::small::gemm<T>(oa, ob, m, n, k, T(alpha), ap, lda, bp, ldb, T(beta), cp, n);
  else if (route == "step")
    blas::gemm<T>(oa, ob, m, n, k, T(alpha), ap, lda, bp, ldb, T(beta), cp, n);
  else
    blas::vendor_gemm<T>(oa, ob, m, n, k, T(alpha), ap, lda, bp, ldb, T(beta), cp, n);
}

template <class T>
void routed_sym_rank2k(py::array a_arr, py::array b_arr, py::array c_arr, double alpha, double beta,
                       const std::string& route) {
  const auto a = a_arr.cast<py::array_t<T, py::array::c_style>>(), b = b_arr.cast<py::array_t<T, py::array::c_style>>();
  auto c = c_arr.cast<py::array_t<T, py::array::c_style>>();
  const int k = static_cast<int>(a.shape(0)), n = static_cast<int>(a.shape(1));
  if (b.shape(0) != k || b.shape(1) != n || c.shape(0) != n || c.shape(1) != n)
    throw std::invalid_argument("a and b must be k x n and c n x n");
  const T* ap = a.data();
  const T* bp = b.data();
  T* cp = c.mutable_data();
  py::gil_scoped_release release;
  if (route == "step") {  // both triangles already
    blas::sym_rank2k<T>(n, k, T(alpha), ap, n, bp, n, T(beta), cp, n);
    return;
  }
  if (route == "own")
    blas::small::syr2k_upper_block<T>(0, n, k, T(alpha), ap, n, bp, n, T(beta), cp, n);
  else
    blas::syr2k_t<T>(n, k, T(alpha), ap, n, bp, n, T(beta), cp, n);
  blas::mirror_upper<T>(n, cp, n);
}

// The two above for either dtype; every array must already have it, be 2-D, C-contiguous, and c writeable.
template <class F64, class F32>
void by_dtype(const char* what, py::array a, py::array b, py::array c, const std::string& route, const F64& f64,
              const F32& f32) {
  if (route != "own" && route != "vendor" && route != "step")
    throw std::invalid_argument("route must be 'own', 'vendor' or 'step'");
  for (const py::array* x : {&a, &b, &c})
    if (x->ndim() != 2 || !(x->flags() & py::array::c_style) || !x->dtype().is(c.dtype()))
      throw std::invalid_argument(std::string(what) + ": a, b and c must be 2-D C-contiguous arrays of one dtype");
  if (!c.writeable()) throw std::invalid_argument(std::string(what) + ": c must be writeable");
  if (c.dtype().is(py::dtype::of<double>()))
    f64();
  else if (c.dtype().is(py::dtype::of<float>()))
    f32();
  else
    throw std::invalid_argument(std::string(what) + ": the dtype must be float32 or float64");
}

// The inverse of a square matrix as the step forms it (getrf, then the blocked substitution applied to the identity)
// and LAPACK's reciprocal condition estimate (0 when singular); a is not changed. For tests.
template <class T>
py::tuple inverse_of(const py::array& a_arr) {
  const auto a = a_arr.cast<py::array_t<T, py::array::c_style>>();
  const int n = static_cast<int>(a.shape(0));
  std::vector<T> factors(a.data(), a.data() + static_cast<std::size_t>(n) * n);
  py::array_t<T> inverse({n, n});
  T* out = inverse.mutable_data();
  double rcond = 0;
  {
    py::gil_scoped_release release;
    rcond = blas::invert_into<T>(n, factors.data(), out, true);
  }
  return py::make_tuple(inverse, rcond);
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "sparsetarget C++ core: exact factored training of large sparse-target output layers";
  m.attr("__version__") = SPARSETARGET_VERSION;

  // Translators run newest first: the subclass must be registered after its base.
  py::register_exception<std::domain_error>(m, "DomainError", PyExc_ValueError);
  py::register_exception<SingularUpdateError>(m, "SingularUpdateError", PyExc_ValueError);

  m.def("build_info", [] {
    py::dict info;
    info["version"] = SPARSETARGET_VERSION;
    info["blas"] = SPARSETARGET_BLAS_NAME;
    info["cuda"] = static_cast<bool>(SPARSETARGET_CUDA_BUILT);
    info["compiler"] = __VERSION__;
    info["cxx_standard"] = __cplusplus;
    info["blas_threads"] = blas::get_num_threads();
    const auto level = blas::small::level();
    info["small_gemm"] = level == blas::small::Level::kAvx512 ? "avx512" : level == blas::small::Level::kAvx2 ? "avx2"
                                                                                                            : "off";
    info["small_gemm_scope"] = blas::small::scope();
    info["blas_kernel"] = blas::vendor_kernel();
    return info;
  }, "How this _core was built: version, BLAS, compiler, CUDA support, and the vector width of its own products.");
  m.attr("DEFAULT_STABILIZATION") = policy_dict(StabilizeOptions{});
  m.def("default_min_rcond", [](bool float64) {
    return float64 ? default_min_rcond<double>() : default_min_rcond<float>();
  }, py::arg("float64"), "The default min_rcond of a state dtype: sqrt of its machine epsilon.");
  m.def("default_sigma_range", [](bool float64) {
    const StabilizeOptions o = float64 ? default_stabilize_options<double>() : default_stabilize_options<float>();
    return py::make_tuple(o.sigma_low, o.sigma_high);
  }, py::arg("float64"), "The default sigma_range (low, high) of a state dtype.");
  m.def("class_targets", &class_targets, py::arg("labels"), py::arg("D"), py::arg("ignore_index"), py::arg("name"),
        "Class labels (int64, (m,)) as CSR arrays (indptr, indices, values, active or None), checked against [0, D) "
        "and ignore_index.");
  m.def("_product", [](py::array a, py::array b, py::array c, bool ta, bool tb, double alpha, double beta,
                       const std::string& route) {
    by_dtype("_product", a, b, c, route, [&] { routed_product<double>(a, b, c, ta, tb, alpha, beta, route); },
             [&] { routed_product<float>(a, b, c, ta, tb, alpha, beta, route); });
  }, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("trans_a"), py::arg("trans_b"), py::arg("alpha"),
        py::arg("beta"), py::arg("route"),
        "c <- alpha op(a) op(b) + beta c by the vendor BLAS or the core's own loops ('vendor' or 'own'), one thread, "
        "or as the step chooses ('step') (tests and benchmarks).");
  m.def("_sym_rank2k", [](py::array a, py::array b, py::array c, double alpha, double beta, const std::string& route) {
    by_dtype("_sym_rank2k", a, b, c, route, [&] { routed_sym_rank2k<double>(a, b, c, alpha, beta, route); },
             [&] { routed_sym_rank2k<float>(a, b, c, alpha, beta, route); });
  }, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("alpha"), py::arg("beta"), py::arg("route"),
        "c <- alpha (a^T b + b^T a) + beta c, both triangles, by the vendor BLAS (split over the core's threads), "
        "the core's own loops (one thread) or as the step chooses ('step').");
  m.def("_inverse", [](const py::array& a) {
    if (a.ndim() != 2 || a.shape(0) != a.shape(1) || !(a.flags() & py::array::c_style))
      throw std::invalid_argument("_inverse: a must be a square C-contiguous matrix");
    if (a.dtype().is(py::dtype::of<double>())) return inverse_of<double>(a);
    if (a.dtype().is(py::dtype::of<float>())) return inverse_of<float>(a);
    throw std::invalid_argument("_inverse: the dtype must be float32 or float64");
  }, py::arg("a"), "(inverse, rcond) of a square matrix as the step inverts its small systems (tests).");
  m.def("set_num_threads", &blas::set_num_threads, py::arg("n"), py::arg("passes") = true,
        "Set the number of threads the core splits its products over (n >= 1; each part is a single-threaded "
        "BLAS call); with passes, also for the long passes over V (refresh, correction, logits, top-k).");
  m.def("get_num_threads", &blas::get_num_threads, "Number of threads the core splits a step's products over.");
  m.def("get_pass_threads", &blas::get_pass_threads,
        "Number of threads for the long passes over V (refresh, correction, logits, top-k).");

  py::class_<LossSpec>(m, "LossSpec", "A built-in loss and its options (see make_loss_spec).")
      .def_readonly("eps", &LossSpec::eps)
      .def_readonly("a", &LossSpec::a)
      .def_readonly("b", &LossSpec::b);
  m.def("make_loss_spec", &make_loss_spec, py::arg("name"), py::arg("eps"), py::arg("a"), py::arg("b"),
        "Check a loss name and its options; raises ValueError naming a bad option.");

  py::class_<Core> core_class(m, "FactoredCore", "In-place operations on the arrays of a factored layer W = V U + 1 omega^T.");
  def_factored_core(core_class);
  // The CPU's own: the built-in losses evaluated in C++ (the NumPy API's loss and step) and the dense views.
  core_class
      .def("loss", [](Core& c, py::handle H, py::handle ip, py::handle ix, py::handle v, py::handle act, const LossSpec& s) {
             return c.loss_step(H, ip, ix, v, act, s, false, 0, 0);
           }, py::arg("H"), py::arg("indptr"), py::arg("indices"), py::arg("values"), py::arg("active"), py::arg("spec"),
           "Per-example losses (float64), no state change.")
      .def("step", [](Core& c, py::handle H, py::handle ip, py::handle ix, py::handle v, py::handle act, const LossSpec& s,
                      double lr, double wd) { return c.loss_step(H, ip, ix, v, act, s, true, lr, wd); },
           py::arg("H"), py::arg("indptr"), py::arg("indices"), py::arg("values"), py::arg("active"), py::arg("spec"),
           py::arg("lr"), py::arg("weight_decay"), "(losses, grad_H) and one exact SGD step on the summed loss.")
      .def("loss_gradient", &Core::loss_gradient, py::arg("H"), py::arg("indptr"), py::arg("indices"),
           py::arg("values"), py::arg("active"), py::arg("spec"), py::arg("with_grad"), py::arg("copy_hidden") = false,
           "(losses (float64), dL/dA per entry, dL/dq, dL/ds, projections, grad_H or None, the losses' sum, a copy of "
           "H or None) of a built-in loss in one pass; projections and grad_H can be passed to backward_step. No "
           "state change.")
      .def("weight_rows", &Core::weight_rows_py, py::arg("start"), py::arg("stop"), "Dense rows W[start:stop].")
      .def("logits", &Core::logits_py, py::arg("H"), py::arg("start"), py::arg("stop"), "H W[start:stop]^T, tiled.")
      .def("topk", &Core::topk_py, py::arg("H"), py::arg("k"), py::arg("rank") = "output",
           "(outputs, indices) of the k best outputs per row, ranked by the output ('output'), its square ('square') "
           "or 1 + o + o^2/2 ('taylor').");

  py::enum_<Stat>(m, "Stat", "Indices into the stats array.")
      .value("steps", kStatSteps)
      .value("corrections", kStatCorrections)
      .value("corrected_values", kStatCorrectedValues)
      .value("refreshes", kStatRefreshes)
      .value("sigma_max", kStatSigmaMax)
      .value("sigma_min", kStatSigmaMin)
      .value("inverse_residual", kStatInverseResidual);
  m.attr("STATS_SIZE") = static_cast<int>(kStatCount);
}
