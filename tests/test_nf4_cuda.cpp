// GPU tests of the NF4 CUDA kernels: CUDA quantize and dequantize equal the CPU reference bit for
// bit (sizes with tails, every output dtype, nested and not, blocksizes 32..4096), every output
// element is written, and the out= form writes exactly its slice of a bigger scratch. Skipped
// without a CUDA device or in a CPU-only build. Seeds are fresh per run and printed on failure;
// QLORA_TEST_SEED=<n> replays one.
// Only ATen headers (not torch/cuda.h): c10's logging header, which that one pulls in, defines a
// glog-style CHECK that clashes with Catch2's.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "qlora/nf4.h"

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "../kernels/nf4.cuh"  // the launcher itself, to test the bench-only launch variants
#endif

#include "test_cuda_util.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/generators/catch_generators_range.hpp>

#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using qlora::test::fresh_seed;


// Random weights that exercise the interesting paths: a per-block scale spread over 6 decades,
// an all-zero block (absmax 0: the 0 * inf = NaN path gives code 0), a block with one non-zero
// value, -0.0, and values exactly on absmax (code 15 / 0). Never zeros only.
at::Tensor random_weight(const std::vector<int64_t>& shape, at::ScalarType dtype, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  at::Tensor w = at::randn({n}, gen, at::TensorOptions(at::kFloat));
  const int64_t chunk = 64;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  at::Tensor scale = at::pow(10.0, at::rand({nchunks}, gen, at::TensorOptions(at::kFloat)) * 6.0 - 4.0);
  w = (w * scale.repeat_interleave(chunk).narrow(0, 0, n)).contiguous();
  float* p = w.data_ptr<float>();
  if (n >= 3 * chunk) {
    for (int64_t i = chunk; i < 2 * chunk; ++i) p[i] = 0.0f;        // an all-zero block (bs 32/64)
    for (int64_t i = 2 * chunk; i < 3 * chunk; ++i) p[i] = 0.0f;    // one non-zero value
    p[2 * chunk + 5] = -3.5f;
  }
  if (n >= 2) p[n - 2] = -0.0f;
  return w.to(dtype).view(shape);
}

at::Tensor as_bits(const at::Tensor& t) {
  switch (t.element_size()) {
    case 1: return t.view(at::kByte);
    case 2: return t.view(at::kShort);
    case 4: return t.view(at::kInt);
    default: FAIL("unexpected element size " << t.element_size());
  }
  return {};
}

// Number of elements whose bit patterns differ (both moved to the CPU).
int64_t bit_diffs(const at::Tensor& a, const at::Tensor& b) {
  REQUIRE(a.scalar_type() == b.scalar_type());
  REQUIRE(a.numel() == b.numel());
  return (as_bits(a.cpu().contiguous()).view({-1}) != as_bits(b.cpu().contiguous()).view({-1})).sum().item<int64_t>();
}

qlora::NF4Tensor to_device(const qlora::NF4Tensor& t, const at::Device& d) {
  qlora::NF4Tensor r = t;
  for (at::Tensor* x : {&r.packed, &r.absmax, &r.absmax2, &r.code2})
    if (x->defined()) *x = x->to(d);
  return r;
}

// A poison bit pattern no reference output has: all ones is a NaN in fp32, fp16 and bf16.
at::Tensor poisoned(int64_t n, at::ScalarType dtype, const at::Device& d) {
  at::Tensor t = at::empty({n}, at::TensorOptions(dtype).device(d));
  as_bits(t).fill_(-1);
  return t;
}

int64_t count_poison(const at::Tensor& t) { return (as_bits(t.cpu().contiguous()) == -1).sum().item<int64_t>(); }

// Leave freed, dirty blocks in the caching allocator so that outputs the API allocates start as
// garbage rather than zeros: an element the kernel forgets then fails the bitwise comparison.
void dirty_allocator(int64_t bytes) {
  at::Tensor junk = at::empty({bytes + 4096}, at::TensorOptions(at::kByte).device(at::kCUDA));
  junk.fill_(0xA5);
}

std::string dtype_name(at::ScalarType t) { return c10::toString(t); }

const std::vector<std::vector<int64_t>> kShapes = {
    {1}, {63}, {64}, {65}, {64 * 256 + 1}, {64 * 256 * 3 + 17}, {1023, 4097},  // the last: 4.19M, odd
};
const std::vector<at::ScalarType> kFloatTypes = {at::kFloat, at::kHalf, at::kBFloat16};

}  // namespace

TEST_CASE("nf4 CUDA dequantize equals the CPU reference bit for bit", "[cuda][nf4]") {
  QLORA_REQUIRE_CUDA();
  const auto shape = GENERATE_COPY(from_range(kShapes));
  const int64_t blocksize = GENERATE(64, 128, 4096, 32);
  const bool nested = GENERATE(true, false);
  const uint64_t seed = fresh_seed();
  CAPTURE(shape, blocksize, nested, seed);

  const at::Tensor w = random_weight(shape, at::kBFloat16, seed);
  const qlora::NF4Tensor cpu = qlora::nf4_quantize(w, blocksize, nested);
  const qlora::NF4Tensor gpu = to_device(cpu, at::Device(at::kCUDA));
  const int64_t n = cpu.numel();
  for (at::ScalarType dt : kFloatTypes) {
    INFO("out dtype " << dtype_name(dt));
    const at::Tensor ref = qlora::nf4_dequantize(cpu, dt);
    REQUIRE(count_poison(ref) == 0);

    at::Tensor out = poisoned(n, dt, at::Device(at::kCUDA));
    qlora::nf4_dequantize_out(gpu, out);
    CHECK(count_poison(out) == 0);
    CHECK(bit_diffs(out, ref) == 0);

    dirty_allocator(n * 4);
    const at::Tensor fresh = qlora::nf4_dequantize(gpu, dt);
    CHECK(fresh.sizes() == ref.sizes());
    CHECK(bit_diffs(fresh, ref) == 0);
  }
}

TEST_CASE("nf4 CUDA quantize equals the CPU reference bit for bit", "[cuda][nf4]") {
  QLORA_REQUIRE_CUDA();
  const auto shape = GENERATE_COPY(from_range(kShapes));
  const int64_t blocksize = GENERATE(64, 128, 4096, 32);
  const bool nested = GENERATE(true, false);
  const at::ScalarType in_type = GENERATE_COPY(from_range(kFloatTypes));
  const uint64_t seed = fresh_seed();
  CAPTURE(shape, blocksize, nested, dtype_name(in_type), seed);

  const at::Tensor w = random_weight(shape, in_type, seed);
  const qlora::NF4Tensor ref = qlora::nf4_quantize(w, blocksize, nested);
  dirty_allocator(w.numel() * 4);
  const qlora::NF4Tensor gpu = to_device(qlora::nf4_quantize(w.cuda(), blocksize, nested), at::Device(at::kCPU));

  CHECK(gpu.shape == ref.shape);
  CHECK(gpu.dtype == ref.dtype);
  CHECK(gpu.nested == ref.nested);
  CHECK(gpu.blocksize == ref.blocksize);
  CHECK(bit_diffs(gpu.packed, ref.packed) == 0);
  CHECK(bit_diffs(gpu.absmax, ref.absmax) == 0);  // fp32 absmax, or the uint8 codes when nested
  if (nested) {
    CHECK(gpu.nested_blocksize == ref.nested_blocksize);
    CHECK(bit_diffs(gpu.absmax2, ref.absmax2) == 0);
    CHECK(bit_diffs(gpu.code2, ref.code2) == 0);
    const float a = static_cast<float>(gpu.offset), b = static_cast<float>(ref.offset);
    CHECK(std::memcmp(&a, &b, sizeof a) == 0);
  }
  // And the round trip on the device equals the one on the host.
  const at::Tensor back_ref = qlora::nf4_dequantize(ref, at::kBFloat16);
  const at::Tensor back_gpu = qlora::nf4_dequantize(to_device(gpu, at::Device(at::kCUDA)), at::kBFloat16);
  CHECK(bit_diffs(back_gpu, back_ref) == 0);
}

TEST_CASE("nf4 CUDA dequantize out= writes exactly its slice of a scratch", "[cuda][nf4]") {
  QLORA_REQUIRE_CUDA();
  const at::ScalarType dt = GENERATE_COPY(from_range(kFloatTypes));
  // 64: a 16-byte-aligned slice (vector path); 37: misaligned (scalar path of the same kernel).
  const int64_t at_elem = GENERATE(64, 37);
  const int64_t numel = GENERATE(int64_t{64 * 256 * 3 + 17}, int64_t{4096 * 64});
  const uint64_t seed = fresh_seed();
  CAPTURE(dtype_name(dt), at_elem, numel, seed);

  const at::Tensor w = random_weight({numel}, at::kFloat, seed);
  const qlora::NF4Tensor cpu = qlora::nf4_quantize(w, 64, true);
  const qlora::NF4Tensor gpu = to_device(cpu, at::Device(at::kCUDA));
  const at::Tensor ref = qlora::nf4_dequantize(cpu, dt);

  const int64_t total = numel + at_elem + 301;
  at::Tensor scratch = poisoned(total, dt, at::Device(at::kCUDA));
  at::Tensor slice = scratch.narrow(0, at_elem, numel);
  REQUIRE(slice.is_contiguous());
  qlora::nf4_dequantize_out(gpu, slice);
  CHECK(bit_diffs(slice, ref) == 0);
  CHECK(count_poison(slice) == 0);
  CHECK(count_poison(scratch.narrow(0, 0, at_elem)) == at_elem);                       // nothing before
  CHECK(count_poison(scratch.narrow(0, at_elem + numel, total - at_elem - numel)) ==  // nothing after
        total - at_elem - numel);
}

TEST_CASE("nf4 CUDA dequantize: every launch variant gives the same bits", "[cuda][nf4]") {
  QLORA_REQUIRE_CUDA();
#ifdef QLORA_WITH_CUDA
  // Variant 1 (streaming stores) is only reachable from the launcher; `qlora bench nf4` times it.
  const int variant = GENERATE(1, 2, 3);
  const at::ScalarType dt = GENERATE_COPY(from_range(kFloatTypes));
  const int64_t numel = GENERATE(int64_t{65}, int64_t{64 * 256 * 3 + 17}, int64_t{1023 * 4097}, int64_t{20000003});
  const uint64_t seed = fresh_seed();
  CAPTURE(variant, dtype_name(dt), numel, seed);
  const at::Tensor w = random_weight({numel}, at::kBFloat16, seed);
  const qlora::NF4Tensor cpu = qlora::nf4_quantize(w, 64, true);
  const qlora::NF4Tensor gpu = to_device(cpu, at::Device(at::kCUDA));
  const at::Tensor ref = qlora::nf4_dequantize(cpu, dt);
  at::Tensor out = poisoned(numel, dt, at::Device(at::kCUDA));

  qlora::kernels::NF4DequantizeArgs a;
  a.packed = gpu.packed.data_ptr<uint8_t>();
  a.numel = numel;
  a.blocksize = 64;
  a.nested = true;
  a.absmax_code = gpu.absmax.data_ptr<uint8_t>();
  a.code2 = gpu.code2.data_ptr<float>();
  a.absmax2 = gpu.absmax2.data_ptr<float>();
  a.offset = static_cast<float>(gpu.offset);
  a.nested_blocksize = static_cast<int>(gpu.nested_blocksize);
  a.out = out.data_ptr();
  a.out_type = dt == at::kFloat  ? qlora::kernels::FloatType::f32
               : dt == at::kHalf ? qlora::kernels::FloatType::f16
                                 : qlora::kernels::FloatType::bf16;
  a.variant = variant;
  REQUIRE(qlora::kernels::nf4_dequantize(a, c10::cuda::getCurrentCUDAStream().stream()) == cudaSuccess);
  CHECK(count_poison(out) == 0);
  CHECK(bit_diffs(out, ref) == 0);
#endif
}

TEST_CASE("nf4 CUDA launchers reject bad arguments", "[cuda][nf4]") {
  QLORA_REQUIRE_CUDA();
#ifdef QLORA_WITH_CUDA
  qlora::kernels::NF4DequantizeArgs a;  // no pointers
  a.numel = 64;
  CHECK(qlora::kernels::nf4_dequantize(a, nullptr) == cudaErrorInvalidValue);
  qlora::kernels::NF4QuantizeArgs q;
  q.numel = 64;
  q.blocksize = 48;  // not a power of two
  CHECK(qlora::kernels::nf4_quantize(q, nullptr) == cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaSuccess);  // nothing was launched, no sticky error
#endif
}
