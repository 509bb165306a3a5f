// NF4 arithmetic shared by the CPU reference (src/quant/nf4.cpp) and the CUDA kernels
// (kernels/nf4.cu), so both round every step the same way and agree bit for bit with each other
// and with bitsandbytes. Plain header for g++ and nvcc; no torch.
//
// Facts below were read from bitsandbytes (github.com/bitsandbytes-foundation/bitsandbytes, commit
// 95f9af3): csrc/kernels.cu (dQuantizeNF4, dQuantize<0>, kQuantizeBlockwise,
// kQuantizeBlockwiseSmall, kDequantizeBlockwise), csrc/ops.cu, bitsandbytes/functional.py
// (quantize_4bit, dequantize_4bit, quantize_blockwise, create_dynamic_map), CMakeLists.txt.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD inline
#endif

namespace qlora::kernels {

// The 16 NF4 code values (bnb's nf4 quant_map; index 7 is 0.0). A macro too, so that device code
// can put the same literals into __constant__/shared memory.
#define QLORA_NF4_CODEBOOK                                                                          \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f, \
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f,                    \
      0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f,      \
      0.5626170039176941f, 0.7229568362236023f, 1.0f
inline constexpr float kNF4Codebook[16] = {QLORA_NF4_CODEBOOK};

#if defined(__CUDACC__)
// `static`: one copy per translation unit, so no relocatable device code is needed.
static __constant__ float kNF4CodebookDevice[16] = {QLORA_NF4_CODEBOOK};
#endif

QLORA_HD float nf4_code_value(int code) {
#if defined(__CUDA_ARCH__)
  return kNF4CodebookDevice[code & 15];
#else
  return kNF4Codebook[code & 15];
#endif
}

// ---- exact fp32 steps -------------------------------------------------------------------------
// Device: explicit _rn intrinsics so that no FMA contraction can merge a multiply and an add.
// Host: the project compiles in ISO C++ mode (-std=c++20, not gnu++20), where GCC does not
// contract, and without -mfma; each statement below rounds once to fp32.
QLORA_HD float fmul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
QLORA_HD float fadd_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// ---- 4-bit quantization --------------------------------------------------------------------------
// Per-block absmax as bnb computes it: start at -FLT_MAX and fold fmaxf(m, fabsf(x)) over the
// block's valid elements (fmaxf ignores NaN, so NaN inputs do not poison the block).
inline constexpr float kAbsmaxInit = -FLT_MAX;
QLORA_HD float absmax_fold(float m, float x) { return fmaxf(m, fabsf(x)); }

// bnb stores absmax and scales by its reciprocal: x * (1.0f / absmax). bnb builds with
// --use_fast_math, so its reciprocal is the approximate one (and denormals are flushed); we use
// the correctly rounded IEEE 1.0f / absmax on host and device alike. The two reciprocals can
// differ in the last bit, which rarely moves a value across a threshold (documented in issue 3).
QLORA_HD float inverse_absmax(float absmax) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(absmax);  // == IEEE 1.0f / absmax
#else
  return 1.0f / absmax;
#endif
}

// Nearest NF4 code of a normalized value, through bnb's midpoint threshold tree (dQuantizeNF4 in
// csrc/kernels.cu): thresholds are the fp32 midpoints of adjacent codes, compared with strict
// `>`, so a value exactly on a midpoint goes to the lower code. NaN fails every `>` and gives
// code 0 (-1.0), exactly as in bnb.
QLORA_HD uint8_t nf4_quantize_value(float x) {
  if (x > 0.03979014977812767f) {
    if (x > 0.3893125355243683f) {
      if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 15 : 14;
      return x > 0.5016634166240692f ? 13 : 12;
    }
    if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 11 : 10;
    return x > 0.1202552504837513f ? 9 : 8;
  }
  if (x > -0.33967943489551544f) {
    if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 7 : 6;
    return x > -0.23460740596055984f ? 5 : 4;
  }
  if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 3 : 2;
  return x > -0.8480964004993439f ? 1 : 0;
}

// One element of a block: x * (1/absmax), then the tree. An all-zero block (absmax == 0) gives
// inv = +inf and 0 * inf = NaN, so every element of it, the zero padding of an odd tail included,
// gets code 0 (-1.0): what bnb's CUDA kernels produce (no NaN is ever stored; the block then
// dequantizes to -0.0 * ... = -0.0 when not nested, and to -absmax' when nested). Elsewhere the
// zero padding of an odd numel quantizes as 0.0 (code 7), again as bnb's zero-filled loads do.
QLORA_HD uint8_t nf4_quantize_scaled(float x, float inv_absmax) {
  return nf4_quantize_value(fmul_rn(x, inv_absmax));
}

// out = NF4[code] * absmax, rounded once to fp32 (bnb: dDequantizeNF4(q) * local_abs_max), then
// converted to the output type with round-to-nearest-even by the caller.
QLORA_HD float nf4_dequant_value(int code, float absmax) { return fmul_rn(nf4_code_value(code), absmax); }

// ---- double quantization ("nested" absmax) ------------------------------------------------------
// Reconstruct a block's fp32 absmax: bnb's dequantize_4bit runs dequantize_blockwise (code2[q] *
// absmax2[b / 256] in fp32) and then `absmax += offset` (an fp32 add): two roundings, in this order.
QLORA_HD float nested_absmax(float code2_value, float absmax2, float offset) {
  return fadd_rn(fmul_rn(code2_value, absmax2), offset);
}

// The value double-quantized for block b: absmax[b] - offset, in fp32 (bnb: `_absmax - offset`).
QLORA_HD float nested_centered(float absmax, float offset) { return fadd_rn(absmax, -offset); }

// 8-bit quantization of one normalized value x = (absmax - offset) * (1/absmax2) to an index of
// the 256-entry sorted code (bnb's signed dynamic map). Mirrors dQuantize<STOCHASTIC=0> in
// csrc/kernels.cu: a 7-step binary search from pivot 127 (steps 64..1, going up when x > code),
// which tracks the last code below (lower) and above (upper) x, then a nearest choice against
// the fp32 midpoint (a + b) * 0.5f: above the current pivot, `x > midpoint` picks the upper code
// (a tie stays on the pivot); below it, `x < midpoint` picks the lower code (a tie stays on the
// pivot). The bounds start as -1.0 / 1.0 and are replaced by code[0] / code[255] only when the
// search never moved off that end. NaN (an all-equal 256-block: 0 * inf) ends at index 0.
QLORA_HD uint8_t dynamic_quantize_value(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[255];
  if (lower_pivot == 0) lower = code[0];
  if (x > val) {
    const float mid = fmul_rn(fadd_rn(upper, val), 0.5f);
    return static_cast<uint8_t>(x > mid ? upper_pivot : pivot);
  }
  const float mid = fmul_rn(fadd_rn(lower, val), 0.5f);
  return static_cast<uint8_t>(x < mid ? lower_pivot : pivot);
}

// One absmax value's code: centre it, scale by the 256-block's reciprocal absmax2, search.
QLORA_HD uint8_t nested_quantize(const float* code2, float absmax, float offset, float inv_absmax2) {
  return dynamic_quantize_value(code2, fmul_rn(nested_centered(absmax, offset), inv_absmax2));
}

// ---- the double-quant offset: a deterministic mean -----------------------------------------------
// bnb uses torch's `absmax.mean()` (an fp32 reduction whose order depends on the device and torch
// version). We define the mean so that CPU and CUDA agree bit for bit:
//   partials[t] = sum over i = t (mod 1024), ascending i, of (double)absmax[i], t in 0..1023;
//   for (s = 512; s > 0; s /= 2) partials[t] += partials[t + s] for t < s;
//   offset = (float)(partials[0] / nblocks)        (0 when nblocks == 0).
// The CUDA side implements the same order (one thread per t, then the halving tree).
inline constexpr int kMeanPartials = 1024;

inline float absmax_mean_host(const float* absmax, int64_t nblocks) {
  if (nblocks <= 0) return 0.0f;
  double partials[kMeanPartials] = {};
  for (int64_t i = 0; i < nblocks; ++i) partials[i % kMeanPartials] += static_cast<double>(absmax[i]);
  for (int s = kMeanPartials / 2; s > 0; s /= 2)
    for (int t = 0; t < s; ++t) partials[t] += partials[t + s];
  return static_cast<float>(partials[0] / static_cast<double>(nblocks));
}

}  // namespace qlora::kernels
