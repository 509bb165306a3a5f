// LayerInputOffload (layer_input_offload.h): pinned host slots for the checkpointed layer inputs,
// copied on a side CUDA stream. Ordering, all with events (no host synchronization):
//   forward   side waits for the compute stream (h is written), copies h -> host; h's memory is
//             marked as used by the side stream so the allocator does not hand it out again before
//             the copy has read it;
//   backward  side copies host -> a device tensor (its own stream orders it after the forward's
//             copy); the compute stream waits for that copy before the layer reads it, and the
//             tensor is marked as used by the compute stream for the same allocator reason.
#include "train/layer_input_offload.h"

#include <optional>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace qlora {

struct LayerInputOffload::Impl {
  bool on = false;
  at::Device device{at::kCPU};
  std::vector<at::Tensor> kept;     // the input itself (off), or its pinned host copy (on)
  std::vector<at::Tensor> fetched;  // on: the device copy being brought back
#ifdef QLORA_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> side;
  std::vector<std::optional<at::cuda::CUDAEvent>> arrived;  // on: the host -> device copy is done
#endif
};

LayerInputOffload::LayerInputOffload(size_t layers, bool on, const at::Device& device) : impl_(new Impl) {
  Impl& s = *impl_;
  s.device = device;
  s.kept.resize(layers);
  s.fetched.resize(layers);
#ifdef QLORA_WITH_CUDA
  s.on = on && device.is_cuda();
  if (s.on) {
    s.side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index());
    s.arrived.resize(layers);
  }
#else
  (void)on;
#endif
}

LayerInputOffload::~LayerInputOffload() = default;

void LayerInputOffload::keep(size_t i, const at::Tensor& h) {
  Impl& s = *impl_;
  if (!s.on) {
    s.kept.at(i) = h;
    return;
  }
#ifdef QLORA_WITH_CUDA
  const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(s.device.index());
  at::Tensor host = at::empty(h.sizes(), h.options().device(at::kCPU).pinned_memory(true));
  at::cuda::CUDAEvent written;
  written.record(compute);
  written.block(*s.side);
  {
    const c10::cuda::CUDAStreamGuard guard(*s.side);
    host.copy_(h, /*non_blocking=*/true);
  }
  h.record_stream(*s.side);
  s.kept.at(i) = std::move(host);
#endif
}

void LayerInputOffload::prefetch(size_t i) {
  Impl& s = *impl_;
  if (!s.on || i >= s.kept.size() || !s.kept[i].defined() || s.fetched[i].defined()) return;
#ifdef QLORA_WITH_CUDA
  const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(s.device.index());
  const at::Tensor& host = s.kept[i];
  at::Tensor dev;
  {
    const c10::cuda::CUDAStreamGuard guard(*s.side);
    dev = at::empty(host.sizes(), host.options().device(s.device).pinned_memory(false));
    dev.copy_(host, /*non_blocking=*/true);
    s.arrived[i].emplace();
    s.arrived[i]->record(*s.side);
  }
  dev.record_stream(compute);
  s.fetched[i] = std::move(dev);
#endif
}

at::Tensor LayerInputOffload::take(size_t i) {
  Impl& s = *impl_;
  at::Tensor out;
  if (!s.on) {
    out = std::move(s.kept.at(i));
    s.kept[i] = at::Tensor();
    return out;
  }
#ifdef QLORA_WITH_CUDA
  prefetch(i);
  TORCH_CHECK(s.arrived.at(i).has_value(), "LayerInputOffload: layer ", i, "'s input was never kept");
  s.arrived[i]->block(c10::cuda::getCurrentCUDAStream(s.device.index()));
  s.arrived[i].reset();
  out = std::move(s.fetched[i]);
  s.fetched[i] = at::Tensor();
  s.kept[i] = at::Tensor();  // the pinned block returns to the host cache once its copies are done
#endif
  return out;
}

}  // namespace qlora
