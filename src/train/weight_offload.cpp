// OffloadedWeight (weight_offload.h). Ordering with events, no host synchronization: the device
// tensor is allocated on the compute stream (so that its block returns to the compute stream's pool
// and serves the backward's allocations once released -- a block of a side stream's pool would
// stay cached there, unusable by the compute stream); the side stream waits for the compute
// stream to reach the allocation (the block may have been in use by kernels still in flight),
// copies, and records `arrived`; get() makes the compute stream wait for that. The tensor is marked
// as used by the side stream, so that a release before the copy ends does not free it early.
#include "train/weight_offload.h"

#include <optional>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace qlora {

struct OffloadedWeight::Impl {
  at::Tensor host;
  at::Device device{at::kCPU};
  at::Tensor on_device;  // the device copy (being made, or ready)
#ifdef QLORA_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> side;
  std::optional<at::cuda::CUDAEvent> arrived;  // the copy is done (until get() waits for it)
#endif
};

OffloadedWeight::OffloadedWeight(at::Tensor host, const at::Device& device) : impl_(new Impl) {
  TORCH_CHECK(host.device().is_cpu(), "OffloadedWeight: the weight must be in host memory, found ", host.device());
  impl_->host = std::move(host);
  impl_->device = device;
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) impl_->side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index());
#endif
}

OffloadedWeight::~OffloadedWeight() = default;

const at::Tensor& OffloadedWeight::host() const { return impl_->host; }

void OffloadedWeight::prefetch() {
  Impl& s = *impl_;
  if (s.on_device.defined()) return;
#ifdef QLORA_WITH_CUDA
  if (s.side) {
    const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(s.device.index());
    s.on_device = at::empty(s.host.sizes(), s.host.options().device(s.device).pinned_memory(false));
    at::cuda::CUDAEvent allocated;
    allocated.record(compute);
    allocated.block(*s.side);
    {
      const c10::cuda::CUDAStreamGuard guard(*s.side);
      s.on_device.copy_(s.host, /*non_blocking=*/true);
      s.arrived.emplace();
      s.arrived->record(*s.side);
    }
    s.on_device.record_stream(*s.side);
    return;
  }
#endif
  s.on_device = s.host.to(s.device);  // no side stream (a CPU device): a plain copy
}

at::Tensor OffloadedWeight::get() {
  Impl& s = *impl_;
  prefetch();
#ifdef QLORA_WITH_CUDA
  if (s.arrived) {
    const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(s.device.index());
    s.arrived->block(compute);
    s.arrived.reset();
  }
#endif
  return s.on_device;
}

void OffloadedWeight::release() {
  Impl& s = *impl_;
#ifdef QLORA_WITH_CUDA
  s.arrived.reset();  // released without get(): record_stream holds the block until the copy ends
#endif
  s.on_device = at::Tensor();
}

bool OffloadedWeight::on_device() const { return impl_->on_device.defined(); }

}  // namespace qlora
