# Defines the INTERFACE target `sparsetarget_blas` and SPARSETARGET_BLAS_DESCRIPTION / SPARSETARGET_BLAS_RPATH.
# All BLAS/LAPACK calls in csrc/ go through csrc/blas.h, which adds SPARSETARGET_BLAS_PREFIX to each symbol.
add_library(sparsetarget_blas INTERFACE)

if(SPARSETARGET_BLAS STREQUAL "scipy-openblas")
  # Ask the Python that builds us where the wheel lives (scikit-build-core also puts it on CMAKE_PREFIX_PATH).
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import scipy_openblas32 as s; print(s.get_lib_dir())"
    OUTPUT_VARIABLE _st_openblas_libdir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _st_rc)
  if(NOT _st_rc EQUAL 0)
    message(FATAL_ERROR "SPARSETARGET_BLAS=scipy-openblas but the scipy-openblas32 wheel is not importable by "
                        "${Python_EXECUTABLE}; `pip install scipy-openblas32` or pass -DSPARSETARGET_BLAS=system")
  endif()
  find_package(OpenBLAS CONFIG REQUIRED PATHS "${_st_openblas_libdir}/cmake/openblas" NO_DEFAULT_PATH)
  target_link_libraries(sparsetarget_blas INTERFACE OpenBLAS::OpenBLAS)
  target_compile_definitions(sparsetarget_blas INTERFACE SPARSETARGET_BLAS_PREFIX=scipy_)
  set(SPARSETARGET_BLAS_DESCRIPTION "scipy-openblas32 ${OpenBLAS_VERSION}")
  # Installed wheel: _core sits in site-packages/sparsetarget, the library in site-packages/scipy_openblas32/lib.
  set(SPARSETARGET_BLAS_RPATH "$ORIGIN/../scipy_openblas32/lib")
  message(STATUS "sparsetarget: BLAS/LAPACK from scipy-openblas32 ${OpenBLAS_VERSION} (${_st_openblas_libdir})")
elseif(SPARSETARGET_BLAS STREQUAL "system")
  set(BLA_VENDOR_SAVED "${BLA_VENDOR}")
  find_package(BLAS REQUIRED)
  find_package(LAPACK REQUIRED)
  target_link_libraries(sparsetarget_blas INTERFACE ${LAPACK_LIBRARIES} ${BLAS_LIBRARIES})
  target_compile_definitions(sparsetarget_blas INTERFACE SPARSETARGET_BLAS_PREFIX=)
  set(SPARSETARGET_BLAS_DESCRIPTION "system (${BLAS_LIBRARIES})")
  message(STATUS "sparsetarget: system BLAS/LAPACK ${BLAS_LIBRARIES}")
else()
  message(FATAL_ERROR "SPARSETARGET_BLAS must be scipy-openblas or system, got '${SPARSETARGET_BLAS}'")
endif()
