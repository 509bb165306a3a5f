// Timing helpers the `qlora bench` entries share (bench_util.h).
#include "cli/bench_util.h"

#include <fstream>

#include "qlora/error.h"

namespace qlora::cli {

void write_bench_json(const std::string& op, const std::string& path, const nlohmann::json& j) {
  std::ofstream f(path);
  if (!f) throw UserError("qlora bench " + op + ": cannot write --json file " + path);
  f << j.dump(2) << "\n";
  f.flush();
  if (!f) throw UserError("qlora bench " + op + ": cannot write --json file " + path + " (write failed)");
}

}  // namespace qlora::cli

#ifdef QLORA_WITH_CUDA
#include <ATen/ATen.h>

namespace qlora::cli {

double measure_copy_gbps(int iters) {
  const int64_t n = int64_t{1} << 30;  // bf16 elements: 2 GiB
  const auto opt = at::TensorOptions(at::kBFloat16).device(at::kCUDA);
  at::Tensor src = at::empty({n}, opt).fill_(1.0), dst = at::empty({n}, opt);
  const double ms = time_ms([&](int) { dst.copy_(src); }, 1, std::max(5, iters / 5));
  return 2.0 * static_cast<double>(n) * 2.0 / (ms * 1e-3) / 1e9;
}

}  // namespace qlora::cli
#endif
