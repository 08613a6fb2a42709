# `cmake --install` ships libadapter_job.so (cmake/SharedLibrary.cmake), the public headers, the
# binary, the verification plugin (in <libdir>/adapter_job/, where the library and the binary
# look for it), config/ (share/adapter_job/config, which the installed binary reads) and a package
# config, so another project can `find_package(adapter_job)` and link adapter_job::adapter_job.
include(CMakePackageConfigHelpers)
install(TARGETS shared_library EXPORT adapter_job_targets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(TARGETS adapter_job RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
if(ADAPTER_JOB_VERIFY)
  install(TARGETS verify_plugin LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}/adapter_job)
endif()
# The public headers only (cmake/PublicHeaders.cmake); the stages' shared headers stay private.
install(DIRECTORY ${ADAPTER_JOB_PUBLIC_INCLUDE_DIR}/adapter_job DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY config/ DESTINATION ${CMAKE_INSTALL_DATADIR}/adapter_job/config)
install(EXPORT adapter_job_targets NAMESPACE adapter_job::
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/adapter_job)
configure_package_config_file(cmake/adapter_jobConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/adapter_jobConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/adapter_job)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/adapter_jobConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/adapter_jobConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/adapter_jobConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/adapter_job)
