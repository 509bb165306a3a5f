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
// Two kernels, one math:
// - two-pass (any GPU, and whenever only the loss is wanted): one CTA per row; pass 1 reads the
//   row for (max, sum-exp), pass 2 reads it again and writes the gradient. Bytes per logit:
//   sizeof(T) (loss only) or 3 sizeof(T) (6 B for bf16 / fp16). The second read hits L2 only as far
//   as the resident CTAs' rows fit there (H100, bf16 rows of 128256 = 256 KB: 132 SMs x 2-3 CTAs
//   = 68-100 MB against 50 MB of L2, so mostly not).
// - one-read (sm_90+, gradient wanted, the row fits in the shared memory of a thread-block cluster
//   of at most 8 CTAs): C CTAs per row, each owning 1/C of the row's 16-byte vectors; pass 1 reads
//   its slice from global memory into shared memory while it accumulates (max, sum-exp); the C
//   partial pairs are merged through distributed shared memory (every CTA merges them in rank
//   order, so all agree bit for bit and the result is deterministic); pass 2 reads the slice back
//   from shared memory and writes the gradient. 2 sizeof(T) per logit (4 B for bf16): the least an
//   in-place gradient can move. Chosen by default where it applies (CrossEntropyChunkArgs::
//   cluster_ctas in cross_entropy.cuh; `qlora bench ce` times both).
// Per row also 8 B of label, 4 B of loss, 4 B of lse (+ 4 B of grad_row_scale). An ignored row is
// not read at all (0 B, or sizeof(T) written per logit when the gradient is asked for). The
// gradient is written with plain stores, so it stays in L2 for the dX GEMM that reads the chunk
// next where it fits.
// Resources (nvcc 13.0 -Xptxas -v, sm_90), two-pass: 39-40 registers, 128 B of shared memory, no
// stack, no spills: 3 CTAs of 512 threads per SM.
// One-read: 40 registers (bounded for 3 CTAs per SM), 144 B + the slice (<= 64 KiB) of shared
// memory, no spills: 3 CTAs per SM.
//
// Layout: each row is split into a scalar head (up to 7 elements until the first 16-byte
// boundary), a body of 16-byte vectors (8 bf16/fp16 or 4 fp32 values), and a scalar tail; so every
// row is vectorized whatever ld is (odd ld included), and a misaligned base or stride only costs the
// scalar head/tail (which rank 0 of a cluster reads from global memory in both passes). The per-row
// pieces both kernels use are in cross_entropy_row.cuh. A thread
// keeps several 16-byte loads in flight before using them; the per-thread online (max, sum) is
// rescaled once per vector, not per element, and the CTA merges the per-thread pairs with warp
// shuffles and a 16-entry shared table, in a fixed order (deterministic). The label's logit is read
// by thread 0 (of rank 0) before pass 2 overwrites the row. The two kernels split the sums
// differently, so they agree to fp32 rounding, not bit for bit.
//
// Constraints: vocab in 1..2^31-1, rows in 0..2^31-1, ld >= vocab, logits aligned to its element
// size, labels in [0, vocab) or == ignore_index (any other label gives a NaN loss for its row and
// no one-hot term in its gradient), softcap >= 0 (0 = off). lse is written as 0 for ignored rows.
// Math: fp32 throughout (exp2f / log2f / tanhf, no fast-math intrinsics); the library is built
// with --fmad=false, so products and sums round separately.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cross_entropy.cuh"
#include "cross_entropy_row.cuh"

namespace qlora::kernels {
namespace {
using namespace ce_detail;  // the per-row pieces (cross_entropy_row.cuh)

// ---- the two-pass kernel: one CTA per row -------------------------------------------------------------
template <typename T, bool SOFTCAP>
__global__ void __launch_bounds__(kThreads) cross_entropy_chunk_kernel(Params p) {
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const RowSplit<T> rs = split_row<T>(p, r);
  uint4* vrow = reinterpret_cast<uint4*>(rs.row + rs.head);
  constexpr int N = kVec<T>;

  const int64_t label = p.labels[r];
  if (label == p.ignore_index) {  // uniform across the CTA: no barrier follows
    if (tid == 0) {
      p.loss[r] = 0.f;
      if (p.lse) p.lse[r] = 0.f;
    }
    if (p.grad_scale != 0.f) zero_row<T>(p, rs, 0, rs.nvec, true, tid);
    return;
  }
  const float z_label = tid == 0 ? label_z<T, SOFTCAP>(p, rs, label) : NAN;  // read before pass 2 overwrites it

  // ---- pass 1: online max / sum-exp --------------------------------------------------------------
  OnlineLse acc;
  add_scalars<T, SOFTCAP>(p, rs, tid, acc);
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
  const OnlineLse tot = cta_merge(acc, tid);  // its barrier orders every pass-1 read before any pass-2 write
  const float lse2 = tot.m + log2f(tot.s);    // vocab >= 1: s >= 1
  const float lse = lse2 * kLn2;
  if (tid == 0) {
    p.loss[r] = lse - z_label + p.z_loss * lse * lse;
    if (p.lse) p.lse[r] = lse;
  }
  if (p.grad_scale == 0.f) return;

  // ---- pass 2: gradient in place, the row read again -----------------------------------------------
  const GradCoef c = grad_coef(p, r, label, lse2);
  grad_scalars<T, SOFTCAP>(p, c, rs, tid);
  for (int i0 = tid; i0 < rs.nvec; i0 += kThreads * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i0 + u * kThreads < rs.nvec) v[u] = vrow[i0 + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int iv = i0 + u * kThreads;
      if (iv < rs.nvec) vrow[iv] = grad_vec<T, SOFTCAP>(p, c, v[u], rs.head + iv * N);
    }
  }
}

// ---- the one-read kernel: a cluster of C CTAs per row, the row held in their shared memory ---------
constexpr int kMaxClusterCtas = 8;    // the portable cluster size limit
// The slice a CTA holds, at most. 64 KiB lets 3 CTAs (1536 threads) share an H100 SM (228 KB);
// Llama-3's 128256-entry bf16 rows take 4 CTAs, Gemma-2's 256000 take 8. Chosen by measurement
// (`qlora bench ce`, docs/PERFORMANCE.md).
constexpr int kResidentSliceBytes = 64 * 1024;

// 3 CTAs per SM (<= 42 registers) on sm_90; below it the kernel is empty and never launched.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kResidentMinCtasPerSm = 3;
#else
constexpr int kResidentMinCtasPerSm = 1;
#endif

template <typename T, bool SOFTCAP>
__global__ void __launch_bounds__(kThreads, kResidentMinCtasPerSm) cross_entropy_resident_kernel(Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kResidentUnroll = 4;  // 16-byte loads in flight per thread in pass 1
  namespace cg = cooperative_groups;
  extern __shared__ uint4 s_slice[];
  __shared__ float s_part[2];  // this CTA's (m, s), read by the whole cluster
  __shared__ float s_lse2;
  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t r = blockIdx.x / C;
  const int tid = threadIdx.x;
  const RowSplit<T> rs = split_row<T>(p, r);
  const int per = (rs.nvec + C - 1) / C;
  const int v0 = min(rs.nvec, rank * per);
  const int nv = min(rs.nvec, v0 + per) - v0;
  uint4* vrow = reinterpret_cast<uint4*>(rs.row + rs.head) + v0;
  const bool scalars = rank == 0;
  constexpr int N = kVec<T>;

  const int64_t label = p.labels[r];
  if (label == p.ignore_index) {  // uniform across the cluster: no cluster barrier follows
    if (scalars && tid == 0) {
      p.loss[r] = 0.f;
      if (p.lse) p.lse[r] = 0.f;
    }
    zero_row<T>(p, rs, v0, nv, scalars, tid);
    return;
  }
  // Read before cluster barrier 1, after which any CTA may overwrite the label's column.
  const float z_label = scalars && tid == 0 ? label_z<T, SOFTCAP>(p, rs, label) : NAN;

  // ---- pass 1: the slice from global into shared memory, online max / sum-exp on the way ----------
  OnlineLse acc;
  if (scalars) add_scalars<T, SOFTCAP>(p, rs, tid, acc);
  for (int i0 = tid; i0 < nv; i0 += kThreads * kResidentUnroll) {
    uint4 v[kResidentUnroll];
#pragma unroll
    for (int u = 0; u < kResidentUnroll; ++u)
      if (i0 + u * kThreads < nv) v[u] = vrow[i0 + u * kThreads];
#pragma unroll
    for (int u = 0; u < kResidentUnroll; ++u) {
      if (i0 + u * kThreads < nv) {
        s_slice[i0 + u * kThreads] = v[u];
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
  const OnlineLse part = cta_merge(acc, tid);
  if (tid == 0) {
    s_part[0] = part.m;
    s_part[1] = part.s;
  }
  cluster.sync();  // 1: every CTA's part is in its shared memory; every pass-1 read of the row is done
  if (tid < 32) {
    // The C parts, merged in rank order by warp 0 of every CTA: the same bits everywhere.
    float m = -INFINITY, s = 0.f;
    if (tid < C) {
      const float* other = cluster.map_shared_rank(s_part, tid);
      m = other[0];
      s = other[1];
    }
    OnlineLse all;
    for (int j = 0; j < C; ++j) all.merge(__shfl_sync(0xffffffffu, m, j), __shfl_sync(0xffffffffu, s, j));
    if (tid == 0) s_lse2 = all.m + log2f(all.s);  // vocab >= 1: s >= 1
  }
  cluster.sync();  // 2: the peers' parts have been read (a CTA's shared memory must outlive that); s_lse2 is set
  const float lse2 = s_lse2;
  if (scalars && tid == 0) {
    const float lse = lse2 * kLn2;
    p.loss[r] = lse - z_label + p.z_loss * lse * lse;
    if (p.lse) p.lse[r] = lse;
  }

  // ---- pass 2: the gradient from shared memory over the row ------------------------------------------
  const GradCoef c = grad_coef(p, r, label, lse2);
  if (scalars) grad_scalars<T, SOFTCAP>(p, c, rs, tid);
  const int e0 = rs.head + v0 * N;
  for (int i = tid; i < nv; i += kThreads) vrow[i] = grad_vec<T, SOFTCAP>(p, c, s_slice[i], e0 + i * N);
#endif
}

// Bytes of the largest slice when a row's vectors are split over `ctas` CTAs.
size_t slice_bytes(int64_t vocab, size_t esize, int ctas) {
  // The head can take up to 15 bytes off the body; the largest split is with no head.
  const int64_t nvec = vocab * static_cast<int64_t>(esize) / 16;
  return static_cast<size_t>((nvec + ctas - 1) / ctas) * 16;
}

// What the device allows: compute capability 9+ (clusters) and its opt-in shared memory per CTA.
bool resident_supported(size_t& max_smem) {
  int dev = 0, major = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return false;
  max_smem = static_cast<size_t>(optin) - 1024;  // the kernel's own static shared memory, with room
  return major >= 9;
}

template <typename T, bool SOFTCAP>
cudaError_t launch_resident(const Params& p, int64_t rows, int ctas, size_t smem, cudaStream_t stream) {
  const auto kernel = cross_entropy_resident_kernel<T, SOFTCAP>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(rows * ctas));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(ctas);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

template <typename T>
cudaError_t launch(const Params& p, int64_t rows, bool softcap, int ctas, cudaStream_t stream) {
  if (ctas > 0) {
    const size_t smem = slice_bytes(p.vocab, sizeof(T), ctas);
    return softcap ? launch_resident<T, true>(p, rows, ctas, smem, stream)
                   : launch_resident<T, false>(p, rows, ctas, smem, stream);
  }
  const dim3 grid(static_cast<unsigned>(rows));
  if (softcap)
    cross_entropy_chunk_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  else
    cross_entropy_chunk_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

size_t element_size(FloatType t) { return t == FloatType::f32 ? 4 : 2; }

}  // namespace

int cross_entropy_resident_ctas(int64_t rows, int64_t vocab, FloatType type, bool gradient, int requested) {
  if (requested < 0 || !gradient || vocab < 1) return 0;
  size_t max_smem = 0;
  if (!resident_supported(max_smem)) return 0;
  const size_t esize = element_size(type);
  const auto fits = [&](int c) {
    return rows * c <= INT32_MAX && slice_bytes(vocab, esize, c) <= max_smem;
  };
  if (requested > 0) return requested <= kMaxClusterCtas && fits(requested) ? requested : -1;
  for (int c = 1; c <= kMaxClusterCtas; ++c)
    if (slice_bytes(vocab, esize, c) <= kResidentSliceBytes) return fits(c) ? c : 0;
  return 0;
}

cudaError_t cross_entropy_chunk(const CrossEntropyChunkArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.rows > INT32_MAX || a.vocab < 1 || a.vocab > INT32_MAX || a.ld < a.vocab)
    return cudaErrorInvalidValue;
  if (!(a.softcap >= 0.f) || !std::isfinite(a.softcap)) return cudaErrorInvalidValue;
  if (a.cluster_ctas < -1 || a.cluster_ctas > kMaxClusterCtas) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaGetLastError();
  if (!a.logits || !a.labels || !a.loss) return cudaErrorInvalidValue;
  const size_t esize = element_size(a.logits_type);
  if (reinterpret_cast<uintptr_t>(a.logits) % esize != 0) return cudaErrorInvalidValue;
  const int ctas =
      cross_entropy_resident_ctas(a.rows, a.vocab, a.logits_type, a.grad_scale != 0.f, a.cluster_ctas);
  if (ctas < 0) return cudaErrorNotSupported;  // a forced cluster size this device or row cannot take
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
    case FloatType::f32: return launch<float>(p, a.rows, softcap, ctas, stream);
    case FloatType::f16: return launch<__half>(p, a.rows, softcap, ctas, stream);
    case FloatType::bf16: return launch<__nv_bfloat16>(p, a.rows, softcap, ctas, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qlora::kernels
