// Build identity: version, git commit, libtorch version, and what CUDA this process can use.
#pragma once
#include <string>

namespace qlora {

std::string version();        // "0.1.0"
std::string git_commit();     // "abc123def456" (+ "-dirty"), or "unknown"
std::string torch_version();  // libtorch the binary was built against, e.g. "2.11.0"

// One line: "available, 1 device: NVIDIA H100 80GB HBM3 (sm_90, 79.2 GiB)", or why CUDA is not
// available ("not built: CPU-only build", "not available: no CUDA-capable device is detected").
std::string describe_cuda();
bool cuda_built();

}  // namespace qlora
