# libtorch comes from the Python `torch` wheel (torch.utils.cmake_prefix_path); only the
# verification stage links it, so everything else builds without its slow headers.
find_package(Python3 REQUIRED COMPONENTS Interpreter)
if(NOT Torch_DIR)
  execute_process(COMMAND ${Python3_EXECUTABLE} -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
                  OUTPUT_VARIABLE _torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
                  RESULT_VARIABLE _torch_rc ERROR_QUIET)
  if(_torch_rc EQUAL 0)
    list(APPEND CMAKE_PREFIX_PATH ${_torch_prefix})
  endif()
endif()
# Without an explicit list, Caffe2's config compiles and runs a GPU probe, which fails on machines
# without a GPU and under CMake versions that lack CUDA20 dialect flags. H100 is our target.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "9.0")
endif()
find_package(Torch REQUIRED)
message(STATUS "adapter_job: libtorch ${Torch_VERSION} from ${Torch_DIR}")
