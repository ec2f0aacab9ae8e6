// The algorithm's entry points for one backend and each (weight, state) dtype pair, as one list that the backends
// declare (extern template, cpu/factored_step_cpu.h, cuda/factored_step_cuda.cuh) and instantiate
// (cpu/factored_step_cpu.cpp, cuda/factored_step_cuda.cu). KEYWORD is `template` or `extern template`.
#pragma once

#include "factored_step.h"
#include "stabilize.h"

#define ST_ALGORITHM_INSTANCE(KEYWORD, B, TV, TS)                                                               \
  KEYWORD void project<B, TV, TS>(B&, const FactoredState<TV, TS>&, const TS*, int, TS*, TS*, TS*, TS*, TS*);   \
  KEYWORD void gather_outputs<B, TV, TS>(B&, const FactoredState<TV, TS>&, const ProjectionsView<TS>&,          \
                                         const Targets&, TS*);                                                   \
  KEYWORD void hidden_gradient<B, TV, TS>(B&, const FactoredState<TV, TS>&, const Targets&,                     \
                                          const ProjectionsView<TS>&, const TS*, const TS*, const TS*, TS*);     \
  KEYWORD void backward_step<B, TV, TS>(B&, FactoredState<TV, TS>&, const TS*, const Targets&,                  \
                                        const ProjectionsView<TS>&, const TS*, const TS*, const TS*,            \
                                        const StepOptions&, TS*, bool);                                          \
  KEYWORD void after_step<B, TV, TS>(B&, FactoredState<TV, TS>&, const StabilizeOptions&, std::int64_t);        \
  KEYWORD CorrectionReport correct<B, TV, TS>(B&, FactoredState<TV, TS>&, const StabilizeOptions&, bool);       \
  KEYWORD void refresh<B, TV, TS>(B&, FactoredState<TV, TS>&);                                                  \
  KEYWORD double inverse_error<B, TV, TS>(B&, const FactoredState<TV, TS>&);

#define ST_ALGORITHM_INSTANCES(KEYWORD, B)              \
  namespace sparsetarget {                              \
  ST_ALGORITHM_INSTANCE(KEYWORD, B, float, float)       \
  ST_ALGORITHM_INSTANCE(KEYWORD, B, float, double)      \
  ST_ALGORITHM_INSTANCE(KEYWORD, B, double, float)      \
  ST_ALGORITHM_INSTANCE(KEYWORD, B, double, double)     \
  }
