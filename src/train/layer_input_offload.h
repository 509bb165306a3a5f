// activation_offloading: the checkpointed layers' inputs wait in pinned host memory between the
// forward and the backward. On CUDA the copies run on a side stream so that they overlap the layers'
// compute: the forward's device-to-host copy of h_i starts once h_i is written and runs while layer
// i computes; in the backward, layer k - 1's input comes back while layer k recomputes and runs
// its backward. Off (or on a CPU device) the inputs stay where they are.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <vector>

namespace qlora {

class LayerInputOffload {
 public:
  // `layers` slots; `on` false (or a CPU device): keep() holds the tensor itself.
  LayerInputOffload(size_t layers, bool on, const at::Device& device);
  ~LayerInputOffload();
  LayerInputOffload(const LayerInputOffload&) = delete;
  LayerInputOffload& operator=(const LayerInputOffload&) = delete;

  // Forward: keep h (just written on the current stream) as layer i's input.
  void keep(size_t i, const at::Tensor& h);
  // Backward: start bringing layer i's input back to the device (no-op if already started or off).
  void prefetch(size_t i);
  // Backward: layer i's input on the device, ready for the current stream; the slot is emptied.
  at::Tensor take(size_t i);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qlora
