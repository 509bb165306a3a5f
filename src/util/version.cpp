// Build identity and CUDA availability (see include/qlora/version.h).
#include "qlora/version.h"

#include <cstdio>

#include "qlora_version_info.h"  // generated at build time by cmake/version_info.cmake
#ifdef QLORA_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace qlora {

std::string version() { return QLORA_VERSION; }
std::string git_commit() { return QLORA_GIT_COMMIT; }
std::string torch_version() { return QLORA_TORCH_VERSION; }

bool cuda_built() {
#ifdef QLORA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string describe_cuda() {
#ifdef QLORA_WITH_CUDA
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls are not confused by it
    return std::string("not available: ") + cudaGetErrorString(err);
  }
  if (count == 0) return "not available: no CUDA device";
  std::string out = "available, " + std::to_string(count) + (count == 1 ? " device: " : " devices: ");
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    char buf[512];
    std::snprintf(buf, sizeof buf, "%s%s (sm_%d%d, %.1f GiB)", i ? "; " : "", prop.name, prop.major, prop.minor,
                  prop.totalGlobalMem / 1073741824.0);
    out += buf;
  }
  return out;
#else
  return "not built: CPU-only build";
#endif
}

}  // namespace qlora
