# libtorch as one imported target, qlora_torch.
# With the CUDA part on, torch's own TorchConfig (it needs the CUDA toolkit). With it off, only
# libtorch_cpu + libc10 from the same install, so that a CPU-only build works on a machine
# without a CUDA toolkit even when the installed torch wheel was built with CUDA.
find_package(Python3 COMPONENTS Interpreter)
if(QLORA_WITH_CUDA)
  find_package(Torch 2.11 REQUIRED)
  add_library(qlora_torch INTERFACE)
  # torch_cuda_library (libtorch_cuda + libtorch_cpu + libc10(_cuda), linked --no-as-needed so
  # that the CUDA kernels register), not ${TORCH_LIBRARIES}: that adds the shim libtorch.so, which
  # exports its own copies of std::filesystem functions; linked ahead of libstdc++, those win
  # symbol lookup and crash (remove_all jumps to address 0: seen with the torch 2.11 cu130 wheel).
  target_link_libraries(qlora_torch INTERFACE torch_cuda_library)
  target_include_directories(qlora_torch INTERFACE ${TORCH_INCLUDE_DIRS})
  target_compile_definitions(qlora_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
  set(QLORA_TORCH_MODE "TorchConfig, with CUDA")
else()
  set(_hints)
  foreach(_p ${CMAKE_PREFIX_PATH})
    list(APPEND _hints ${_p}/../../include ${_p}/include)   # <torch>/share/cmake -> <torch>/include
  endforeach()
  find_path(QLORA_TORCH_INCLUDE ATen/ATen.h HINTS ${_hints} REQUIRED NO_DEFAULT_PATH)
  get_filename_component(QLORA_TORCH_INCLUDE ${QLORA_TORCH_INCLUDE} ABSOLUTE)
  get_filename_component(_torch_root ${QLORA_TORCH_INCLUDE} DIRECTORY)
  find_library(QLORA_TORCH_CPU torch_cpu HINTS ${_torch_root}/lib REQUIRED NO_DEFAULT_PATH)
  find_library(QLORA_C10 c10 HINTS ${_torch_root}/lib REQUIRED NO_DEFAULT_PATH)
  file(STRINGS ${_torch_root}/share/cmake/Torch/TorchConfigVersion.cmake _tv REGEX "set\\(PACKAGE_VERSION ")
  string(REGEX MATCH "[0-9]+\\.[0-9]+\\.[0-9]+" Torch_VERSION "${_tv}")
  if(NOT Torch_VERSION VERSION_GREATER_EQUAL 2.11 OR Torch_VERSION VERSION_GREATER_EQUAL 2.12)
    message(FATAL_ERROR "qlora needs libtorch 2.11, found ${Torch_VERSION} at ${_torch_root}")
  endif()
  add_library(qlora_torch INTERFACE)
  target_include_directories(qlora_torch INTERFACE ${QLORA_TORCH_INCLUDE} ${QLORA_TORCH_INCLUDE}/torch/csrc/api/include)
  target_link_libraries(qlora_torch INTERFACE ${QLORA_TORCH_CPU} ${QLORA_C10})
  target_compile_definitions(qlora_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
  set(QLORA_TORCH_MODE "CPU only: libtorch_cpu + libc10")
endif()
