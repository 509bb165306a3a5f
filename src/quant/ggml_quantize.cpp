// fp32 -> ggml tensor types (f32, f16, bf16, q8_0, q4_0) on the CPU, for writing GGUF files that
// llama.cpp reads. The arithmetic is gguf-py's numpy quantizers (gguf/quants.py) step by step, each
// operation rounded to fp32 as numpy rounds it, so the bytes equal gguf.quants.quantize's
// (tests/oracle/gguf_export.py checks that on random rows). Layouts: include/qlora/ggml_quants.h.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "qlora/error.h"
#include "qlora/ggml_quants.h"

namespace qlora {

namespace {

inline void put_fp16(uint8_t* p, float v) {
  // c10's conversion rounds to nearest even (subnormals included), as numpy's astype(float16).
  const uint16_t h = c10::Half(v).x;
  std::memcpy(p, &h, 2);
}

inline uint16_t bf16_bits(float v) {
  uint32_t n;
  std::memcpy(&n, &v, 4);
  if ((n & 0x7fffffffu) > 0x7f800000u) n = (n & 0xffff0000u) | (64u << 16);  // NaN: keep it quiet
  const uint64_t r = (static_cast<uint64_t>(n) + (0x7fffu + ((n >> 16) & 1u))) >> 16;
  return static_cast<uint16_t>(r);
}

void block_q8_0(const float* x, uint8_t* b) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d == 0.0f ? 0.0f : 1.0f / d;
  put_fp16(b, d);
  for (int j = 0; j < 32; ++j) {
    // numpy's np_roundf: round half away from zero, which std::round is.
    const float q = std::round(x[j] * id);
    b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(q));
  }
}

void block_q4_0(const float* x, uint8_t* b) {
  // argmax of |x| takes the first maximum; d keeps that element's sign.
  int imax = 0;
  float amax = std::fabs(x[0]);
  for (int j = 1; j < 32; ++j)
    if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]), imax = j;
  const float d = x[imax] / -8.0f;
  const float id = d == 0.0f ? 0.0f : 1.0f / d;
  put_fp16(b, d);
  uint8_t q[32];
  for (int j = 0; j < 32; ++j) {
    // The product is rounded before the add (numpy does two operations); volatile keeps a
    // compiler from contracting them into one FMA, which rounds once and can move a .5 boundary.
    volatile float p = x[j] * id;
    const float s = p + 8.5f;
    const int v = static_cast<int>(s);  // trunc; s >= 0 up to rounding, so this is numpy's trunc + uint8
    q[j] = static_cast<uint8_t>(std::min(15, std::max(0, v)));
  }
  for (int j = 0; j < 16; ++j) b[2 + j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
}

}  // namespace

bool ggml_can_quantize(GgmlType t) {
  return t == GgmlType::f32 || t == GgmlType::f16 || t == GgmlType::bf16 || t == GgmlType::q8_0 || t == GgmlType::q4_0;
}

void ggml_quantize_row(GgmlType t, const float* x, int64_t n, void* out, const std::string& where) {
  if (!ggml_can_quantize(t))
    throw UserError(where + ": cannot write ggml type " + ggml_type_name(t) + " (supported: f32, f16, bf16, q8_0, q4_0)");
  const int64_t bs = ggml_block_size(t);
  if (n % bs != 0)
    throw UserError(where + ": " + std::to_string(n) + " elements is not a multiple of the " + ggml_type_name(t) +
                    " block size " + std::to_string(bs));
  auto* o = static_cast<uint8_t*>(out);
  switch (t) {
    case GgmlType::f32: std::memcpy(o, x, static_cast<size_t>(n) * 4); break;
    case GgmlType::f16:
      for (int64_t i = 0; i < n; ++i) put_fp16(o + 2 * i, x[i]);
      break;
    case GgmlType::bf16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = bf16_bits(x[i]);
        std::memcpy(o + 2 * i, &h, 2);
      }
      break;
    case GgmlType::q8_0:
      for (int64_t i = 0; i < n / 32; ++i) block_q8_0(x + 32 * i, o + 34 * i);
      break;
    case GgmlType::q4_0:
      for (int64_t i = 0; i < n / 32; ++i) block_q4_0(x + 32 * i, o + 18 * i);
      break;
    default: break;
  }
}

std::string ggml_quantize_tensor(const at::Tensor& x, GgmlType t, const std::string& where) {
  if (!x.defined() || x.dim() < 1) throw UserError(where + ": expected a tensor with at least one dimension");
  const at::Tensor f = x.to(at::kCPU).to(at::kFloat).contiguous();
  const int64_t k = f.size(-1);
  const int64_t rows = k == 0 ? 0 : f.numel() / k;
  if (!ggml_can_quantize(t) || k % ggml_block_size(t) != 0) ggml_quantize_row(t, nullptr, k, nullptr, where);  // throws
  const uint64_t row_bytes = ggml_row_bytes(t, k, where);
  std::string out(row_bytes * static_cast<uint64_t>(rows), '\0');
  const float* src = f.data_ptr<float>();
  auto* dst = reinterpret_cast<uint8_t*>(out.data());
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) ggml_quantize_row(t, src + r * k, k, dst + r * row_bytes, where);
  });
  return out;
}

}  // namespace qlora
