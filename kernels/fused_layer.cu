// Fused RMSNorm and SwiGLU kernels (launchers and semantics in fused_layer.cuh).
//
// Why: written with ATen ops, RMSNorm is eight kernels (cast, pow, mean, add, rsqrt, mul, cast,
// mul) that move ~20 bytes per element in the forward and more in its autograd backward, and
// silu(g) * u is two kernels plus three in the backward, with silu(g) kept for it. Here each is one
// pass: RMSNorm reads x once (its second read hits L1/L2: one row per CTA) and writes out once,
// keeping only the fp32 1/rms per row for the backward; SwiGLU keeps nothing but g and u.
//
// RoPE (rotary embedding on q and k): written with ATen ops it is a neg, a cat and three
// elementwise kernels over strided (transposed) q / k, forward and again in the backward; here one
// pass, a few lanes of a warp per row of head_dim values with 8-byte accesses, reading and writing
// the tensors in their own strides.
//
// Layout: RMSNorm: one CTA of 256 threads per row, 16-byte vectors (8 bf16/fp16 or 4 fp32 values)
// when hidden is a multiple of the vector width and every pointer is 16-byte aligned, else scalar;
// the row's sum is reduced with warp shuffles then a 8-entry shared table, in a fixed order
// (deterministic). SwiGLU: a grid-stride loop over 16-byte vectors (same condition), scalar
// otherwise. Math in fp32; the library is built with --fmad=false, so every product and sum rounds
// separately, as ATen's unfused kernels do; expf and sqrtf are the accurate (not fast-math) forms.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "float_convert.cuh"
#include "fused_layer.cuh"

namespace qlora::kernels {
namespace {

constexpr int kNormThreads = 256;
constexpr int kNormWarps = kNormThreads / 32;
constexpr int kEltThreads = 256;

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// kVec<T> values at p (16-byte aligned) as floats, and back.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[kVec<T>]) {
  union {
    uint4 u;
    T t[kVec<T>];
  } v;
  v.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) f[i] = to_float(v.t[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[kVec<T>]) {
  union {
    uint4 u;
    T t[kVec<T>];
  } v;
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) v.t[i] = from_float<T>(f[i]);
  *reinterpret_cast<uint4*>(p) = v.u;
}

// Rounds through T: the value a T tensor holds.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// Sum over the CTA (kNormThreads threads), the same result in every thread; fixed order.
__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kNormWarps; ++w) total += shared[w];
  return total;
}

// Calls f(i, values) for every vector (VEC) or element (!VEC) of a row this thread owns.
template <typename T, bool VEC, typename F>
__device__ __forceinline__ void for_row(int64_t hidden, F&& f) {
  if constexpr (VEC) {
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec<T>; i < hidden; i += int64_t{kNormThreads} * kVec<T>) f(i);
  } else {
    for (int64_t i = threadIdx.x; i < hidden; i += kNormThreads) f(i);
  }
}

// The row's input value i: x, or round_T(x + delta) (the residual add of add_rms_norm) when delta
// is given -- computed in both passes (the row is in L1 by the second) rather than read back.
template <typename T, bool VEC>
__device__ __forceinline__ void norm_input(const T* xr, const T* dr, int64_t i, float (&v)[VEC ? kVec<T> : 1]) {
  if constexpr (VEC) {
    load_vec(xr + i, v);
    if (dr != nullptr) {
      float d[kVec<T>];
      load_vec(dr + i, d);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) v[j] = round_to<T>(v[j] + d[j]);
    }
  } else {
    v[0] = to_float(xr[i]);
    if (dr != nullptr) v[0] = round_to<T>(v[0] + to_float(dr[i]));
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kNormThreads) rms_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ delta,
                                                                        const T* __restrict__ w, T* __restrict__ sum,
                                                                        T* __restrict__ out, float* __restrict__ rstd,
                                                                        int64_t hidden, float eps) {
  __shared__ float shared[kNormWarps];
  constexpr int kN = VEC ? kVec<T> : 1;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  const T* dr = delta != nullptr ? delta + row * hidden : nullptr;
  T* outr = out + row * hidden;
  float sq = 0.f;
  for_row<T, VEC>(hidden, [&](int64_t i) {
    float v[kN];
    norm_input<T, VEC>(xr, dr, i, v);
#pragma unroll
    for (int j = 0; j < kN; ++j) sq += v[j] * v[j];
    if (dr != nullptr) {
      if constexpr (VEC) store_vec(sum + row * hidden + i, v);
      else sum[row * hidden + i] = from_float<T>(v[0]);
    }
  });
  const float mean = block_sum(sq, shared) / static_cast<float>(hidden);
  const float r = 1.0f / sqrtf(mean + eps);
  if (rstd != nullptr && threadIdx.x == 0) rstd[row] = r;
  for_row<T, VEC>(hidden, [&](int64_t i) {
    float v[kN];
    norm_input<T, VEC>(xr, dr, i, v);
    if constexpr (VEC) {
      float wv[kVec<T>];
      load_vec(w + i, wv);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) v[j] = wv[j] * round_to<T>(v[j] * r);
      store_vec(outr + i, v);
    } else {
      outr[i] = from_float<T>(to_float(w[i]) * round_to<T>(v[0] * r));
    }
  });
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kNormThreads) rms_norm_backward_kernel(const T* __restrict__ dy,
                                                                         const T* __restrict__ x,
                                                                         const T* __restrict__ w,
                                                                         const float* __restrict__ rstd,
                                                                         const T* __restrict__ dres,
                                                                         T* __restrict__ dx, int64_t hidden) {
  __shared__ float shared[kNormWarps];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  const T* dyr = dy + row * hidden;
  T* dxr = dx + row * hidden;
  const float r = rstd[row];
  float dot = 0.f;  // sum of g * n, g = w dy, n = x r
  for_row<T, VEC>(hidden, [&](int64_t i) {
    if constexpr (VEC) {
      float xv[kVec<T>], gv[kVec<T>], wv[kVec<T>];
      load_vec(xr + i, xv);
      load_vec(dyr + i, gv);
      load_vec(w + i, wv);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) dot += (wv[j] * gv[j]) * (xv[j] * r);
    } else {
      dot += (to_float(w[i]) * to_float(dyr[i])) * (to_float(xr[i]) * r);
    }
  });
  const float mean_dot = block_sum(dot, shared) / static_cast<float>(hidden);
  for_row<T, VEC>(hidden, [&](int64_t i) {
    if constexpr (VEC) {
      float xv[kVec<T>], gv[kVec<T>], wv[kVec<T>];
      load_vec(xr + i, xv);
      load_vec(dyr + i, gv);
      load_vec(w + i, wv);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) gv[j] = r * (wv[j] * gv[j] - (xv[j] * r) * mean_dot);
      if (dres != nullptr) {  // the residual's gradient, added as autograd would: two T tensors summed
        float rv[kVec<T>];
        load_vec(dres + row * hidden + i, rv);
#pragma unroll
        for (int j = 0; j < kVec<T>; ++j) gv[j] = round_to<T>(gv[j]) + rv[j];
      }
      store_vec(dxr + i, gv);
    } else {
      const float g = to_float(w[i]) * to_float(dyr[i]);
      float v = r * (g - (to_float(xr[i]) * r) * mean_dot);
      if (dres != nullptr) v = round_to<T>(v) + to_float(dres[row * hidden + i]);
      dxr[i] = from_float<T>(v);
    }
  });
}

// at::silu's arithmetic (opmath float): x / (1 + exp(-x)).
__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

template <typename T>
__device__ __forceinline__ float swiglu_value(float g, float u) {
  return round_to<T>(silu(g)) * u;
}

// at::silu_backward's arithmetic: dy * sigmoid * (1 + x * (1 - sigmoid)), after the product
// rule's round_T(dout * u).
template <typename T>
__device__ __forceinline__ void swiglu_grads(float dout, float g, float u, float& d_gate, float& d_up) {
  d_up = dout * round_to<T>(silu(g));
  const float t = round_to<T>(dout * u);
  const float sig = 1.0f / (1.0f + expf(-g));
  d_gate = t * sig * (1.0f + g * (1.0f - sig));
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kEltThreads) swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                                                     T* __restrict__ out, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * kEltThreads;
  const int64_t first = int64_t{blockIdx.x} * kEltThreads + threadIdx.x;
  if constexpr (VEC) {
    for (int64_t v = first; v < n / kVec<T>; v += stride) {
      float g[kVec<T>], u[kVec<T>];
      load_vec(gate + v * kVec<T>, g);
      load_vec(up + v * kVec<T>, u);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) g[j] = swiglu_value<T>(g[j], u[j]);
      store_vec(out + v * kVec<T>, g);
    }
  } else {
    for (int64_t i = first; i < n; i += stride) out[i] = from_float<T>(swiglu_value<T>(to_float(gate[i]), to_float(up[i])));
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kEltThreads) swiglu_backward_kernel(const T* __restrict__ dout,
                                                                      const T* __restrict__ gate,
                                                                      const T* __restrict__ up, T* __restrict__ d_gate,
                                                                      T* __restrict__ d_up, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * kEltThreads;
  const int64_t first = int64_t{blockIdx.x} * kEltThreads + threadIdx.x;
  if constexpr (VEC) {
    for (int64_t v = first; v < n / kVec<T>; v += stride) {
      float d[kVec<T>], g[kVec<T>], u[kVec<T>], dg[kVec<T>], du[kVec<T>];
      load_vec(dout + v * kVec<T>, d);
      load_vec(gate + v * kVec<T>, g);
      load_vec(up + v * kVec<T>, u);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) swiglu_grads<T>(d[j], g[j], u[j], dg[j], du[j]);
      store_vec(d_gate + v * kVec<T>, dg);
      store_vec(d_up + v * kVec<T>, du);
    }
  } else {
    for (int64_t i = first; i < n; i += stride) {
      float dg, du;
      swiglu_grads<T>(to_float(dout[i]), to_float(gate[i]), to_float(up[i]), dg, du);
      d_gate[i] = from_float<T>(dg);
      d_up[i] = from_float<T>(du);
    }
  }
}

// P consecutive values of T at p (aligned to P * sizeof(T) bytes) as floats, and back: the RoPE
// kernel's vector access (8 bytes for bf16 / fp16, 16 for fp32).
constexpr int kRopeVec = 4;
template <typename T>
struct RopeVec {
  using Bits = typename std::conditional<sizeof(T) == 2, uint2, uint4>::type;
  union U {
    Bits bits;
    T t[kRopeVec];
  };
  static __device__ __forceinline__ void load(const T* p, float (&f)[kRopeVec]) {
    U u;
    u.bits = *reinterpret_cast<const Bits*>(p);
#pragma unroll
    for (int j = 0; j < kRopeVec; ++j) f[j] = to_float(u.t[j]);
  }
  static __device__ __forceinline__ void store(T* p, const float (&f)[kRopeVec]) {
    U u;
#pragma unroll
    for (int j = 0; j < kRopeVec; ++j) u.t[j] = from_float<T>(f[j]);
    *reinterpret_cast<Bits*>(p) = u.bits;
  }
};

// The rotation of n (<= kRopeVec) pairs: both halves, each product rounded to T as ATen does.
template <typename T, bool BACKWARD>
__device__ __forceinline__ void rope_rotate(const float (&x1)[kRopeVec], const float (&x2)[kRopeVec],
                                            const float (&c1)[kRopeVec], const float (&c2)[kRopeVec],
                                            const float (&s1)[kRopeVec], const float (&s2)[kRopeVec],
                                            float (&o1)[kRopeVec], float (&o2)[kRopeVec], int n) {
#pragma unroll
  for (int j = 0; j < kRopeVec; ++j) {
    if (j >= n) break;
    if constexpr (!BACKWARD) {
      o1[j] = round_to<T>(x1[j] * c1[j]) - round_to<T>(x2[j] * s1[j]);
      o2[j] = round_to<T>(x2[j] * c2[j]) + round_to<T>(x1[j] * s2[j]);
    } else {
      o1[j] = round_to<T>(x1[j] * c1[j]) + round_to<T>(x2[j] * s2[j]);
      o2[j] = round_to<T>(x2[j] * c2[j]) - round_to<T>(x1[j] * s1[j]);
    }
  }
}

// RoPE: a group of `lanes` lanes of a warp per row of head_dim values (32 / lanes rows per warp,
// grid-stride over the batch * heads * seq rows); each lane rotates kRopeVec consecutive pairs (i,
// i + head_dim / 2) at a time with vector loads (VEC; head_dim / 2 a multiple of kRopeVec, every
// pointer and stride aligned to it), or one pair at a time. The row is split into (batch, head,
// token) once per row: the first form, one thread per pair, paid three 64-bit divisions per pair --
// a long software routine on the GPU -- and ran at ~4x its memory time on an H100; a warp per row
// with 2-byte accesses still moved only ~37 % of a copy's bandwidth there (2026-12-07).
template <typename T, bool BACKWARD, bool VEC>
__global__ void __launch_bounds__(kEltThreads) rope_kernel(const T* __restrict__ x, const T* __restrict__ cos,
                                                           const T* __restrict__ sin, T* __restrict__ out,
                                                           RopeArgs a, int lanes) {
  constexpr int kWarpsPerBlock = kEltThreads / 32;
  constexpr int kStep = VEC ? kRopeVec : 1;  // pairs per lane per iteration
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int rows_per_warp = 32 / lanes, sub = lane / lanes, j = lane % lanes;
  const int64_t half = a.head_dim / 2;
  const int64_t rows = a.batch * a.heads * a.seq;
  const int64_t warp = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t stride = int64_t{gridDim.x} * kWarpsPerBlock * rows_per_warp;
  for (int64_t row = warp * rows_per_warp + sub; row < rows; row += stride) {
    const int64_t t = row % a.seq, h = (row / a.seq) % a.heads, b = row / (a.seq * a.heads);
    const T* xr = x + b * a.x_stride[0] + h * a.x_stride[1] + t * a.x_stride[2];
    T* outr = out + b * a.out_stride[0] + h * a.out_stride[1] + t * a.out_stride[2];
    const T* cr = cos + b * a.cs_stride[0] + t * a.cs_stride[1];
    const T* sr = sin + b * a.cs_stride[0] + t * a.cs_stride[1];
    for (int64_t i = int64_t{j} * kStep; i < half; i += int64_t{lanes} * kStep) {
      float x1[kRopeVec], x2[kRopeVec], c1[kRopeVec], c2[kRopeVec], s1[kRopeVec], s2[kRopeVec], o1[kRopeVec], o2[kRopeVec];
      if constexpr (VEC) {
        RopeVec<T>::load(xr + i, x1);
        RopeVec<T>::load(xr + i + half, x2);
        RopeVec<T>::load(cr + i, c1);
        RopeVec<T>::load(cr + i + half, c2);
        RopeVec<T>::load(sr + i, s1);
        RopeVec<T>::load(sr + i + half, s2);
        rope_rotate<T, BACKWARD>(x1, x2, c1, c2, s1, s2, o1, o2, kRopeVec);
        RopeVec<T>::store(outr + i, o1);
        RopeVec<T>::store(outr + i + half, o2);
      } else {
        x1[0] = to_float(xr[i]), x2[0] = to_float(xr[i + half]);
        c1[0] = to_float(cr[i]), c2[0] = to_float(cr[i + half]);
        s1[0] = to_float(sr[i]), s2[0] = to_float(sr[i + half]);
        rope_rotate<T, BACKWARD>(x1, x2, c1, c2, s1, s2, o1, o2, 1);
        outr[i] = from_float<T>(o1[0]);
        outr[i + half] = from_float<T>(o2[0]);
      }
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Enough CTAs to fill the device a few times over; the grid-stride loop does the rest.
int elementwise_blocks(int64_t work_items) {
  const int64_t wanted = (work_items + kEltThreads - 1) / kEltThreads;
  return static_cast<int>(wanted < 1 ? 1 : (wanted > 65535 ? 65535 : wanted));
}

template <typename T>
cudaError_t launch_rms_forward(const RmsNormForwardArgs& a, cudaStream_t s) {
  const bool vec = a.hidden % kVec<T> == 0 && aligned16(a.x) && aligned16(a.w) && aligned16(a.out) &&
                   aligned16(a.delta) && aligned16(a.sum);
  const auto* x = static_cast<const T*>(a.x);
  const auto* delta = static_cast<const T*>(a.delta);
  const auto* w = static_cast<const T*>(a.w);
  auto* sum = static_cast<T*>(a.sum);
  auto* out = static_cast<T*>(a.out);
  const dim3 grid(static_cast<unsigned>(a.rows));
  if (vec) rms_norm_forward_kernel<T, true><<<grid, kNormThreads, 0, s>>>(x, delta, w, sum, out, a.rstd, a.hidden, a.eps);
  else rms_norm_forward_kernel<T, false><<<grid, kNormThreads, 0, s>>>(x, delta, w, sum, out, a.rstd, a.hidden, a.eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_rms_backward(const RmsNormBackwardArgs& a, cudaStream_t s) {
  const bool vec = a.hidden % kVec<T> == 0 && aligned16(a.dy) && aligned16(a.x) && aligned16(a.w) && aligned16(a.dx) &&
                   aligned16(a.dres);
  const auto* dy = static_cast<const T*>(a.dy);
  const auto* x = static_cast<const T*>(a.x);
  const auto* w = static_cast<const T*>(a.w);
  const auto* dres = static_cast<const T*>(a.dres);
  auto* dx = static_cast<T*>(a.dx);
  const dim3 grid(static_cast<unsigned>(a.rows));
  if (vec) rms_norm_backward_kernel<T, true><<<grid, kNormThreads, 0, s>>>(dy, x, w, a.rstd, dres, dx, a.hidden);
  else rms_norm_backward_kernel<T, false><<<grid, kNormThreads, 0, s>>>(dy, x, w, a.rstd, dres, dx, a.hidden);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_swiglu_forward(const SwigluForwardArgs& a, cudaStream_t s) {
  const bool vec = a.n % kVec<T> == 0 && aligned16(a.gate) && aligned16(a.up) && aligned16(a.out);
  const auto* g = static_cast<const T*>(a.gate);
  const auto* u = static_cast<const T*>(a.up);
  auto* out = static_cast<T*>(a.out);
  if (vec) swiglu_forward_kernel<T, true><<<elementwise_blocks(a.n / kVec<T>), kEltThreads, 0, s>>>(g, u, out, a.n);
  else swiglu_forward_kernel<T, false><<<elementwise_blocks(a.n), kEltThreads, 0, s>>>(g, u, out, a.n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_swiglu_backward(const SwigluBackwardArgs& a, cudaStream_t s) {
  const bool vec = a.n % kVec<T> == 0 && aligned16(a.dout) && aligned16(a.gate) && aligned16(a.up) &&
                   aligned16(a.d_gate) && aligned16(a.d_up);
  const auto* d = static_cast<const T*>(a.dout);
  const auto* g = static_cast<const T*>(a.gate);
  const auto* u = static_cast<const T*>(a.up);
  auto* dg = static_cast<T*>(a.d_gate);
  auto* du = static_cast<T*>(a.d_up);
  if (vec) swiglu_backward_kernel<T, true><<<elementwise_blocks(a.n / kVec<T>), kEltThreads, 0, s>>>(d, g, u, dg, du, a.n);
  else swiglu_backward_kernel<T, false><<<elementwise_blocks(a.n), kEltThreads, 0, s>>>(d, g, u, dg, du, a.n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_rope(const RopeArgs& a, cudaStream_t s) {
  const auto* x = static_cast<const T*>(a.x);
  const auto* c = static_cast<const T*>(a.cos);
  const auto* sn = static_cast<const T*>(a.sin);
  auto* out = static_cast<T*>(a.out);
  const int64_t half = a.head_dim / 2;
  auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) % (kRopeVec * sizeof(T))) == 0; };
  bool vec = half % kRopeVec == 0 && aligned(x) && aligned(c) && aligned(sn) && aligned(out);
  for (int d = 0; d < 3; ++d) vec = vec && a.x_stride[d] % kRopeVec == 0 && a.out_stride[d] % kRopeVec == 0;
  vec = vec && a.cs_stride[0] % kRopeVec == 0 && a.cs_stride[1] % kRopeVec == 0;
  // Lanes per row: the fewest powers of two covering the row's steps, up to the warp.
  const int64_t steps = vec ? half / kRopeVec : half;
  int lanes = 1;
  while (lanes < 32 && lanes < steps) lanes *= 2;
  const int64_t rows = a.batch * a.heads * a.seq;
  const int blocks = elementwise_blocks((rows + 32 / lanes - 1) / (32 / lanes) * 32);
  if (vec) {
    if (a.backward) rope_kernel<T, true, true><<<blocks, kEltThreads, 0, s>>>(x, c, sn, out, a, lanes);
    else rope_kernel<T, false, true><<<blocks, kEltThreads, 0, s>>>(x, c, sn, out, a, lanes);
  } else {
    if (a.backward) rope_kernel<T, true, false><<<blocks, kEltThreads, 0, s>>>(x, c, sn, out, a, lanes);
    else rope_kernel<T, false, false><<<blocks, kEltThreads, 0, s>>>(x, c, sn, out, a, lanes);
  }
  return cudaGetLastError();
}

// launch(T{}) for the storage type t: the one place a FloatType becomes a C++ type.
template <typename Launch>
cudaError_t by_type(FloatType t, Launch&& launch) {
  switch (t) {
    case FloatType::f32: return launch(float{});
    case FloatType::f16: return launch(__half{});
    case FloatType::bf16: return launch(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t rope(const RopeArgs& a, cudaStream_t s) {
  if (a.batch < 0 || a.heads < 0 || a.seq < 0 || a.head_dim < 2 || a.head_dim % 2 != 0) return cudaErrorInvalidValue;
  if (a.batch * a.heads * a.seq == 0) return cudaSuccess;
  return by_type(a.type, [&](auto t) { return launch_rope<decltype(t)>(a, s); });
}

cudaError_t rms_norm_forward(const RmsNormForwardArgs& a, cudaStream_t s) {
  if (a.rows < 0 || a.rows > 0x7fffffff || a.hidden < 1) return cudaErrorInvalidValue;
  if ((a.delta == nullptr) != (a.sum == nullptr)) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  return by_type(a.type, [&](auto t) { return launch_rms_forward<decltype(t)>(a, s); });
}

cudaError_t rms_norm_backward(const RmsNormBackwardArgs& a, cudaStream_t s) {
  if (a.rows < 0 || a.rows > 0x7fffffff || a.hidden < 1) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  return by_type(a.type, [&](auto t) { return launch_rms_backward<decltype(t)>(a, s); });
}

cudaError_t swiglu_forward(const SwigluForwardArgs& a, cudaStream_t s) {
  if (a.n < 0) return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  return by_type(a.type, [&](auto t) { return launch_swiglu_forward<decltype(t)>(a, s); });
}

cudaError_t swiglu_backward(const SwigluBackwardArgs& a, cudaStream_t s) {
  if (a.n < 0) return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  return by_type(a.type, [&](auto t) { return launch_swiglu_backward<decltype(t)>(a, s); });
}

}  // namespace qlora::kernels
