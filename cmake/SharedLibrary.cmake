# libadapter_job.so, the library a user of the installed package links (adapter_job::adapter_job):
# the objects of every stage's static library in one shared object. Its own dependencies (MPI,
# CUDA, NCCL, yaml-cpp, OpenSSL) are linked into it and stay private, so a consumer needs only
# what the public headers include ({fmt} and nlohmann_json): no C compiler for FindMPI, no CUDA
# or NCCL at its configure time. Static libraries cannot hide them (CMake passes a static
# library's private dependencies on to whoever links it), hence one shared library. The build
# tree's binary and tests keep linking the static stages.
set(_adapter_job_stages core digest checkpoint integrity safetensors comm convert writer merge report
                         verify_loader job)
set(_objects "")
foreach(_stage ${_adapter_job_stages})
  list(APPEND _objects $<TARGET_OBJECTS:${_stage}>)
endforeach()
add_library(shared_library SHARED ${_objects})
add_library(adapter_job::adapter_job ALIAS shared_library)
# The stages' objects are all in; linking the stages as well brings their dependencies (no
# archive member is pulled twice: each symbol is already defined by the objects).
target_link_libraries(shared_library
  PUBLIC fmt::fmt nlohmann_json::nlohmann_json
  PRIVATE ${_adapter_job_stages})
target_include_directories(shared_library PUBLIC $<BUILD_INTERFACE:${ADAPTER_JOB_PUBLIC_INCLUDE_DIR}>
                                                 $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
set_target_properties(shared_library PROPERTIES
  OUTPUT_NAME adapter_job
  EXPORT_NAME adapter_job
  VERSION ${PROJECT_VERSION}
  SOVERSION ${PROJECT_VERSION_MAJOR}.${PROJECT_VERSION_MINOR}
  # Beside the binary and the plugin in the build tree, as lib/ holds both when installed: the
  # plugin is found from either (verify/plugin.h).
  LIBRARY_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/src/cli
  INSTALL_RPATH_USE_LINK_PATH ON)
# Every symbol the stages use is resolved here, so a consumer links nothing else of ours (a
# stage library added to src/ but not to the list above fails here). Not under sanitizers,
# whose runtimes clang links into executables only.
if(NOT ADAPTER_JOB_SANITIZE)
  target_link_options(shared_library PRIVATE LINKER:--no-undefined)
endif()
