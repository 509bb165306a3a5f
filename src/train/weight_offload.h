// lm_head_offloading: a frozen weight that lives in pinned host memory and is on the GPU only while
// the step uses it. The host-to-device copy runs on a side stream, started early (the start of the
// forward) so that it overlaps the layers' compute; the device copy is dropped after the loss, so
// the backward through the layers -- the step's peak -- runs without it.
#pragma once
#include <ATen/ATen.h>

#include <memory>

namespace qlora {

class OffloadedWeight {
 public:
  // `host`: the weight in pinned CPU memory; `device`: where it is used (a CUDA device).
  OffloadedWeight(at::Tensor host, const at::Device& device);
  ~OffloadedWeight();
  OffloadedWeight(const OffloadedWeight&) = delete;
  OffloadedWeight& operator=(const OffloadedWeight&) = delete;

  const at::Tensor& host() const;
  // Starts the copy to the device on the side stream (no-op while a copy exists or is under way).
  void prefetch();
  // The device copy, ready for the current stream (prefetch() first when it was not started).
  at::Tensor get();
  // Forgets the device copy: its memory returns to the allocator once nothing else holds it (an
  // autograd graph that saved it keeps it until that node's backward has run).
  void release();
  bool on_device() const;  // a device copy exists (prefetched or got, not yet released)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qlora
