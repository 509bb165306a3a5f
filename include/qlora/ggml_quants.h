// ggml tensor types -> fp32 on the CPU, for reading llama.cpp GGUF files as base weights. Block
// layouts as ggml's ggml-common.h defines them (every scale an IEEE fp16, little-endian):
//   q4_0  32 elems, 18 B: d; qs[16]          x[j] = ((qs[j] & 15) - 8) d,  x[j+16] = ((qs[j] >> 4) - 8) d
//   q4_1  32 elems, 20 B: d, m; qs[16]       x[j] = (qs[j] & 15) d + m,    x[j+16] = (qs[j] >> 4) d + m
//   q5_0  32 elems, 22 B: d; qh (u32); qs[16]: as q4_0 with bit j / j+16 of qh as the 5th bit, minus 16
//   q5_1  32 elems, 24 B: d, m; qh; qs[16]:    as q4_1 with the 5th bit from qh
//   q8_0  32 elems, 34 B: d; int8 qs[32]     x[j] = qs[j] d
//   q4_K 256 elems, 144 B: d, dmin; 12 bytes of eight 6-bit (scale, min) pairs; qs[128]:
//        sub-block s of 32: x = d*sc[s]*q - dmin*mn[s]; nibbles: low of 32 bytes, then high of the same 32
//   q5_K 256 elems, 176 B: as q4_K plus qh[32] (bit 2c / 2c+1 of qh[l] is the 5th bit of chunk c's low/high nibble)
//   q6_K 256 elems, 210 B: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], d:
//        x = d * scales[s] * (q - 32), sub-blocks of 16
//   f16 / bf16 / f32: one element per "block".
// Verified against gguf-py's gguf.quants.dequantize (tests/oracle/ggml_dequant.py).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "qlora/gguf.h"

namespace qlora {

// True for the types ggml_dequantize_row can read: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0,
// q4_K, q5_K, q6_K.
bool ggml_can_dequantize(GgmlType t);

// Dequantizes `n` elements of type `t` starting at `data` (ggml_row_bytes(t, n) bytes) into
// `out`. n must be a multiple of the type's block size; UserError naming `where` otherwise, and
// for types ggml_can_dequantize rejects.
void ggml_dequantize_row(GgmlType t, const void* data, int64_t n, float* out, const std::string& where = "ggml dequantize");

// A GGUF tensor as an fp32 CPU tensor in torch order: the shape is dims reversed (ggml dims[0]
// is the last, fastest-varying torch dimension), so a weight stored with dims {in, out} comes back
// as [out, in]. UserError naming the file and tensor for types that cannot be read.
at::Tensor gguf_tensor_to_float(const GgufFile& file, const GgufTensorInfo& info);

// ---- fp32 -> ggml (src/quant/ggml_quantize.cpp), what gguf-py's gguf.quants.quantize writes, bit
// for bit (tests/oracle/gguf_export.py), all arithmetic in fp32 as numpy does it:
//   f32   as is
//   f16   IEEE half, round to nearest even (numpy astype(float16))
//   bf16  round to nearest even on the bits; NaN forced quiet (ggml_compute_fp32_to_bf16)
//   q8_0  per block of 32: d = max|x| / 127, id = d == 0 ? 0 : 1 / d, q = round-half-away(x * id),
//         d stored as fp16
//   q4_0  per block of 32: m = the first element of largest |x|, d = m / -8, id = d == 0 ? 0 : 1 / d,
//         q = min(15, trunc(x * id + 8.5)) (product and sum each rounded: no FMA); q[j] in the low
//         nibble of byte j, q[j + 16] in its high nibble
// True for the types ggml_quantize_row writes: f32, f16, bf16, q8_0, q4_0.
bool ggml_can_quantize(GgmlType t);
// Quantizes `n` floats (a multiple of the block size: UserError naming `where` otherwise, and for
// types ggml_can_quantize rejects) into ggml_row_bytes(t, n) bytes at `out`.
void ggml_quantize_row(GgmlType t, const float* x, int64_t n, void* out, const std::string& where = "ggml quantize");
// A CPU tensor of any float dtype and shape [..., k] as ggml bytes of type t (rows of k elements,
// converted to fp32 first), in parallel over rows.
std::string ggml_quantize_tensor(const at::Tensor& x, GgmlType t, const std::string& where = "ggml quantize");

}  // namespace qlora
