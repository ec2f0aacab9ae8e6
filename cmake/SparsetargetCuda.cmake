# The CUDA backend: module sparsetarget._cuda, built per SPARSETARGET_WITH_CUDA (AUTO | ON | OFF).
# Needs nvcc and cuBLAS. cuBLAS comes from the CUDA toolkit, from SPARSETARGET_CUBLAS_ROOT (a directory with
# include/cublas_v2.h and lib/libcublas.so*), or from the nvidia-cublas wheel (nvidia/cu13 or nvidia/cu12 in a
# site-packages on CMAKE_PREFIX_PATH or importable by the building Python): CUDA builds of torch install it.
# Sets SPARSETARGET_CUDA_FOUND, and SPARSETARGET_CUDA_NOTE: why there is no CUDA backend (empty when there is one),
# which the installed package reports in sparsetarget.cuda_status() (pip hides configure output).
set(SPARSETARGET_CUDA_FOUND OFF)
set(SPARSETARGET_CUDA_NOTE "")
set(SPARSETARGET_CUBLAS_ROOT "" CACHE PATH "Directory with include/cublas_v2.h and lib/libcublas.so* (optional)")

if(NOT SPARSETARGET_WITH_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "SPARSETARGET_WITH_CUDA must be AUTO, ON or OFF, got '${SPARSETARGET_WITH_CUDA}'")
endif()
if(SPARSETARGET_WITH_CUDA STREQUAL "OFF")
  set(SPARSETARGET_CUDA_NOTE "the build was configured with SPARSETARGET_WITH_CUDA=OFF")
  message(STATUS "sparsetarget: CPU-only build (SPARSETARGET_WITH_CUDA=OFF)")
  return()
endif()

# sparsetarget_cuda_missing(<text>...): the reason for a CPU-only build, in as many strings as convenient (they are
# joined, so they must not contain ';'). An error with SPARSETARGET_WITH_CUDA=ON, else a status line and
# SPARSETARGET_CUDA_NOTE.
function(sparsetarget_cuda_missing)
  string(CONCAT why ${ARGN})
  if(SPARSETARGET_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "sparsetarget: SPARSETARGET_WITH_CUDA=ON but ${why}")
  endif()
  message(STATUS "sparsetarget: CPU-only build: ${why} (SPARSETARGET_WITH_CUDA=ON makes this an error)")
  set(SPARSETARGET_CUDA_NOTE "${why}" PARENT_SCOPE)
endfunction()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  sparsetarget_cuda_missing("no CUDA compiler (nvcc) was found: put nvcc on PATH or set CUDACXX")
  return()
endif()

# Where the nvidia-* wheels may be: each prefix (scikit-build-core puts the target site-packages first) and the
# building Python's own packages.
set(_st_wheel_dirs "")
foreach(_st_prefix IN LISTS CMAKE_PREFIX_PATH)
  list(APPEND _st_wheel_dirs "${_st_prefix}/nvidia/cu13" "${_st_prefix}/nvidia/cu12" "${_st_prefix}/nvidia/cublas")
endforeach()
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import nvidia, os; print(';'.join(os.path.join(p, s) for p in nvidia.__path__ for s in ('cu13', 'cu12', 'cublas')))"
  OUTPUT_VARIABLE _st_python_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _st_rc)
if(_st_rc EQUAL 0)
  list(APPEND _st_wheel_dirs ${_st_python_dirs})
endif()

# The toolkit nvcc belongs to, as nvcc itself reports it (TOP=...): nvcc on PATH may be a wrapper script or a link
# outside the toolkit (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc).
execute_process(COMMAND "${CMAKE_CUDA_COMPILER}" -v --dryrun -c sparsetarget_probe.cu
                OUTPUT_VARIABLE _st_dryrun ERROR_VARIABLE _st_dryrun_err RESULT_VARIABLE _st_rc)
if("${_st_dryrun}${_st_dryrun_err}" MATCHES "#\\$ TOP=([^\r\n]*)")
  get_filename_component(_st_toolkit "${CMAKE_MATCH_1}" REALPATH)
else()
  get_filename_component(_st_nvcc_dir "${CMAKE_CUDA_COMPILER}" REALPATH)
  get_filename_component(_st_nvcc_dir "${_st_nvcc_dir}" DIRECTORY)
  get_filename_component(_st_toolkit "${_st_nvcc_dir}" DIRECTORY)
endif()
set(_st_cublas_dirs ${SPARSETARGET_CUBLAS_ROOT} ${_st_toolkit} ${_st_toolkit}/targets/x86_64-linux
                    ${_st_toolkit}/targets/sbsa-linux ${_st_wheel_dirs})
# A cached result may point into a build environment that is gone (pip's isolated builds are temporary).
foreach(_st_var SPARSETARGET_CUBLAS_INCLUDE_DIR SPARSETARGET_CUBLAS_LIBRARY)
  if(${_st_var} AND NOT EXISTS "${${_st_var}}")
    unset(${_st_var} CACHE)
  endif()
endforeach()
find_path(SPARSETARGET_CUBLAS_INCLUDE_DIR cublas_v2.h PATHS ${_st_cublas_dirs} PATH_SUFFIXES include NO_DEFAULT_PATH)
if(SPARSETARGET_CUBLAS_INCLUDE_DIR)
  # The library beside that header (wheels ship only the versioned name).
  get_filename_component(_st_cublas_root "${SPARSETARGET_CUBLAS_INCLUDE_DIR}" DIRECTORY)
  find_library(SPARSETARGET_CUBLAS_LIBRARY NAMES cublas libcublas.so.13 libcublas.so.12
               PATHS "${_st_cublas_root}" PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)
endif()
if(NOT SPARSETARGET_CUBLAS_INCLUDE_DIR OR NOT SPARSETARGET_CUBLAS_LIBRARY)
  sparsetarget_cuda_missing("nvcc ${_st_toolkit}/bin/nvcc was found but not cuBLAS (looked in that CUDA toolkit, "
                            "in SPARSETARGET_CUBLAS_ROOT and for the nvidia-cublas wheel). To fix: `pip install "
                            "nvidia-cublas` (CUDA 13, or nvidia-cublas-cu12 for CUDA 12) and reinstall, or set "
                            "SPARSETARGET_CUBLAS_ROOT")
  unset(SPARSETARGET_CUBLAS_INCLUDE_DIR CACHE)
  unset(SPARSETARGET_CUBLAS_LIBRARY CACHE)
  return()
endif()

# CUDA 13 dropped architectures before sm_75, so nvcc's default must not be asked for: A100 (sm_80) and H100 /
# H200 (sm_90) code, plus sm_90 PTX that newer GPUs compile at load time.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES "80-real;90")
endif()
enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
find_package(CUDAToolkit REQUIRED)

add_library(sparsetarget_cuda_kernels STATIC
  csrc/cuda/blas_cuda.cu
  csrc/cuda/backend_cuda.cu
  csrc/cuda/factored_step_cuda.cu)
set_target_properties(sparsetarget_cuda_kernels PROPERTIES
  POSITION_INDEPENDENT_CODE ON
  CUDA_RUNTIME_LIBRARY Static
  CUDA_VISIBILITY_PRESET hidden
  CXX_VISIBILITY_PRESET hidden)
target_include_directories(sparsetarget_cuda_kernels PUBLIC ${SPARSETARGET_CUBLAS_INCLUDE_DIR}
                                                            ${CUDAToolkit_INCLUDE_DIRS})
target_link_libraries(sparsetarget_cuda_kernels PUBLIC sparsetarget_host CUDA::cudart_static
                                                       ${SPARSETARGET_CUBLAS_LIBRARY})
target_compile_options(sparsetarget_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -Xcompiler=-Wall>)

pybind11_add_module(_cuda csrc/cuda/bindings_cuda.cpp)
target_link_libraries(_cuda PRIVATE sparsetarget_cuda_kernels)
string(REPLACE ";" "," _st_archs "${CMAKE_CUDA_ARCHITECTURES}")
target_compile_definitions(_cuda PRIVATE
  SPARSETARGET_VERSION="${PROJECT_VERSION}"
  SPARSETARGET_CUDA_ARCHITECTURES="${_st_archs}")
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(_cuda PRIVATE -Wall -Wextra -O3)
endif()
# Installed wheel: site-packages/sparsetarget/_cuda.so finds cuBLAS in the nvidia-cublas wheel beside it, else
# where it was found at build time when that is a toolkit (not a wheel, which may be in pip's temporary build
# environment: tools/build_backend makes the nvidia-cublas wheel a dependency of such a build).
get_filename_component(_st_cublas_libdir "${SPARSETARGET_CUBLAS_LIBRARY}" DIRECTORY)
if(_st_cublas_libdir MATCHES "/nvidia/(cu1[0-9]|cublas)/lib$")
  set(_st_cublas_libdir "")
endif()
set_target_properties(_cuda PROPERTIES INSTALL_RPATH
  "$ORIGIN/../nvidia/cu13/lib;$ORIGIN/../nvidia/cu12/lib;$ORIGIN/../nvidia/cublas/lib;${SPARSETARGET_BLAS_RPATH};${_st_cublas_libdir}")
install(TARGETS _cuda LIBRARY DESTINATION sparsetarget)

set(SPARSETARGET_CUDA_FOUND ON)
message(STATUS "sparsetarget: CUDA backend ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures "
               "${CMAKE_CUDA_ARCHITECTURES}, cuBLAS ${SPARSETARGET_CUBLAS_LIBRARY})")
