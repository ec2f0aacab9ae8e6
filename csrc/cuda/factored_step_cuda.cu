// The step and the stabilisation policy compiled once for the CUDA backend, for each (weight, state) dtype pair.
#include "backend_cuda_impl.cuh"
#include "factored_step_cuda.cuh"

ST_ALGORITHM_INSTANCES(template, cuda::CudaBackend)
