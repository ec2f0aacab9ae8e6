// The stabilisation policy as Python properties of a bound core class: one definition for the CPU and CUDA modules.
#pragma once

#include <pybind11/pybind11.h>

#include "stabilize.h"

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

}  // namespace sparsetarget
