// Timing helpers the `qlora bench` entries share (cmd_bench.cpp, bench_ce.cpp, bench_flce.cpp).
#pragma once
#include <algorithm>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace qlora::cli {

// The median of v (the mean of the middle two for an even count); v must not be empty.
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Writes j (indented) to the --json file `path` of `qlora bench OP`; a file that cannot be opened or
// written is a UserError naming it.
void write_bench_json(const std::string& op, const std::string& path, const nlohmann::json& j);

#ifdef QLORA_WITH_CUDA
// Median milliseconds per launch of fn(set), sets in rotation; 3 warm-up passes first. A sample
// is at least 8 back-to-back launches (the rotation repeated), so that the event pair's own cost
// is spread as it is in a training step, where launches follow each other in one stream.
template <typename F>
double time_ms(F&& fn, int nsets, int iters) {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  for (int w = 0; w < 3; ++w)
    for (int s = 0; s < nsets; ++s) fn(s);
  const int launches = nsets * ((8 + nsets - 1) / nsets);
  at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
  std::vector<double> samples;
  samples.reserve(iters);
  for (int it = 0; it < iters; ++it) {
    start.record(stream);
    for (int l = 0; l < launches; ++l) fn(l % nsets);
    stop.record(stream);
    stop.synchronize();
    samples.push_back(static_cast<double>(start.elapsed_time(stop)) / launches);
  }
  return median(std::move(samples));
}

// Device-to-device copy bandwidth in GB/s (1e9 bytes), bytes read + written: 2 GiB -> 2 GiB.
double measure_copy_gbps(int iters);
#endif

}  // namespace qlora::cli
