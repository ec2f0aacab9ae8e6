// What the CPU module (_core) and the CUDA module (_cuda) bind alike: the class FactoredCore with the same method
// names, argument order and docstrings (one definition here), its stabilisation policy as properties, and a
// correction's report as a dict. Arrays are the backend's own kind: NumPy arrays for _core, torch CUDA tensors for
// _cuda.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "stabilize_policy.h"

namespace sparsetarget {

template <class Core, class T>
void def_stabilization_option(pybind11::class_<Core>& cls, const char* name, StabilizeOptions Core::*options,
                              T StabilizeOptions::*field) {
  cls.def_property(name, [options, field](const Core& c) { return (c.*options).*field; },
                   [options, field](Core& c, T value) { (c.*options).*field = value; });
}

// The fields of StabilizeOptions, for the lists below.
#define ST_STABILIZATION_FIELDS(X) X(sigma_low) X(sigma_high) X(inverse_tol) X(check_every) X(refresh_every)

// Each field of the core's StabilizeOptions member as a property of the same name.
template <class Core>
void def_stabilization(pybind11::class_<Core>& cls, StabilizeOptions Core::*options) {
#define ST_DEF_OPTION(field) def_stabilization_option(cls, #field, options, &StabilizeOptions::field);
  ST_STABILIZATION_FIELDS(ST_DEF_OPTION)
#undef ST_DEF_OPTION
}

// A policy as a dict of its fields (the defaults that the Python front ends take).
inline pybind11::dict policy_dict(const StabilizeOptions& options) {
  pybind11::dict out;
#define ST_POLICY_ITEM(field) out[#field] = options.field;
  ST_STABILIZATION_FIELDS(ST_POLICY_ITEM)
#undef ST_POLICY_ITEM
  return out;
}

// What a correction did, as the dict that stabilize() returns.
inline pybind11::dict report_dict(const CorrectionReport& r) {
  pybind11::dict out;
  out["corrected"] = r.corrected;
  out["values_corrected"] = r.values_corrected;
  out["sigma_max_before"] = r.sigma_max_before;
  out["sigma_min_before"] = r.sigma_min_before;
  out["sigma_max_after"] = r.sigma_max_after;
  out["sigma_min_after"] = r.sigma_min_after;
  return out;
}

// The methods and properties every backend's FactoredCore binds (each backend may add its own after these).
template <class Core>
void def_factored_core(pybind11::class_<Core>& cls) {
  namespace py = pybind11;
  cls.def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle,
                   py::handle>(),
          py::arg("V"), py::arg("U"), py::arg("U_inv"), py::arg("Q"), py::arg("omega"), py::arg("w_bar"),
          py::arg("probe_max"), py::arg("probe_min"), py::arg("stats"),
          "Work in place on the state arrays of W = V U + 1 omega^T (C-contiguous, writeable; V float32/float64, "
          "the rest in the state dtype, stats float64).")
      .def_property_readonly("D", &Core::D, "Number of outputs (rows of V).")
      .def_property_readonly("d", &Core::d, "Hidden size (columns of V).")
      .def("forward", &Core::forward, py::arg("H"), py::arg("indptr"), py::arg("indices"),
           py::arg("keep_projections") = false,
           "(A, q, s): outputs at the target entries, ||o||^2 and sum(o) per row; with keep_projections, "
           "(A, q, s, projections) where projections can be passed to grad_hidden and backward_step.")
      .def("grad_hidden", &Core::grad_hidden, py::arg("H"), py::arg("indptr"), py::arg("indices"), py::arg("dA"),
           py::arg("dq"), py::arg("ds"), py::arg("projections") = py::none(),
           "grad_H = dL/dH for a loss with the given partial derivatives; no state change.")
      .def("backward_step", &Core::backward_step, py::arg("H"), py::arg("indptr"), py::arg("indices"), py::arg("dA"),
           py::arg("dq"), py::arg("ds"), py::arg("lr"), py::arg("weight_decay"), py::arg("projections") = py::none(),
           py::arg("grad_H") = py::none(),
           "grad_H and one exact SGD step for a loss with the given partial derivatives; grad_H from grad_hidden "
           "(with the same projections) can be passed to skip recomputing it: the step only reads it and returns it.")
      .def("refresh", &Core::refresh, "Recompute U^-1, Q and w_bar from V, U and omega (O(D d^2)).")
      .def("stabilize", &Core::stabilize, "SVD-based correction of U's singular values (one pass over V); W unchanged.")
      .def("inverse_error", &Core::inverse_error, "||U U^-1 - I||_F (O(d^3)).")
      .def("synchronize", &Core::synchronize, "Wait for queued work and raise the error of a failed step, if any.")
      .def("poll", &Core::poll, "Raise the error of an earlier step if it is known by now; never waits.")
      .def_property("stream", &Core::get_stream, &Core::set_stream,
                    "The stream calls are queued on (a cudaStream_t as an int; the CPU has none and ignores it).")
      .def_property("tf32", &Core::tf32, &Core::set_tf32,
                    "TF32 tensor cores for float32 products (CUDA only; the CPU ignores it).")
      .def_readwrite("min_rcond", &Core::min_rcond,
                     "Refuse a step whose factor has a reciprocal condition below this; negative: sqrt(eps) of the "
                     "state dtype.");
  def_stabilization(cls, &Core::stabilize_);
}

}  // namespace sparsetarget
