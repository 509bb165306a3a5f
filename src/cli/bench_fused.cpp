// qlora bench fused: the decoder layer's fused kernels (kernels/fused_layer.cu: RMSNorm, SwiGLU,
// RoPE; include/qlora/fused_layer.h) next to the ATen ops the layer loop runs without them
// (`fused_kernels: false`) and a device copy of the same bytes, in one process, on the shapes of a
// Llama-3-8B layer at batch 2 x seq 2048 (4,096 tokens; `--cases small`: tiny shapes, for a quick
// check or the CPU).
//
// Method (why): on CUDA, time_ms (bench_util.h): median over --iters samples of >= 8 back-to-back
// launches, inputs in rotation over enough sets that they exceed 4x an H100's 50 MB L2. "fwd" times
// the forward alone; "fwd+bwd" the forward and the backward as training runs them (the fused
// backward kernel, or autograd through the ATen ops). GB/s counts the bytes the operation must
// move at least (every input read once, every output written once), so "%copy" says how close a
// kernel runs to the memory system. On the CPU (no CUDA device): the same table timed with a wall
// clock, where "fused" is the ATen reference of the kernels' arithmetic -- a check of the tool, not
// a measurement of anything the GPU runs.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "qlora/error.h"
#include "qlora/fused_layer.h"
#include "qlora/model.h"

namespace qlora::cli {
namespace {

// The shapes of one case: RMSNorm and RoPE inputs come from [batch, seq, hidden] activations;
// SwiGLU's gate and up are [batch * seq, intermediate]; q has `heads` heads, k `kv_heads`.
struct FusedShapes {
  int64_t batch, seq, hidden, intermediate, heads, kv_heads, head_dim;
};
const FusedShapes kLlama3_8B = {2, 2048, 4096, 14336, 32, 8, 128};
const FusedShapes kSmall = {2, 33, 96, 200, 6, 2, 16};  // odd sequence and sizes

// One timed measurement: milliseconds per call of fn(set) over `nsets` input sets.
double time_call(const at::Device& device, const std::function<void(int)>& fn, int nsets, int iters) {
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) return time_ms(fn, nsets, iters);
#endif
  (void)device;
  for (int s = 0; s < nsets; ++s) fn(s);  // warm-up
  std::vector<double> samples;
  for (int it = 0; it < iters; ++it) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int s = 0; s < nsets; ++s) fn(s);
    samples.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / nsets);
  }
  return median(std::move(samples));
}

// Enough input sets of `bytes_per_set` that together they are >= 200 MB (4x an H100's L2), at least 2.
int sets_for(double bytes_per_set) {
  const int n = static_cast<int>(std::ceil(200e6 / std::max(bytes_per_set, 1.0)));
  return std::clamp(n, 2, 16);
}

// The ATen ops of the unfused layer: the fused-kernel switch off while fn runs.
template <typename F>
void with_aten_ops(F&& fn) {
  struct Restore {
    bool was = fused_kernels();
    ~Restore() { set_fused_kernels(was); }
  } restore;
  set_fused_kernels(false);
  fn();
}

struct Row {
  std::string op, pass;
  double bytes = 0, fused_ms = 0, aten_ms = 0;
};

}  // namespace

int bench_fused(const std::string& cases, int iters_given, const std::string& json_path) {
  if (cases != "" && cases != "all" && cases != "small")
    throw UserError("qlora bench fused: --cases must be all or small, found " + cases);
  if (iters_given < 0) throw UserError("qlora bench fused: --iters must be >= 1, found " + std::to_string(iters_given));
  const bool cuda = at::hasCUDA() && at::getNumGPUs() > 0;
  const at::Device device = cuda ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  const bool small = cases == "small" || (cases.empty() && !cuda);
  const FusedShapes sh = small ? kSmall : kLlama3_8B;
  const int iters = iters_given > 0 ? iters_given : (cuda ? 20 : 3);
  const auto opt = at::TensorOptions().device(device).dtype(at::kBFloat16);
  const double e = 2.0;  // bf16 bytes
  const int64_t tokens = sh.batch * sh.seq;

#ifdef QLORA_WITH_CUDA
  const double copy_gbps = cuda ? measure_copy_gbps(iters) : 0.0;
#else
  const double copy_gbps = 0.0;
#endif
  std::printf("qlora bench fused on %s, bf16, %s shapes (tokens %lld, hidden %lld, intermediate %lld, q/k heads %lld/%lld "
              "x %lld), iters %d (median)\n",
              cuda ? "CUDA" : "the CPU (fused = the kernels' ATen reference; a check of the tool, not a GPU figure)",
              small ? "small" : "Llama-3-8B layer", static_cast<long long>(tokens), static_cast<long long>(sh.hidden),
              static_cast<long long>(sh.intermediate), static_cast<long long>(sh.heads), static_cast<long long>(sh.kv_heads),
              static_cast<long long>(sh.head_dim), iters);
  if (cuda) std::printf("device-to-device copy (2 GiB -> 2 GiB, read + written): %.0f GB/s\n", copy_gbps);
  std::printf("GB/s = the bytes the operation must move (inputs read once, outputs written once) / time; aten = the "
              "unfused layer's ops (fused_kernels: false), backward by autograd\n\n");
  std::printf("%-10s %-8s %10s | %9s %8s %6s | %9s %8s\n", "op", "pass", "MB", "fused ms", "GB/s", "%copy", "aten ms",
              "speedup");

  std::vector<Row> rows;
  auto report = [&](Row r) {
    const double gbps = r.bytes / (r.fused_ms * 1e-3) / 1e9;
    char pct[16] = "-";
    if (copy_gbps > 0) std::snprintf(pct, sizeof pct, "%.1f%%", 100.0 * gbps / copy_gbps);
    std::printf("%-10s %-8s %10.1f | %9.4f %8.0f %6s | %9.4f %7.2fx\n", r.op.c_str(), r.pass.c_str(), r.bytes / 1e6,
                r.fused_ms, gbps, pct, r.aten_ms, r.aten_ms / r.fused_ms);
    std::fflush(stdout);
    rows.push_back(std::move(r));
  };
  at::manual_seed(1234);

  {  // RMSNorm over [tokens, hidden]; its backward takes dy, x and the forward's 1/rms.
    const double x_bytes = static_cast<double>(tokens * sh.hidden) * e;
    const int n = sets_for(2 * x_bytes);
    std::vector<at::Tensor> xs, dys;
    for (int i = 0; i < n; ++i) {
      xs.push_back(at::randn({sh.batch, sh.seq, sh.hidden}, opt));
      dys.push_back(at::randn({sh.batch, sh.seq, sh.hidden}, opt));
    }
    const at::Tensor w = at::rand({sh.hidden}, opt) + 0.5;
    const double eps = 1e-5;
    Row fwd{"rms_norm", "fwd", 2 * x_bytes + static_cast<double>(tokens) * 4};
    fwd.fused_ms = time_call(device, [&](int s) { (void)rms_norm_fused_forward(xs[s], w, eps, true); }, n, iters);
    with_aten_ops([&] { fwd.aten_ms = time_call(device, [&](int s) { (void)rms_norm(xs[s], w, eps); }, n, iters); });
    report(fwd);
    Row both{"rms_norm", "fwd+bwd", fwd.bytes + 3 * x_bytes + static_cast<double>(tokens) * 4};
    auto train = [&](int s) {
      const at::Tensor x = xs[s].detach().requires_grad_(true);
      rms_norm(x, w, eps).backward(dys[s]);
    };
    both.fused_ms = time_call(device, train, n, iters);
    with_aten_ops([&] { both.aten_ms = time_call(device, train, n, iters); });
    report(both);
  }
  {  // SwiGLU over gate, up [tokens, intermediate].
    const double t_bytes = static_cast<double>(tokens * sh.intermediate) * e;
    const int n = sets_for(3 * t_bytes);
    std::vector<at::Tensor> gs, us, ds;
    for (int i = 0; i < n; ++i) {
      gs.push_back(at::randn({tokens, sh.intermediate}, opt));
      us.push_back(at::randn({tokens, sh.intermediate}, opt));
      ds.push_back(at::randn({tokens, sh.intermediate}, opt));
    }
    Row fwd{"swiglu", "fwd", 3 * t_bytes};
    fwd.fused_ms = time_call(device, [&](int s) { (void)swiglu_fused_forward(gs[s], us[s]); }, n, iters);
    fwd.aten_ms = time_call(device, [&](int s) { (void)(at::silu(gs[s]) * us[s]); }, n, iters);
    report(fwd);
    Row both{"swiglu", "fwd+bwd", fwd.bytes + 5 * t_bytes};
    auto train = [&](bool fused, int s) {
      const at::Tensor g = gs[s].detach().requires_grad_(true), u = us[s].detach().requires_grad_(true);
      (fused ? swiglu_fused(g, u) : at::silu(g) * u).backward(ds[s]);
    };
    both.fused_ms = time_call(device, [&](int s) { train(true, s); }, n, iters);
    both.aten_ms = time_call(device, [&](int s) { train(false, s); }, n, iters);
    report(both);
  }
  // RoPE on q and on k as the layer makes them: a [batch, seq, heads * head_dim] projection viewed
  // as [batch, heads, seq, head_dim] (transposed, not copied); cos / sin [batch, seq, head_dim].
  for (const auto& [name, heads] : {std::pair<const char*, int64_t>{"rope q", sh.heads}, {"rope k", sh.kv_heads}}) {
    const double t_bytes = static_cast<double>(tokens * heads * sh.head_dim) * e;
    const double cs_bytes = 2.0 * static_cast<double>(tokens * sh.head_dim) * e;
    const int n = sets_for(2 * t_bytes);
    std::vector<at::Tensor> xs, dys;
    for (int i = 0; i < n; ++i) {
      xs.push_back(at::randn({sh.batch, sh.seq, heads * sh.head_dim}, opt)
                       .view({sh.batch, sh.seq, heads, sh.head_dim})
                       .transpose(1, 2));
      dys.push_back(at::randn({sh.batch, heads, sh.seq, sh.head_dim}, opt));
    }
    const at::Tensor angle = at::rand({sh.batch, sh.seq, sh.head_dim}, opt.dtype(at::kFloat)) * 6.0;
    const at::Tensor cos = angle.cos().to(at::kBFloat16), sin = angle.sin().to(at::kBFloat16);
    Row fwd{name, "fwd", 2 * t_bytes + cs_bytes};
    fwd.fused_ms = time_call(device, [&](int s) { (void)rope_fused_forward(xs[s], cos, sin); }, n, iters);
    with_aten_ops([&] { fwd.aten_ms = time_call(device, [&](int s) { (void)apply_rotary(xs[s], cos, sin); }, n, iters); });
    report(fwd);
    Row both{name, "fwd+bwd", 2 * fwd.bytes};
    auto train = [&](bool fused, int s) {
      const at::Tensor x = xs[s].detach().requires_grad_(true);
      (fused ? rope_fused(x, cos, sin) : apply_rotary(x, cos, sin)).backward(dys[s]);
    };
    both.fused_ms = time_call(device, [&](int s) { train(true, s); }, n, iters);
    with_aten_ops([&] { both.aten_ms = time_call(device, [&](int s) { train(false, s); }, n, iters); });
    report(both);
  }

  if (!json_path.empty()) {
    nlohmann::json jrows = nlohmann::json::array();
    for (const Row& r : rows)
      jrows.push_back({{"op", r.op},
                       {"pass", r.pass},
                       {"bytes", r.bytes},
                       {"fused_ms", r.fused_ms},
                       {"aten_ms", r.aten_ms},
                       {"gbps", r.bytes / (r.fused_ms * 1e-3) / 1e9},
                       {"speedup", r.aten_ms / r.fused_ms}});
    nlohmann::json j = {{"bench", "fused"},
                        {"device", cuda ? "cuda" : "cpu"},
                        {"cases", small ? "small" : "llama-3-8b"},
                        {"tokens", tokens},
                        {"iters", iters},
                        {"copy_gbps", copy_gbps},
                        {"method", "median over iters; CUDA: CUDA-event time of >= 8 back-to-back launches over input "
                                   "sets >= 200 MB; gbps = minimal bytes moved / fused time"},
                        {"rows", jrows}};
    write_bench_json("fused", json_path, j);
    std::printf("wrote %s\n", json_path.c_str());
  }
  return kExitOk;
}

}  // namespace qlora::cli
