// The step and the stabilisation policy for the CUDA backend: declared here, compiled once in
// factored_step_cuda.cu (definitions in ../factored_step.h and ../stabilize.h). Mirror of ../cpu/factored_step_cpu.h.
#pragma once

#include "../algorithm_instances.h"
#include "backend_cuda.cuh"

ST_ALGORITHM_INSTANCES(extern template, cuda::CudaBackend)
