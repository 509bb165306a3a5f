// Closed-form cross-entropy over one chunk of logits, in place, in fp32 (with logit scale, tanh
// softcap and z-loss): the CPU reference of kernels/cross_entropy.cuh, and the step the fused
// linear + cross-entropy runs on every chunk. Also: how many rows a chunk has, and whether a CUDA
// graph is being captured.
#include <ATen/ATen.h>

#include <algorithm>
#include <string>

#include "loss/flce_internal.h"
#include "qlora/error.h"
#include "qlora/flce.h"

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>
#endif

namespace qlora {

FlceOptions::Reduction flce_reduction_from_string(const std::string& s) {
  if (s == "mean") return FlceOptions::Reduction::mean;
  if (s == "sum") return FlceOptions::Reduction::sum;
  if (s == "none") return FlceOptions::Reduction::none;
  throw UserError("fused_linear_cross_entropy: reduction must be \"mean\", \"sum\" or \"none\", found \"" + s + "\"");
}

// Row i, label y, logits l (all fp32):
//   u = s*l;  z = c*tanh(u/c) when softcap c > 0, else u;  lse = logsumexp(z)
//   loss = lse - z_y + zl*lse^2
//   dloss/dz = softmax(z)*(1 + 2*zl*lse) - onehot(y)
//   dloss/dl = dloss/dz * s * (1 - (z/c)^2)      [the tanh factor only with a softcap]
std::tuple<at::Tensor, at::Tensor> cross_entropy_chunk_reference(at::Tensor& g, const at::Tensor& labels,
                                                                 const FlceOptions& o, double grad_scale) {
  TORCH_CHECK(g.dim() == 2 && g.scalar_type() == at::kFloat && g.is_contiguous(),
              "cross_entropy_chunk_reference: logits_chunk must be a contiguous fp32 [n,V] tensor, found ",
              g.scalar_type(), " ", g.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == g.size(0) && labels.scalar_type() == at::kLong,
              "cross_entropy_chunk_reference: labels must be int64 [", g.size(0), "], found ", labels.scalar_type(),
              " ", labels.sizes());
  const at::Tensor ignored = labels.eq(o.ignore_index);
  // Ignored rows gather/scatter at column 0 and are zeroed afterwards.
  const at::Tensor safe = labels.masked_fill(ignored, 0).unsqueeze(1);

  if (o.logit_scale != 1) g.mul_(o.logit_scale);
  at::Tensor dtanh;  // d z / d u, only with a softcap (needs z before g is overwritten)
  if (o.softcap > 0) {
    g.div_(o.softcap).tanh_();
    if (grad_scale != 0) dtanh = 1 - g * g;
    g.mul_(o.softcap);
  }
  at::Tensor lse = at::logsumexp(g, {1});
  at::Tensor loss = lse - g.gather(1, safe).squeeze(1);
  if (o.z_loss != 0) loss.add_(lse * lse, o.z_loss);
  loss.masked_fill_(ignored, 0);

  if (grad_scale != 0) {
    g.sub_(lse.unsqueeze(1)).exp_();  // softmax(z)
    if (o.z_loss != 0) g.mul_((lse * (2 * o.z_loss) + 1).unsqueeze(1));
    g.scatter_add_(1, safe, at::full({g.size(0), 1}, -1.0f, g.options()));
    if (dtanh.defined()) g.mul_(dtanh);
    g.mul_(grad_scale * o.logit_scale);
    // masked_fill, not a multiply: an ignored row with non-finite logits must still give 0.
    g.masked_fill_(ignored.unsqueeze(1), 0);
  }
  // lse is 0 on ignored rows, as kernels/cross_entropy.cu writes it.
  return {loss, lse.masked_fill(ignored, 0)};
}

bool flce_stream_capturing(const at::Device& device) {
#ifdef QLORA_WITH_CUDA
  if (!device.is_cuda()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(device.index()), &status) == cudaSuccess &&
         status != cudaStreamCaptureStatusNone;
#else
  (void)device;
  return false;
#endif
}

int64_t flce_chunk_rows(int64_t N, int64_t V, at::ScalarType dtype, const at::Device& device, int64_t chunk_size,
                        bool w_trainable) {
  const int64_t n = std::max<int64_t>(N, 1);
  if (chunk_size > 0) return std::min(chunk_size, n);
  // Bytes per row live at once: the GEMM output in X's dtype, its fp32 copy (the gradient is made in
  // place there), and one more fp32 row for logsumexp/softcap temporaries.
  int64_t per_row = std::max<int64_t>(V, 1) * (static_cast<int64_t>(c10::elementSize(dtype)) + 8);
  int64_t budget = int64_t{256} << 20;  // CPU: 256 MiB of chunk, enough to keep GEMMs efficient
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda() && !flce_stream_capturing(device)) {  // capturing: the CPU budget, no driver query
    // A quarter of what the driver reports free (the caching allocator's own free blocks come on
    // top), capped at 1 GiB, beyond which the GEMMs are already large enough to run at full speed
    // (the frozen and trainable sizes below were chosen by measurement).
    size_t free_b = 0, total_b = 0;
    int prev = -1;
    const bool switch_dev = device.has_index() && cudaGetDevice(&prev) == cudaSuccess && prev != device.index();
    if (switch_dev) (void)cudaSetDevice(device.index());
    const cudaError_t st = cudaMemGetInfo(&free_b, &total_b);
    if (switch_dev) (void)cudaSetDevice(prev);
    if (st == cudaSuccess)
      budget = std::min<int64_t>(static_cast<int64_t>(free_b / 4), int64_t{1} << 30);
    else
      (void)cudaGetLastError();
    // W trainable: dW += dlogits^T X_c has the chunk's rows as its inner dimension, and small chunks
    // make that GEMM slow. Measured on an H100 (qlora bench flce, N=16384, H=4096, V=128256):
    // 837-row chunks 3.91x one logits GEMM, 8192-row 3.15x; V=256000: 5.54x vs 3.28x. The kernel
    // works in place on the 16-bit GEMM output there, so a row costs V x dtype bytes; 2 GiB of chunk
    // gives 8192 rows at V=128256 (peak +5.5 GB, dominated by the fp32 dW). W frozen keeps the
    // small chunks of the CPU formula above (837 rows at V=128256: 0.2 GiB of 16-bit logits, since
    // the kernel needs no fp32 copy; extra peak 0.35 GB). Measured on an H100 (2026-12-06, three
    // calls): 4096-row chunks are 2-4 % faster at 1.19 GB extra; the memory is kept for the step's
    // peak, which the loss chunk adds to (chunk_size overrides).
    if (w_trainable && st == cudaSuccess) {
      per_row = std::max<int64_t>(V, 1) * static_cast<int64_t>(c10::elementSize(dtype));
      budget = std::min<int64_t>(static_cast<int64_t>(free_b / 4), int64_t{2} << 30);
    }
  }
#endif
  // The fewest chunks the budget allows, made equal: 14715 rows at a budget of 8371 run as two
  // chunks of 7358, not 8371 + 6344 (a small last chunk fills the GPU poorly and costs as much).
  const int64_t cap = std::clamp<int64_t>(budget / per_row, 1, n);
  const int64_t chunks = (n + cap - 1) / cap;
  return (n + chunks - 1) / chunks;
}

}  // namespace qlora
