# -DADAPTER_JOB_SANITIZE=address,undefined instruments every target, tests included.
if(ADAPTER_JOB_SANITIZE)
  set(_aj_sanitize_flags -fsanitize=${ADAPTER_JOB_SANITIZE} -fno-omit-frame-pointer
                         -fno-sanitize-recover=all)
  # Host code only: nvcc takes no -fsanitize (the CUDA kernels' host stubs go uninstrumented).
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:${_aj_sanitize_flags}>")
  add_link_options(${_aj_sanitize_flags})
  message(STATUS "adapter_job: sanitizers ${ADAPTER_JOB_SANITIZE}")
endif()
