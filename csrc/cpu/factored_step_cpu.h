// The step and the stabilisation policy for the CPU backend: declared here, compiled once in
// factored_step_cpu.cpp (definitions in ../factored_step.h and ../stabilize.h). Mirror of
// ../cuda/factored_step_cuda.cuh.
#pragma once

#include "../algorithm_instances.h"
#include "backend_cpu.h"

ST_ALGORITHM_INSTANCES(extern template, cpu::CpuBackend)
