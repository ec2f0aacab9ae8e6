// The step and the stabilisation policy compiled once for the CPU backend, for each (weight, state) dtype pair.
#include "factored_step_cpu.h"

ST_ALGORITHM_INSTANCES(template, cpu::CpuBackend)
