# adapter_job_library(<name> SOURCES ... [PUBLIC_DEPS ...] [PRIVATE_DEPS ...]): one static library
# per pipeline stage, named adapter_job::<name>, with the public headers of include/.
function(adapter_job_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;PUBLIC_DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  add_library(adapter_job::${name} ALIAS ${name})
  target_include_directories(${name} PUBLIC $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include>
                                            $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
  target_link_libraries(${name} PUBLIC ${ARG_PUBLIC_DEPS} PRIVATE ${ARG_PRIVATE_DEPS}
                                                                  $<BUILD_INTERFACE:adapter_job_warnings>)
  set_target_properties(${name} PROPERTIES POSITION_INDEPENDENT_CODE ON OUTPUT_NAME adapter_job_${name})
endfunction()
