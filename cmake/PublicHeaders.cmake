# The library's API, all a user of the installed package includes: export.h with its options and
# report, the MPI world that calls it, the errors, the sink interface for a writer of one's own
# and the plugin lookup. Every other header in include/ is shared between the stages and stays
# private: not installed, and not seen through adapter_job::adapter_job. The headers listed are
# copied to <build>/public_include, the include directory of the library's users in the build
# tree, so a public header that includes a private one fails to build (tests/CMakeLists.txt
# compiles each alone from there).
set(ADAPTER_JOB_PUBLIC_HEADERS
    export.h
    comm/backend.h
    comm/mpi_world.h
    core/dtype.h
    core/error.h
    core/parallel_sizes.h
    core/progress.h
    core/serving_target.h
    core/tensor.h
    merge/merged_model_sink.h
    report/report.h
    verify/options.h
    verify/plugin.h
    writer/adapter_config.h
    writer/export_sink.h
    writer/output_guard.h
    writer/peft_directory_sink.h
    writer/safetensors_file_sink.h)
set(ADAPTER_JOB_PUBLIC_INCLUDE_DIR ${PROJECT_BINARY_DIR}/public_include)

# A header taken off the list leaves the copy (and so the install) too.
file(GLOB_RECURSE _copied RELATIVE ${ADAPTER_JOB_PUBLIC_INCLUDE_DIR}/adapter_job
     ${ADAPTER_JOB_PUBLIC_INCLUDE_DIR}/adapter_job/*)
foreach(_header ${_copied})
  if(NOT _header IN_LIST ADAPTER_JOB_PUBLIC_HEADERS)
    file(REMOVE ${ADAPTER_JOB_PUBLIC_INCLUDE_DIR}/adapter_job/${_header})
  endif()
endforeach()
foreach(_header ${ADAPTER_JOB_PUBLIC_HEADERS})
  configure_file(${PROJECT_SOURCE_DIR}/include/adapter_job/${_header}
                 ${ADAPTER_JOB_PUBLIC_INCLUDE_DIR}/adapter_job/${_header} COPYONLY)
endforeach()
