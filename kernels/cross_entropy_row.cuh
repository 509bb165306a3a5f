// Per-row pieces of the cross-entropy chunk kernels (kernels/cross_entropy.cu, the only includer):
// the launch parameters, 16-byte vector packing, the math of one logit (z, base-2 exponent, the
// gradient), the online logsumexp and its CTA-wide merge, the row's head / body / tail split, and
// the pass-1 / pass-2 steps over a row's scalar head and tail. cross_entropy.cu's header comment
// says what the kernels compute and why they are laid out as they are.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "float_convert.cuh"

namespace qlora::kernels::ce_detail {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // 16-byte vectors in flight per thread
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Params {
  char* logits;
  int64_t ld;
  int vocab;
  const int64_t* labels;
  int64_t ignore_index;
  float scale;          // logit_scale
  float softcap;        // > 0 when SOFTCAP
  float scale_over_cap; // logit_scale / softcap
  float y_mul;          // log2(e) * (SOFTCAP ? softcap : logit_scale): y = z log2(e) in one multiply
  float z_loss;
  float* loss;
  float* lse;
  float grad_scale;
  const float* grad_row_scale;  // optional
};

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// 16 bytes <-> kVec<T> floats.
__device__ __forceinline__ void unpack(const uint4& u, float (&f)[4]) {
  f[0] = __uint_as_float(u.x), f[1] = __uint_as_float(u.y), f[2] = __uint_as_float(u.z), f[3] = __uint_as_float(u.w);
}
template <typename T2>
__device__ __forceinline__ void unpack2(const uint4& u, float (&f)[8]) {
  union {
    uint4 u;
    T2 h[4];
  } p;
  p.u = u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 v;
    if constexpr (std::is_same_v<T2, __half2>)
      v = __half22float2(p.h[i]);
    else
      v = __bfloat1622float2(p.h[i]);
    f[2 * i] = v.x, f[2 * i + 1] = v.y;
  }
}
template <typename T>
__device__ __forceinline__ void unpack_vec(const uint4& u, float (&f)[kVec<T>]) {
  if constexpr (std::is_same_v<T, float>)
    unpack(u, f);
  else if constexpr (std::is_same_v<T, __half>)
    unpack2<__half2>(u, f);
  else
    unpack2<__nv_bfloat162>(u, f);
}

__device__ __forceinline__ uint4 pack(const float (&f)[4]) {
  return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}
template <typename T2>
__device__ __forceinline__ uint4 pack2(const float (&f)[8]) {
  union {
    T2 h[4];
    uint4 u;
  } p;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T2, __half2>)
      p.h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    else
      p.h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  }
  return p.u;
}
template <typename T>
__device__ __forceinline__ uint4 pack_vec(const float (&f)[kVec<T>]) {
  if constexpr (std::is_same_v<T, float>) {
    return pack(f);
  } else if constexpr (std::is_same_v<T, __half>) {
    return pack2<__half2>(f);
  } else {
    return pack2<__nv_bfloat162>(f);
  }
}

// ---- the math -------------------------------------------------------------------------------------
// z of one logit; `t` gets tanh(scale * x / softcap) (SOFTCAP only, for the chain rule).
template <bool SOFTCAP>
__device__ __forceinline__ float logit_z(const Params& p, float x, float& t) {
  if constexpr (SOFTCAP) {
    t = tanhf(x * p.scale_over_cap);
    return p.softcap * t;
  } else {
    t = 0.f;
    return x * p.scale;
  }
}

// y = z * log2(e), the base-2 exponent the softmax works with, in one multiply per logit.
template <bool SOFTCAP>
__device__ __forceinline__ float logit_y(const Params& p, float x, float& t) {
  if constexpr (SOFTCAP) {
    t = tanhf(x * p.scale_over_cap);
    return t * p.y_mul;
  } else {
    t = 0.f;
    return x * p.y_mul;
  }
}

// Per-thread online logsumexp in base 2: the values seen so far are y_i = z_i * log2(e) and
// sum_i 2^(y_i - m) = s. An empty state is (m = -inf, s = 0).
struct OnlineLse {
  float m = -INFINITY;
  float s = 0.f;

  template <int N>
  __device__ __forceinline__ void add(const float (&y)[N]) {
    float mv = y[0];
#pragma unroll
    for (int k = 1; k < N; ++k) mv = fmaxf(mv, y[k]);
    if (mv > m) {
      s = s * exp2f(m - mv);  // m = -inf: exp2f(-inf) = 0 and s = 0
      m = mv;
    }
#pragma unroll
    for (int k = 0; k < N; ++k) s += exp2f(y[k] - m);  // a NaN y makes s NaN: the row's lse is NaN
  }

  __device__ __forceinline__ void merge(float mo, float so) {
    const float mn = fmaxf(m, mo);
    if (mn == -INFINITY) return;  // both empty
    s = s * exp2f(m - mn) + so * exp2f(mo - mn);
    m = mn;
  }
};

// The row split: [0, head) scalar, [head, head + nvec * kVec) 16-byte vectors, the rest scalar.
template <typename T>
struct RowSplit {
  T* row;
  int head;
  int nvec;
  int body_end;
};

template <typename T>
__device__ __forceinline__ RowSplit<T> split_row(const Params& p, int64_t r) {
  RowSplit<T> s;
  s.row = reinterpret_cast<T*>(p.logits) + r * p.ld;
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(s.row) & 15u);
  s.head = min(p.vocab, mis == 0 ? 0 : (16 - mis) / static_cast<int>(sizeof(T)));
  s.nvec = (p.vocab - s.head) / kVec<T>;
  s.body_end = s.head + s.nvec * kVec<T>;
  return s;
}

// ---- pieces both kernels share ----------------------------------------------------------------------

// Pass 1 over the scalar head and tail of a row (read from global memory).
template <typename T, bool SOFTCAP>
__device__ __forceinline__ void add_scalars(const Params& p, const RowSplit<T>& rs, int tid, OnlineLse& acc) {
  for (int i = tid; i < rs.head; i += kThreads) {
    float t;
    const float y[1] = {logit_y<SOFTCAP>(p, to_float<T>(rs.row[i]), t)};
    acc.add(y);
  }
  for (int i = rs.body_end + tid; i < p.vocab; i += kThreads) {
    float t;
    const float y[1] = {logit_y<SOFTCAP>(p, to_float<T>(rs.row[i]), t)};
    acc.add(y);
  }
}

// Every thread's (m, s) merged over the CTA in a fixed order (warp shuffles, then the 16 warps'
// pairs in warp order); every thread gets the result. Contains a __syncthreads, which also orders
// each thread's earlier accesses to the row before any that follow.
__device__ __forceinline__ OnlineLse cta_merge(OnlineLse acc, int tid) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float mo = __shfl_xor_sync(0xffffffffu, acc.m, off);
    const float so = __shfl_xor_sync(0xffffffffu, acc.s, off);
    acc.merge(mo, so);
  }
  __shared__ float s_m[kWarps];
  __shared__ float s_s[kWarps];
  if ((tid & 31) == 0) {
    s_m[tid >> 5] = acc.m;
    s_s[tid >> 5] = acc.s;
  }
  __syncthreads();
  OnlineLse tot;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) tot.merge(s_m[w], s_s[w]);
  return tot;
}

// The gradient of one logit x at column i:
// g = (A * softmax(z) - B * [i == label]) * (SOFTCAP ? 1 - t^2 : 1), the logit scale folded in.
struct GradCoef {
  float A, B, lse2;
  int label;  // -1 when the label is out of range
};
__device__ __forceinline__ GradCoef grad_coef(const Params& p, int64_t r, int64_t label, float lse2) {
  const float gs = p.grad_row_scale ? p.grad_scale * p.grad_row_scale[r] : p.grad_scale;
  GradCoef c;
  c.B = gs * p.scale;
  c.A = c.B * (1.f + 2.f * p.z_loss * (lse2 * kLn2));
  c.lse2 = lse2;
  c.label = label >= 0 && label < p.vocab ? static_cast<int>(label) : -1;
  return c;
}
template <bool SOFTCAP>
__device__ __forceinline__ float grad_of(const Params& p, const GradCoef& c, float x, int i) {
  float t;
  const float y = logit_y<SOFTCAP>(p, x, t);
  float g = c.A * exp2f(y - c.lse2);
  if (i == c.label) g -= c.B;
  if constexpr (SOFTCAP) g *= (1.f - t) * (1.f + t);  // 1 - tanh^2
  return g;
}

// Pass 2 over the scalar head and tail of a row.
template <typename T, bool SOFTCAP>
__device__ __forceinline__ void grad_scalars(const Params& p, const GradCoef& c, const RowSplit<T>& rs, int tid) {
  for (int i = tid; i < rs.head; i += kThreads) rs.row[i] = from_float<T>(grad_of<SOFTCAP>(p, c, to_float<T>(rs.row[i]), i));
  for (int i = rs.body_end + tid; i < p.vocab; i += kThreads)
    rs.row[i] = from_float<T>(grad_of<SOFTCAP>(p, c, to_float<T>(rs.row[i]), i));
}

// The gradient of one 16-byte vector whose first element is column e0.
template <typename T, bool SOFTCAP>
__device__ __forceinline__ uint4 grad_vec(const Params& p, const GradCoef& c, const uint4& v, int e0) {
  float f[kVec<T>];
  unpack_vec<T>(v, f);
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k) f[k] = grad_of<SOFTCAP>(p, c, f[k], e0 + k);
  return pack_vec<T>(f);
}

// Zeros of an ignored row's vectors [v0, v0 + nv) (and of its scalars when `scalars`).
template <typename T>
__device__ __forceinline__ void zero_row(const Params& p, const RowSplit<T>& rs, int v0, int nv, bool scalars, int tid) {
  uint4* vrow = reinterpret_cast<uint4*>(rs.row + rs.head) + v0;
  for (int i = tid; i < nv; i += kThreads) vrow[i] = make_uint4(0, 0, 0, 0);
  if (!scalars) return;
  const T zero = from_float<T>(0.f);
  for (int i = tid; i < rs.head; i += kThreads) rs.row[i] = zero;
  for (int i = rs.body_end + tid; i < p.vocab; i += kThreads) rs.row[i] = zero;
}

// The label's z, or NaN when the label is out of range.
template <typename T, bool SOFTCAP>
__device__ __forceinline__ float label_z(const Params& p, const RowSplit<T>& rs, int64_t label) {
  if (label < 0 || label >= p.vocab) return NAN;
  float t;
  return logit_z<SOFTCAP>(p, to_float<T>(rs.row[label]), t);
}

}  // namespace qlora::kernels::ce_detail
