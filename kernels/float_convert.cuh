// fp32 <-> storage type conversions shared by the kernels: to_float<T>(x) is exact; from_float<T>
// rounds to nearest even (the rounding of PyTorch's and bitsandbytes' float -> half/bfloat16 casts).
// cuda_bf16.h provides the bf16 forms on every architecture from sm_75 on.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qlora::kernels {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace qlora::kernels
