// Cross-entropy over one chunk of logits, loss and d(loss)/d(logits) in place (the fast path of the
// fused linear + cross-entropy loss). Launcher declared in cross_entropy.cuh.
//
// What it fuses: per row r of a [rows, vocab] logits chunk (bf16 / fp16 / fp32, row stride ld),
//   z = softcap > 0 ? softcap * tanh(logit_scale * x / softcap) : logit_scale * x   (fp32)
//   lse = logsumexp(z)                         (one online max / sum-exp pass, fp32, base 2)
//   loss = lse - z[label] + z_loss * lse^2     (0 for label == ignore_index)
// and, when grad_scale != 0, a second pass overwriting the row with
//   grad_scale * w_r * ((1 + 2 z_loss lse) softmax(z) - onehot(label)) * dz/dx,
//   (w_r = grad_row_scale[r] when given, else 1: per-token weights fused, no extra pass)
//   dz/dx = logit_scale (1 - tanh^2) with softcap, logit_scale without,
// rounded to nearest (even) in the logits dtype; ignored rows get zeros. The unfused libtorch way
// (logits.float() -> scale / tanh -> log_softmax -> nll -> backward) writes and reads several fp32
// copies of the chunk; here nothing but the row itself is touched.
// Bytes moved per logit: sizeof(T) read (pass 1) + sizeof(T) read + sizeof(T) written (pass 2,
// only with grad_scale != 0): 6 B for bf16 / fp16, 12 B for fp32; loss only: 2 B / 4 B. Per row
// also 8 B of label, 4 B of loss, 4 B of lse (+ 4 B of grad_row_scale). An ignored row is not
// read at all (0 B, or sizeof(T) written per logit when the gradient is asked for). The second
// read hits L2 only as far as the resident CTAs' rows fit there (H100, bf16 rows of 128256 =
// 256 KB: 132 SMs x 2-3 CTAs = 68-100 MB against 50 MB of L2, so partly); the gradient is written
// with plain stores, so it stays in L2 for the dX GEMM that reads the chunk next where it fits.
// Resources (nvcc -Xptxas -v, sm_90): 40 registers (58 for softcapped bf16/fp16: tanhf), 128 B of
// shared memory, no stack, no spills: 3 CTAs of 512 threads per SM (2 softcapped 16-bit).
//
// Layout: one CTA of kThreads threads per row. Each row is split into a scalar head (up to 7
// elements until the first 16-byte boundary), a body of 16-byte vectors (8 bf16/fp16 or 4 fp32
// values), and a scalar tail; so every row is vectorized whatever ld is (odd ld included), and a
// misaligned base or stride only costs the scalar head/tail. A thread keeps kUnroll 16-byte loads
// in flight before using them; the per-thread online (max, sum) is rescaled once per vector, not
// per element, and the CTA merges the per-thread pairs with warp shuffles and a 16-entry shared
// table, in a fixed order (deterministic). The label's logit is read by thread 0 before pass 2
// overwrites the row.
//
// Constraints: vocab in 1..2^31-1, rows in 0..2^31-1, ld >= vocab, logits aligned to its element
// size, labels in [0, vocab) or == ignore_index (any other label gives a NaN loss for its row and
// no one-hot term in its gradient), softcap >= 0 (0 = off). lse is written as 0 for ignored rows.
// Math: fp32 throughout (exp2f / log2f / tanhf, no fast-math intrinsics); the library is built
// with --fmad=false, so products and sums round separately.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cross_entropy.cuh"
#include "float_convert.cuh"

namespace qlora::kernels {
namespace {

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
template <typename T>
__device__ __forceinline__ uint4 pack_vec(const float (&f)[kVec<T>]) {
  if constexpr (std::is_same_v<T, float>) {
    return pack(f);
  } else if constexpr (std::is_same_v<T, __half>) {
    union {
      __half2 h[4];
      uint4 u;
    } p;
#pragma unroll
    for (int i = 0; i < 4; ++i) p.h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    return p.u;
  } else {
    union {
      __nv_bfloat162 h[4];
      uint4 u;
    } p;
#pragma unroll
    for (int i = 0; i < 4; ++i) p.h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return p.u;
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

template <typename T, bool SOFTCAP>
__global__ void __launch_bounds__(kThreads) cross_entropy_chunk_kernel(Params p) {
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const RowSplit<T> rs = split_row<T>(p, r);
  T* row = rs.row;
  uint4* vrow = reinterpret_cast<uint4*>(row + rs.head);
  constexpr int N = kVec<T>;

  const int64_t label = p.labels[r];
  if (label == p.ignore_index) {  // uniform across the CTA: no barrier follows
    if (tid == 0) {
      p.loss[r] = 0.f;
      if (p.lse) p.lse[r] = 0.f;
    }
    if (p.grad_scale != 0.f) {
      const T zero = from_float<T>(0.f);
      for (int i = tid; i < rs.head; i += kThreads) row[i] = zero;
      for (int i = tid; i < rs.nvec; i += kThreads) vrow[i] = make_uint4(0, 0, 0, 0);
      for (int i = rs.body_end + tid; i < p.vocab; i += kThreads) row[i] = zero;
    }
    return;
  }
  const bool label_ok = label >= 0 && label < p.vocab;

  // The label's logit, read before pass 2 overwrites it.
  float z_label = NAN;
  if (tid == 0 && label_ok) {
    float t;
    z_label = logit_z<SOFTCAP>(p, to_float<T>(row[label]), t);
  }

  // ---- pass 1: online max / sum-exp --------------------------------------------------------------
  OnlineLse acc;
  for (int i = tid; i < rs.head; i += kThreads) {
    float t;
    const float y[1] = {logit_y<SOFTCAP>(p, to_float<T>(row[i]), t)};
    acc.add(y);
  }
  for (int i0 = tid; i0 < rs.nvec; i0 += kThreads * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i0 + u * kThreads < rs.nvec) v[u] = vrow[i0 + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u * kThreads < rs.nvec) {
        float y[N];
        unpack_vec<T>(v[u], y);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          float t;
          y[k] = logit_y<SOFTCAP>(p, y[k], t);
        }
        acc.add(y);
      }
    }
  }
  for (int i = rs.body_end + tid; i < p.vocab; i += kThreads) {
    float t;
    const float y[1] = {logit_y<SOFTCAP>(p, to_float<T>(row[i]), t)};
    acc.add(y);
  }

  // ---- CTA reduction of (m, s), fixed order --------------------------------------------------------
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
  __syncthreads();  // also orders every pass-1 read of the row before any pass-2 write
  OnlineLse tot;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) tot.merge(s_m[w], s_s[w]);
  const float lse2 = tot.m + log2f(tot.s);  // vocab >= 1: s >= 1
  const float lse = lse2 * kLn2;

  if (tid == 0) {
    p.loss[r] = lse - z_label + p.z_loss * lse * lse;
    if (p.lse) p.lse[r] = lse;
  }
  if (p.grad_scale == 0.f) return;

  // ---- pass 2: gradient in place -------------------------------------------------------------------
  // g = (A * softmax(z) - B * [i == label]) * (SOFTCAP ? 1 - t^2 : 1), with the logit scale folded in.
  const float gs = p.grad_row_scale ? p.grad_scale * p.grad_row_scale[r] : p.grad_scale;
  const float B = gs * p.scale;
  const float A = B * (1.f + 2.f * p.z_loss * lse);
  const int lab = label_ok ? static_cast<int>(label) : -1;
  auto grad = [&](float x, int i) -> float {
    float t;
    const float y = logit_y<SOFTCAP>(p, x, t);
    float g = A * exp2f(y - lse2);
    if (i == lab) g -= B;
    if constexpr (SOFTCAP) g *= (1.f - t) * (1.f + t);  // 1 - tanh^2
    return g;
  };
  for (int i = tid; i < rs.head; i += kThreads) row[i] = from_float<T>(grad(to_float<T>(row[i]), i));
  for (int i0 = tid; i0 < rs.nvec; i0 += kThreads * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i0 + u * kThreads < rs.nvec) v[u] = vrow[i0 + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int iv = i0 + u * kThreads;
      if (iv < rs.nvec) {
        float f[N];
        unpack_vec<T>(v[u], f);
        const int e0 = rs.head + iv * N;
#pragma unroll
        for (int k = 0; k < N; ++k) f[k] = grad(f[k], e0 + k);
        vrow[iv] = pack_vec<T>(f);
      }
    }
  }
  for (int i = rs.body_end + tid; i < p.vocab; i += kThreads) row[i] = from_float<T>(grad(to_float<T>(row[i]), i));
}

template <typename T>
cudaError_t launch(const Params& p, int64_t rows, bool softcap, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  if (softcap)
    cross_entropy_chunk_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  else
    cross_entropy_chunk_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_chunk(const CrossEntropyChunkArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.rows > INT32_MAX || a.vocab < 1 || a.vocab > INT32_MAX || a.ld < a.vocab)
    return cudaErrorInvalidValue;
  if (!(a.softcap >= 0.f) || !std::isfinite(a.softcap)) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaGetLastError();
  if (!a.logits || !a.labels || !a.loss) return cudaErrorInvalidValue;
  const size_t esize = a.logits_type == FloatType::f32 ? 4 : 2;
  if (reinterpret_cast<uintptr_t>(a.logits) % esize != 0) return cudaErrorInvalidValue;
  Params p{};
  p.logits = static_cast<char*>(a.logits);
  p.ld = a.ld;
  p.vocab = static_cast<int>(a.vocab);
  p.labels = a.labels;
  p.ignore_index = a.ignore_index;
  p.scale = a.logit_scale;
  p.softcap = a.softcap;
  p.scale_over_cap = a.softcap > 0.f ? a.logit_scale / a.softcap : 0.f;
  p.y_mul = kLog2e * (a.softcap > 0.f ? a.softcap : a.logit_scale);
  p.z_loss = a.z_loss;
  p.loss = a.loss;
  p.lse = a.lse;
  p.grad_scale = a.grad_scale;
  p.grad_row_scale = a.grad_row_scale;
  const bool softcap = a.softcap > 0.f;
  switch (a.logits_type) {
    case FloatType::f32: return launch<float>(p, a.rows, softcap, stream);
    case FloatType::f16: return launch<__half>(p, a.rows, softcap, stream);
    case FloatType::bf16: return launch<__nv_bfloat16>(p, a.rows, softcap, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qlora::kernels
