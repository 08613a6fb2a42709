# `cmake --install` ships the libraries, public headers and a package config, so another project
# can `find_package(adapter_job)` and link adapter_job::checkpoint and friends.
include(CMakePackageConfigHelpers)
install(TARGETS core checkpoint integrity safetensors comm convert writer job verify_loader report text tokenizer EXPORT adapter_job_targets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(TARGETS adapter_job RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(TARGETS verify_plugin LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}/adapter_job)
install(DIRECTORY include/adapter_job DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
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
              ${PROJECT_SOURCE_DIR}/cmake/FindNCCL.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/adapter_job)
