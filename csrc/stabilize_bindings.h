// The stabilisation policy as Python properties of a bound core class, and a correction's report as a dict: one
// definition for the CPU and CUDA modules.
#pragma once

#include <pybind11/pybind11.h>

#include "stabilize_policy.h"

namespace sparsetarget {

template <class Core, class T>
void def_stabilization_option(pybind11::class_<Core>& cls, const char* name, StabilizeOptions Core::*options,
                              T StabilizeOptions::*field) {
  cls.def_property(name, [options, field](const Core& c) { return (c.*options).*field; },
                   [options, field](Core& c, T value) { (c.*options).*field = value; });
}

// sigma_low, sigma_high, inverse_tol, check_every and refresh_every of the core's StabilizeOptions member.
template <class Core>
void def_stabilization(pybind11::class_<Core>& cls, StabilizeOptions Core::*options) {
  def_stabilization_option(cls, "sigma_low", options, &StabilizeOptions::sigma_low);
  def_stabilization_option(cls, "sigma_high", options, &StabilizeOptions::sigma_high);
  def_stabilization_option(cls, "inverse_tol", options, &StabilizeOptions::inverse_tol);
  def_stabilization_option(cls, "check_every", options, &StabilizeOptions::check_every);
  def_stabilization_option(cls, "refresh_every", options, &StabilizeOptions::refresh_every);
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

}  // namespace sparsetarget
