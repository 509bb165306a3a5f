// Helpers shared by the src/model/*.cpp files (not part of the public model API).
#pragma once
#include <ATen/ATen.h>

#include <utility>

namespace qlora {

// cos/sin [B, T, head_dim] in `dtype` for int64 position ids [B, T] (rope.cpp).
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, double attention_scaling,
                                               const at::Tensor& position_ids, at::ScalarType dtype);

}  // namespace qlora
