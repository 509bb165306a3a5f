// NF4 CUDA kernels (bitsandbytes layout): a single-pass dequantize with the double dequant of
// absmax inline, the 4-bit quantize, and the double quantization of absmax. Launchers are
// declared in nf4.cuh; every rounding step comes from nf4_common.cuh, shared with the CPU
// reference, so CPU and CUDA agree bit for bit.
//
// nf4_dequantize — what it fuses: bnb's nested dequant is three passes (dequantize_blockwise of
// the absmax codes into a temporary fp32 vector, `absmax += offset` in torch, then
// dequantize_4bit: bitsandbytes/functional.py, dequantize_4bit). Here one kernel reads the packed
// nibbles and the 8-bit absmax codes and writes the output; the fp32 absmax of a 64-block is
// rebuilt in registers (code2 lives in shared memory) with the same two fp32 roundings:
//   am = code2[q] * absmax2[b >> log2(nbs)];  am = am + offset;  out = from_float(NF4[n] * am)
// Bytes moved per element (nested): 0.5 (packed) + 1/blocksize (absmax code; 1/64) +
// 4/(blocksize * nbs) (fp32 absmax2, 1/4096) + sizeof(out) (2 for fp16/bf16, 4 for fp32): 2.516 B
// for bf16 out with blocksize 64; not nested, the absmax is fp32: 4/blocksize instead of 1/64. Constraints: blocksize a power of two in 32..4096 (so an aligned run of 8 or 32
// elements never straddles two blocks), nested_blocksize a power of two, any numel (odd numel:
// the last byte carries only its high nibble). Pointers: the vector path needs `packed` aligned
// to the load width and `out` to 16 bytes; otherwise (e.g. out= into a slice at an odd offset)
// the same kernel runs its scalar path, same arithmetic, slower.
//
// Layout (why): a CTA of 256 threads owns a tile of 8192 consecutive elements split into aligned
// chunks of 8; a thread owns 4 chunks strided by the CTA width, so a warp's 4-byte loads cover 128
// contiguous bytes and its 16-byte stores 512 contiguous bytes (fully coalesced both ways), with
// one absmax per 8 elements (an L1-hit byte load, a shared-memory lookup, two fp32 ops). All loads
// of a tile are issued before the barrier that publishes the shared tables, so their latency
// overlaps it. Variants, picked by NF4DequantizeArgs::variant so that `qlora bench nf4` times them
// side by side on the device: 0 (the runtime's) uses plain stores and programmatic dependent
// launch (PDL, sm_90: the launch's CTAs are placed while the previous kernel drains and wait for it
// before their first load; measured on an H100, 88.7 % -> 91.4 % of the copy bandwidth at
// 14336x4096 in back-to-back launches, docs/PERFORMANCE.md); 1 is 0 with streaming (evict-first,
// st.global.cs) stores; 2 is 0 without PDL (the launch before 2026-12-06); 3 is 0 with the input
// loads issued before the wait (see nf4.cuh for when that is allowed). 1 measured 1-3 % faster
// in isolation on an H200 (docs/PERFORMANCE.md),
// but in training the GEMM reads the output next, and for a weight that fits in L2 a plain store
// leaves it there. Tried and dropped, both measured slower on an H200: 32 elements per thread
// with 16-byte loads (its stores land 64 bytes apart: half the bandwidth), and persistent CTAs
// prefetching their next tile (about 7 % slower than one tile per CTA).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "float_convert.cuh"
#include "nf4.cuh"
#include "nf4_common.cuh"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;

struct DequantParams {
  const uint8_t* packed;
  int64_t numel;
  int log2_bs;
  int log2_nbs;
  const float* absmax;       // !NESTED
  const uint8_t* absmax_code;  // NESTED
  const float* code2;        // NESTED
  const float* absmax2;      // NESTED
  float offset;              // NESTED
  void* out;
};

__host__ __device__ constexpr int ilog2(int v) {
  int r = 0;
  while (v > 1) v >>= 1, ++r;
  return r;
}
bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Eight consecutive outputs with 16-byte stores (one for fp16/bf16, two for fp32). The paired
// conversions are one cvt.rn.{bf16,f16}x2.f32 instruction on sm_80+ (round to nearest even, the
// same as the scalar forms); cuda_bf16.h emulates the bf16 one exactly on sm_75. STREAM: st.global.cs
// (evict-first) instead of a plain store.
template <bool STREAM>
__device__ __forceinline__ void store16(void* dst, uint4 u) {
  if constexpr (STREAM)
    __stcs(reinterpret_cast<uint4*>(dst), u);
  else
    *reinterpret_cast<uint4*>(dst) = u;
}
template <bool STREAM>
__device__ __forceinline__ void store8(float* dst, const float (&v)[8]) {
  store16<STREAM>(dst, make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3])));
  store16<STREAM>(dst + 4, make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]), __float_as_uint(v[7])));
}
template <bool STREAM>
__device__ __forceinline__ void store8(__half* dst, const float (&v)[8]) {
  union {
    __half2 h[4];
    uint4 u;
  } p;
#pragma unroll
  for (int i = 0; i < 4; ++i) p.h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
  store16<STREAM>(dst, p.u);
}
template <bool STREAM>
__device__ __forceinline__ void store8(__nv_bfloat16* dst, const float (&v)[8]) {
  union {
    __nv_bfloat162 h[4];
    uint4 u;
  } p;
#pragma unroll
  for (int i = 0; i < 4; ++i) p.h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  store16<STREAM>(dst, p.u);
}

// Raw per-block inputs, loaded early (before the barrier); turned into the fp32 absmax after it.
struct BlockScaleRaw {
  float a;       // plain absmax, or absmax2 when nested
  uint32_t q;    // nested: the 8-bit absmax code
};

template <bool NESTED>
__device__ __forceinline__ BlockScaleRaw load_block_scale(const DequantParams& p, int64_t b) {
  BlockScaleRaw r;
  if constexpr (NESTED) {
    r.q = __ldg(p.absmax_code + b);
    r.a = __ldg(p.absmax2 + (b >> p.log2_nbs));
  } else {
    r.q = 0;
    r.a = __ldg(p.absmax + b);
  }
  return r;
}

template <bool NESTED>
__device__ __forceinline__ float block_scale(const BlockScaleRaw& r, const float* s_code2, float offset) {
  if constexpr (NESTED)
    return nested_absmax(s_code2[r.q], r.a, offset);
  else
    return r.a;
}

// Eight elements packed in one little-endian 32-bit word: byte j holds elements 2j (high nibble)
// and 2j+1 (low nibble). The shift/mask yields nibble * 4, a byte offset into the float table.
__device__ __forceinline__ void decode8(uint32_t w, float am, const float* s_nf4, float (&v)[8]) {
  const char* base = reinterpret_cast<const char*>(s_nf4);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t hi4 = (w >> (8 * j + 2)) & 0x3cu;  // (high nibble) * 4
    const uint32_t lo4 = (w << 2 >> (8 * j)) & 0x3cu;  // (low nibble) * 4
    v[2 * j] = fmul_rn(*reinterpret_cast<const float*>(base + hi4), am);
    v[2 * j + 1] = fmul_rn(*reinterpret_cast<const float*>(base + lo4), am);
  }
}

// A tile: kChunks chunks of 8 consecutive elements per thread (chunk k of thread t starts at
// element (tile * kTileChunks + k * kThreads + t) * 8). Only the raw loads live across the time
// between load_tile and store_tile.
constexpr int kChunks = 4;
constexpr int64_t kTileChunks = int64_t{kThreads} * kChunks;
constexpr int64_t kTileElems = kTileChunks * 8;

struct TileLoads {
  uint32_t words[kChunks];   // 8 packed elements each
  BlockScaleRaw raw[kChunks];
};

__device__ __forceinline__ int64_t chunk_first_elem(int64_t tile, int k) {
  return (tile * kTileChunks + k * kThreads + threadIdx.x) * 8;
}

template <bool NESTED, bool VEC>
__device__ __forceinline__ void load_tile(const DequantParams& p, int64_t tile, TileLoads& t) {
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t e0 = chunk_first_elem(tile, k);
    if (VEC && e0 + 8 <= p.numel) t.words[k] = __ldg(reinterpret_cast<const uint32_t*>(p.packed) + e0 / 8);
    if (e0 < p.numel) t.raw[k] = load_block_scale<NESTED>(p, e0 >> p.log2_bs);
  }
}

// Full chunks: decode the loaded word, 16-byte stores. Partial chunks (the end of an odd-sized
// weight) and VEC=false (misaligned pointers): one element at a time, same arithmetic.
template <typename T, bool NESTED, bool VEC, bool STREAM>
__device__ __forceinline__ void store_tile(const DequantParams& p, int64_t tile, const TileLoads& t,
                                           const float* s_nf4, const float* s_code2) {
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t e0 = chunk_first_elem(tile, k);
    if (e0 >= p.numel) continue;
    const float am = block_scale<NESTED>(t.raw[k], s_code2, p.offset);
    if (VEC && e0 + 8 <= p.numel) {
      float v[8];
      decode8(t.words[k], am, s_nf4, v);
      store8<STREAM>(out + e0, v);
    } else {
      const int64_t n = min(int64_t{8}, p.numel - e0);
#pragma unroll 1
      for (int64_t i = 0; i < n; ++i) {
        const int64_t e = e0 + i;
        const uint32_t byte = p.packed[e >> 1];
        const uint32_t code = (e & 1) ? (byte & 15u) : (byte >> 4);
        out[e] = from_float<T>(fmul_rn(s_nf4[code], am));
      }
    }
  }
}

template <bool NESTED>
__device__ __forceinline__ void stage_tables(const DequantParams& p, float* s_nf4, float* s_code2) {
  if (threadIdx.x < 16) s_nf4[threadIdx.x] = kNF4CodebookDevice[threadIdx.x];
  if constexpr (NESTED) s_code2[threadIdx.x] = __ldg(p.code2 + threadIdx.x);  // kThreads == 256
}

// Programmatic dependent launch (sm_90+; no-ops below, and when the launch did not ask for it).
// launch_dependents lets the next kernel in the stream, if it was launched with the PDL
// attribute, be placed on SMs as ours drain; grid_dependency_wait blocks until the previous
// kernel has finished and its writes are visible. Both are the CUDA runtime's
// cudaTriggerProgrammaticLaunchCompletion / cudaGridDependencySynchronize, written as PTX so the
// file needs no device-runtime header.
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// PDL: 0 = an ordinary launch; 1 = PDL, everything after the wait (safe whatever the previous
// kernel wrote); 2 = PDL with the input loads before the wait (only when no kernel still running
// ahead of this one writes the packed weight or its scales: frozen weights, the bench's sets).
// One tile per CTA.
template <typename T, bool NESTED, bool VEC, bool STREAM, int PDL>
__global__ void __launch_bounds__(kThreads) nf4_dequantize_kernel(const DequantParams p) {
  __shared__ float s_nf4[16];
  __shared__ float s_code2[NESTED ? 256 : 1];
  if constexpr (PDL != 0) launch_dependents();
  if constexpr (PDL == 1) grid_dependency_wait();
  TileLoads t;
  load_tile<NESTED, VEC>(p, blockIdx.x, t);
  stage_tables<NESTED>(p, s_nf4, s_code2);
  if constexpr (PDL == 2) grid_dependency_wait();
  __syncthreads();
  store_tile<T, NESTED, VEC, STREAM>(p, blockIdx.x, t, s_nf4, s_code2);
}

template <typename T, bool NESTED, bool VEC, bool STREAM, int PDL = 0>
cudaError_t launch_one_tile_per_cta(const DequantParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.numel + kTileElems - 1) / kTileElems));
  if constexpr (PDL == 0) {
    nf4_dequantize_kernel<T, NESTED, VEC, STREAM, 0><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  } else {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kThreads);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    // Below sm_90 there is no PDL: launch without the attribute (the kernel's PTX is compiled out).
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      return cudaGetLastError();
    cfg.numAttrs = major >= 9 ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, nf4_dequantize_kernel<T, NESTED, VEC, STREAM, PDL>, p);
  }
}

template <typename T, bool NESTED>
cudaError_t launch_dequant(const DequantParams& p, int variant, bool aligned, cudaStream_t stream) {
  if (!aligned) return launch_one_tile_per_cta<T, NESTED, false, false, 1>(p, stream);
  switch (variant) {
    case 1:
      return launch_one_tile_per_cta<T, NESTED, true, true, 1>(p, stream);
    case 2:
      return launch_one_tile_per_cta<T, NESTED, true, false, 0>(p, stream);
    case 3:
      return launch_one_tile_per_cta<T, NESTED, true, false, 2>(p, stream);
    default:
      return launch_one_tile_per_cta<T, NESTED, true, false, 1>(p, stream);
  }
}

// ---- quantize: one warp per block of `blocksize` elements -------------------------------------
constexpr int kQuantWarps = 8;

__device__ __forceinline__ float warp_max(float m) {
  // fmaxf is exact and, for non-NaN values, order-independent; it drops NaN as the fold does.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  return m;
}

// Lane l of a warp handles element pairs (2i, 2i+1) of the block for i = l, l + 32, ...: one
// packed byte each. Pass 1 folds |x| into absmax, pass 2 re-reads (L1/L2 hits) and quantizes.
template <typename T>
__global__ void __launch_bounds__(kQuantWarps * 32)
    nf4_quantize_kernel(const T* __restrict__ in, int64_t numel, int blocksize, uint8_t* __restrict__ packed,
                        float* __restrict__ absmax, int64_t nblocks) {
  const int64_t b = int64_t{blockIdx.x} * kQuantWarps + threadIdx.x / 32;
  if (b >= nblocks) return;  // whole warp leaves together
  const int lane = threadIdx.x % 32;
  const int64_t start = b * blocksize;
  const int64_t n = min(int64_t{blocksize}, numel - start);

  float m = kAbsmaxInit;
  for (int64_t i = lane; i < n; i += 32) m = absmax_fold(m, to_float(in[start + i]));
  m = warp_max(m);
  if (lane == 0) absmax[b] = m;

  const float inv = inverse_absmax(m);
  const int64_t pairs = (n + 1) / 2;
  for (int64_t i = lane; i < pairs; i += 32) {
    const int64_t e = start + 2 * i;
    const float x0 = to_float(in[e]);
    // The missing partner of an odd numel's last element quantizes as 0.0 (bnb's zero fill).
    const float x1 = 2 * i + 1 < n ? to_float(in[e + 1]) : 0.0f;
    packed[e >> 1] = static_cast<uint8_t>(nf4_quantize_scaled(x0, inv) << 4 | nf4_quantize_scaled(x1, inv));
  }
}

// ---- double quantization -------------------------------------------------------------------------
// The deterministic mean of nf4_common.cuh (absmax_mean_host): one thread per residue class t,
// ascending i, in double; then the halving tree in shared memory; offset = (float)(sum / n).
__global__ void __launch_bounds__(kMeanPartials)
    nf4_absmax_mean_kernel(const float* __restrict__ absmax, int64_t nblocks, float* __restrict__ offset_out) {
  __shared__ double partials[kMeanPartials];
  const int t = threadIdx.x;
  double s = 0.0;
  for (int64_t i = t; i < nblocks; i += kMeanPartials) s += static_cast<double>(absmax[i]);
  partials[t] = s;
  __syncthreads();
  for (int h = kMeanPartials / 2; h > 0; h /= 2) {
    if (t < h) partials[t] += partials[t + h];
    __syncthreads();
  }
  if (t == 0) *offset_out = nblocks > 0 ? static_cast<float>(partials[0] / static_cast<double>(nblocks)) : 0.0f;
}

// One warp per nested block: absmax2 = max |absmax - offset| over the block (fp32), then each
// centred value scaled by 1/absmax2 and searched in code2 (bnb's quantize_blockwise with the
// signed dynamic map). code2 sits in shared memory: the binary search reads it 8 times per value.
__global__ void __launch_bounds__(kQuantWarps * 32)
    nf4_nested_quantize_kernel(const float* __restrict__ absmax, int64_t nblocks, int nbs,
                               const float* __restrict__ code2, const float* __restrict__ offset_in,
                               uint8_t* __restrict__ absmax_code, float* __restrict__ absmax2, int64_t nblocks2) {
  __shared__ float s_code2[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code2[i] = code2[i];
  __syncthreads();
  const int64_t b2 = int64_t{blockIdx.x} * kQuantWarps + threadIdx.x / 32;
  if (b2 >= nblocks2) return;
  const int lane = threadIdx.x % 32;
  const float offset = *offset_in;
  const int64_t start = b2 * nbs;
  const int64_t n = min(int64_t{nbs}, nblocks - start);

  float m = kAbsmaxInit;
  for (int64_t i = lane; i < n; i += 32) m = absmax_fold(m, nested_centered(absmax[start + i], offset));
  m = warp_max(m);
  if (lane == 0) absmax2[b2] = m;
  const float inv = inverse_absmax(m);
  for (int64_t i = lane; i < n; i += 32) absmax_code[start + i] = nested_quantize(s_code2, absmax[start + i], offset, inv);
}

}  // namespace

cudaError_t nf4_dequantize(const NF4DequantizeArgs& a, cudaStream_t stream) {
  if (a.numel < 0 || a.blocksize < 32 || a.blocksize > 4096 || !is_pow2(a.blocksize) || !a.packed || !a.out)
    return cudaErrorInvalidValue;
  if (a.nested ? (!a.absmax_code || !a.code2 || !a.absmax2 || !is_pow2(a.nested_blocksize)) : !a.absmax)
    return cudaErrorInvalidValue;
  if (a.numel == 0) return cudaGetLastError();
  DequantParams p{};
  p.packed = a.packed;
  p.numel = a.numel;
  p.log2_bs = ilog2(a.blocksize);
  p.log2_nbs = a.nested ? ilog2(a.nested_blocksize) : 0;
  p.absmax = a.absmax;
  p.absmax_code = a.absmax_code;
  p.code2 = a.code2;
  p.absmax2 = a.absmax2;
  p.offset = a.offset;
  p.out = a.out;
  const int variant = (a.variant >= 0 && a.variant < kDequantizeVariants) ? a.variant : 0;
  const bool aligned = reinterpret_cast<uintptr_t>(a.packed) % 4 == 0 &&
                       reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
  switch (a.out_type) {
    case FloatType::f32:
      return a.nested ? launch_dequant<float, true>(p, variant, aligned, stream)
                      : launch_dequant<float, false>(p, variant, aligned, stream);
    case FloatType::f16:
      return a.nested ? launch_dequant<__half, true>(p, variant, aligned, stream)
                      : launch_dequant<__half, false>(p, variant, aligned, stream);
    case FloatType::bf16:
      return a.nested ? launch_dequant<__nv_bfloat16, true>(p, variant, aligned, stream)
                      : launch_dequant<__nv_bfloat16, false>(p, variant, aligned, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t nf4_quantize(const NF4QuantizeArgs& a, cudaStream_t stream) {
  if (a.numel < 0 || a.blocksize < 32 || a.blocksize > 4096 || !is_pow2(a.blocksize) || !a.in || !a.packed ||
      !a.absmax)
    return cudaErrorInvalidValue;
  if (a.numel == 0) return cudaGetLastError();
  const int64_t nblocks = (a.numel + a.blocksize - 1) / a.blocksize;
  const dim3 grid(static_cast<unsigned>((nblocks + kQuantWarps - 1) / kQuantWarps));
  switch (a.in_type) {
    case FloatType::f32:
      nf4_quantize_kernel<float><<<grid, kQuantWarps * 32, 0, stream>>>(
          static_cast<const float*>(a.in), a.numel, a.blocksize, a.packed, a.absmax, nblocks);
      break;
    case FloatType::f16:
      nf4_quantize_kernel<__half><<<grid, kQuantWarps * 32, 0, stream>>>(
          static_cast<const __half*>(a.in), a.numel, a.blocksize, a.packed, a.absmax, nblocks);
      break;
    case FloatType::bf16:
      nf4_quantize_kernel<__nv_bfloat16><<<grid, kQuantWarps * 32, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(a.in), a.numel, a.blocksize, a.packed, a.absmax, nblocks);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t nf4_double_quantize(const float* absmax, int64_t nblocks, int nested_blocksize, const float* code2,
                                uint8_t* absmax_code, float* absmax2, float* offset_out, double* scratch_1024,
                                cudaStream_t stream) {
  (void)scratch_1024;  // the partial sums live in shared memory (8 KB)
  if (nblocks < 0 || !is_pow2(nested_blocksize) || !code2 || !offset_out || (nblocks > 0 && (!absmax || !absmax_code || !absmax2)))
    return cudaErrorInvalidValue;
  nf4_absmax_mean_kernel<<<1, kMeanPartials, 0, stream>>>(absmax, nblocks, offset_out);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || nblocks == 0) return err;
  const int64_t nblocks2 = (nblocks + nested_blocksize - 1) / nested_blocksize;
  const dim3 grid(static_cast<unsigned>((nblocks2 + kQuantWarps - 1) / kQuantWarps));
  nf4_nested_quantize_kernel<<<grid, kQuantWarps * 32, 0, stream>>>(absmax, nblocks, nested_blocksize, code2,
                                                                     offset_out, absmax_code, absmax2, nblocks2);
  return cudaGetLastError();
}

}  // namespace qlora::kernels
