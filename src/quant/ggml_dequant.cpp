// ggml block formats -> fp32 (CPU). The layouts are documented in include/qlora/ggml_quants.h;
// the arithmetic follows ggml's reference dequantize_row_* (each value one fp32 multiply, plus
// one add or subtract for the types with a min), so results match gguf-py's numpy dequantize.
#include "qlora/ggml_quants.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cstring>

#include "qlora/error.h"

namespace qlora {

namespace {

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline float bf16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// One block of each type: `b` points at the block, `y` receives block-size floats.
void block_q4_0(const uint8_t* b, float* y) {
  const float d = fp16(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((qs[j] & 0x0F) - 8) * d;
    y[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

void block_q4_1(const uint8_t* b, float* y) {
  const float d = fp16(b), m = fp16(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>(qs[j] & 0x0F) * d + m;
    y[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

void block_q5_0(const uint8_t* b, float* y) {
  const float d = fp16(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int hi0 = ((qh >> j) & 1) << 4, hi1 = ((qh >> (j + 16)) & 1) << 4;
    y[j] = static_cast<float>(((qs[j] & 0x0F) | hi0) - 16) * d;
    y[j + 16] = static_cast<float>(((qs[j] >> 4) | hi1) - 16) * d;
  }
}

void block_q5_1(const uint8_t* b, float* y) {
  const float d = fp16(b), m = fp16(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const int hi0 = ((qh >> j) & 1) << 4, hi1 = ((qh >> (j + 16)) & 1) << 4;
    y[j] = static_cast<float>((qs[j] & 0x0F) | hi0) * d + m;
    y[j + 16] = static_cast<float>((qs[j] >> 4) | hi1) * d + m;
  }
}

void block_q8_0(const uint8_t* b, float* y) {
  const float d = fp16(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(qs[j]) * d;
}

// The k-quants' 12 bytes of eight 6-bit (scale, min) pairs: pairs 0-3 are the low 6 bits of
// bytes 0-3 (scales) and 4-7 (mins); pairs 4-7 take their low 4 bits from bytes 8-11 (low
// nibble: scale, high nibble: min) and their top 2 bits from the spare top bits of bytes 0-7.
inline void scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& mn) {
  if (j < 4) {
    sc = q[j] & 63;
    mn = q[j + 4] & 63;
  } else {
    sc = static_cast<uint8_t>((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
    mn = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

void block_q4_k(const uint8_t* b, float* y) {
  const float d = fp16(b), dmin = fp16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int c = 0; c < 4; ++c) {  // 64 elements per chunk: 32 low nibbles, then 32 high nibbles
    uint8_t sc, mn;
    scale_min_k4(2 * c, scales, sc, mn);
    const float d1 = d * sc, m1 = dmin * mn;
    scale_min_k4(2 * c + 1, scales, sc, mn);
    const float d2 = d * sc, m2 = dmin * mn;
    for (int l = 0; l < 32; ++l) y[l] = d1 * static_cast<float>(q[l] & 0x0F) - m1;
    for (int l = 0; l < 32; ++l) y[32 + l] = d2 * static_cast<float>(q[l] >> 4) - m2;
    q += 32;
    y += 64;
  }
}

void block_q5_k(const uint8_t* b, float* y) {
  const float d = fp16(b), dmin = fp16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  for (int c = 0; c < 4; ++c) {
    uint8_t sc, mn;
    scale_min_k4(2 * c, scales, sc, mn);
    const float d1 = d * sc, m1 = dmin * mn;
    scale_min_k4(2 * c + 1, scales, sc, mn);
    const float d2 = d * sc, m2 = dmin * mn;
    const uint8_t u1 = static_cast<uint8_t>(1u << (2 * c)), u2 = static_cast<uint8_t>(2u << (2 * c));
    for (int l = 0; l < 32; ++l) y[l] = d1 * static_cast<float>((ql[l] & 0x0F) + (qh[l] & u1 ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) y[32 + l] = d2 * static_cast<float>((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    ql += 32;
    y += 64;
  }
}

void block_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = fp16(b + 208);
  for (int half = 0; half < 2; ++half) {  // 128 elements from 64 ql bytes, 32 qh bytes, 8 scales
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = static_cast<int>((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = static_cast<int>((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = static_cast<int>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = static_cast<int>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
    ql += 64;
    qh += 32;
    sc += 8;
    y += 128;
  }
}

using BlockFn = void (*)(const uint8_t*, float*);

// (elements, bytes, function) per block; nullptr for the element-wise float types.
struct Layout {
  int64_t block;
  int64_t bytes;
  BlockFn fn;
};

bool layout_of(GgmlType t, Layout& out) {
  switch (t) {
    case GgmlType::f32: out = {1, 4, nullptr}; return true;
    case GgmlType::f16: out = {1, 2, nullptr}; return true;
    case GgmlType::bf16: out = {1, 2, nullptr}; return true;
    case GgmlType::q4_0: out = {32, 18, block_q4_0}; return true;
    case GgmlType::q4_1: out = {32, 20, block_q4_1}; return true;
    case GgmlType::q5_0: out = {32, 22, block_q5_0}; return true;
    case GgmlType::q5_1: out = {32, 24, block_q5_1}; return true;
    case GgmlType::q8_0: out = {32, 34, block_q8_0}; return true;
    case GgmlType::q4_k: out = {256, 144, block_q4_k}; return true;
    case GgmlType::q5_k: out = {256, 176, block_q5_k}; return true;
    case GgmlType::q6_k: out = {256, 210, block_q6_k}; return true;
    default: return false;
  }
}

}  // namespace

bool ggml_can_dequantize(GgmlType t) {
  Layout l;
  return layout_of(t, l);
}

void ggml_dequantize_row(GgmlType t, const void* data, int64_t n, float* out, const std::string& where) {
  Layout l;
  if (!layout_of(t, l))
    throw UserError(where + ": ggml type " + ggml_type_name(t) +
                    " cannot be dequantized (supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_K, q5_K, q6_K)");
  if (n < 0 || n % l.block != 0)
    throw UserError(where + ": " + std::to_string(n) + " elements is not a multiple of the " + ggml_type_name(t) +
                    " block size " + std::to_string(l.block));
  const auto* src = static_cast<const uint8_t*>(data);
  const int64_t blocks = n / l.block;
  // Blocks are independent; a grain of 1024 blocks keeps small tensors on one thread.
  at::parallel_for(0, blocks, 1024, [&](int64_t begin, int64_t end) {
    switch (t) {
      case GgmlType::f32: std::memcpy(out + begin, src + begin * 4, static_cast<size_t>(end - begin) * 4); break;
      case GgmlType::f16: for (int64_t i = begin; i < end; ++i) out[i] = fp16(src + 2 * i); break;
      case GgmlType::bf16: for (int64_t i = begin; i < end; ++i) out[i] = bf16(src + 2 * i); break;
      default:
        for (int64_t i = begin; i < end; ++i) l.fn(src + i * l.bytes, out + i * l.block);
    }
  });
}

at::Tensor gguf_tensor_to_float(const GgufFile& file, const GgufTensorInfo& info) {
  const std::string where = file.path().string() + ": tensor " + info.name;
  std::vector<int64_t> shape(info.dims.rbegin(), info.dims.rend());
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  ggml_dequantize_row(info.type, file.tensor_data(info), info.numel(), out.data_ptr<float>(), where);
  return out;
}

}  // namespace qlora
