# Warnings as an interface target every project target links (HighFive's habit).
add_library(adapter_job_warnings INTERFACE)
target_compile_options(adapter_job_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wshadow -Wnon-virtual-dtor -Wpedantic>
  $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${ADAPTER_JOB_WERROR}>>:-Werror>)
