// NF4 host side: hand-checked vectors, the shared arithmetic (threshold tree, dynamic map search,
// deterministic mean), CPU quantize/dequantize round trips on odd sizes, every dtype and blocksize,
// the ops through the dispatcher (CPU and Meta), and malformed NF4 tensors.
#include <ATen/core/dispatch/Dispatcher.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>

#include "../kernels/nf4_common.cuh"
#include "qlora/error.h"
#include "qlora/nf4.h"

using Catch::Matchers::ContainsSubstring;
using namespace qlora;

namespace {

// create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) as produced by bitsandbytes'
// python code (functional.py) under torch 2.11 on an x86 AVX2/AVX512 CPU, as fp32 bit patterns.
const uint32_t kDynamicMapBits[256] = {
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
};

float bits_to_float(uint32_t u) { return std::bit_cast<float>(u); }
uint32_t float_to_bits(float f) { return std::bit_cast<uint32_t>(f); }

at::Tensor bytes(std::initializer_list<int> v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kByte);
  int64_t i = 0;
  for (int x : v) t[i++] = x;
  return t;
}

std::string user_error_of(const NF4Tensor& t) {
  try {
    nf4_check(t);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

// Independent dequantization: the codebook, high nibble first, absmax rebuilt in two fp32 steps.
at::Tensor naive_dequant_fp32(const NF4Tensor& t) {
  const int64_t n = t.numel();
  at::Tensor out = at::empty({n}, at::kFloat);
  const auto& cb = nf4_codebook();
  const uint8_t* p = t.packed.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = i / t.blocksize;
    float am;
    if (t.nested) {
      const volatile float prod = t.code2.data_ptr<float>()[t.absmax.data_ptr<uint8_t>()[b]] *
                                  t.absmax2.data_ptr<float>()[b / t.nested_blocksize];
      am = prod + static_cast<float>(t.offset);
    } else {
      am = t.absmax.data_ptr<float>()[b];
    }
    const int code = (i % 2 == 0) ? p[i / 2] >> 4 : p[i / 2] & 15;
    out.data_ptr<float>()[i] = cb[code] * am;
  }
  return out;
}

bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.numel() != b.numel()) return false;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.numel() * ac.element_size()) == 0;
}

}  // namespace

// ---- shared arithmetic ------------------------------------------------------------------------------

TEST_CASE("NF4 threshold tree: nearest code, ties to the lower code", "[nf4]") {
  namespace kq = qlora::kernels;
  const auto& cb = nf4_codebook();
  REQUIRE(cb[7] == 0.0f);
  REQUIRE(cb[0] == -1.0f);
  REQUIRE(cb[15] == 1.0f);
  for (int c = 0; c < 16; ++c) REQUIRE(kq::nf4_quantize_value(cb[c]) == c);
  // bnb's thresholds (csrc/kernels.cu dQuantizeNF4), low to high; each is the midpoint of two codes.
  const float thr[15] = {-0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
                         -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
                         0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
                         0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};
  for (int i = 0; i < 15; ++i) {
    CHECK(std::fabs(thr[i] - (cb[i] + cb[i + 1]) / 2) < 1e-6f);
    CHECK(kq::nf4_quantize_value(thr[i]) == i);  // x == threshold: strict `>` keeps the lower code
    CHECK(kq::nf4_quantize_value(std::nextafter(thr[i], 2.0f)) == i + 1);
    CHECK(kq::nf4_quantize_value(std::nextafter(thr[i], -2.0f)) == i);
  }
  CHECK(kq::nf4_quantize_value(std::numeric_limits<float>::quiet_NaN()) == 0);
  CHECK(kq::nf4_quantize_value(5.0f) == 15);
  CHECK(kq::nf4_quantize_value(-5.0f) == 0);
  CHECK(kq::nf4_quantize_scaled(0.0f, kq::inverse_absmax(0.0f)) == 0);  // all-zero block, as bnb's CUDA
}

TEST_CASE("signed dynamic map is bitsandbytes' create_dynamic_map", "[nf4]") {
  const auto& m = bnb_signed_dynamic_map();
  REQUIRE(m.size() == 256);
  for (int i = 0; i < 256; ++i) {
    INFO("index " << i);
    CHECK(float_to_bits(m[i]) == kDynamicMapBits[i]);
  }
  for (int i = 0; i + 1 < 256; ++i) CHECK(m[i] < m[i + 1]);
  CHECK(m[127] == 0.0f);
  CHECK(m[255] == 1.0f);
  CHECK(m[0] == bits_to_float(0xbf7e3333u));  // -(1 + 0.9859375) / 2: the lowest mean of the top decade
  for (int i = 0; i < 127; ++i) CHECK(m[i] == -m[254 - i]);  // symmetric apart from 0 and 1.0
  CHECK(m[128] == bits_to_float(0x3513a3b7u));  // fl(fl(1e-6) * 0.55f), the smallest positive
}

TEST_CASE("dynamic map search is the nearest code", "[nf4]") {
  namespace kq = qlora::kernels;
  const float* code = bnb_signed_dynamic_map().data();
  for (int i = 0; i < 256; ++i) CHECK(kq::dynamic_quantize_value(code, code[i]) == i);
  at::manual_seed(1);
  at::Tensor xs = at::rand({20000}, at::kFloat) * 2 - 1;
  xs = at::cat({xs, at::rand({2000}, at::kFloat) * 1e-3 - 5e-4, at::tensor({-1.0f, 1.0f, 0.0f})});
  for (int64_t k = 0; k < xs.numel(); ++k) {
    const float x = xs.data_ptr<float>()[k];
    const int q = kq::dynamic_quantize_value(code, x);
    double best = 1e9;
    for (int i = 0; i < 256; ++i) best = std::min(best, std::fabs(double(x) - code[i]));
    INFO("x = " << x << " q = " << q);
    CHECK(std::fabs(double(x) - code[q]) <= best + 1e-7);
  }
  // midpoint tie between code[127] == 0 and code[128]: stays on the pivot side (as bnb's dQuantize<0>)
  const float mid = (code[127] + code[128]) * 0.5f;
  const int q = kq::dynamic_quantize_value(code, mid);
  CHECK((q == 127 || q == 128));
  CHECK(kq::dynamic_quantize_value(code, std::numeric_limits<float>::quiet_NaN()) == 0);
}

TEST_CASE("deterministic absmax mean", "[nf4]") {
  namespace kq = qlora::kernels;
  const float a[3] = {1.0f, 2.0f, 6.0f};
  CHECK(kq::absmax_mean_host(a, 3) == 3.0f);
  CHECK(kq::absmax_mean_host(a, 0) == 0.0f);
  at::manual_seed(2);
  at::Tensor v = at::rand({5000}, at::kFloat);
  const double ref = v.to(at::kDouble).mean().item<double>();
  CHECK(std::fabs(kq::absmax_mean_host(v.data_ptr<float>(), 5000) - ref) <= 1e-7 * ref);
  // the order: partials over i = t (mod 1024) then a halving tree; equals a direct emulation
  double partials[1024] = {};
  for (int i = 0; i < 5000; ++i) partials[i % 1024] += double(v.data_ptr<float>()[i]);
  for (int s = 512; s > 0; s /= 2)
    for (int t = 0; t < s; ++t) partials[t] += partials[t + s];
  CHECK(kq::absmax_mean_host(v.data_ptr<float>(), 5000) == float(partials[0] / 5000));
}

// ---- hand-checked vectors -----------------------------------------------------------------------------

TEST_CASE("NF4 hand-checked vector, not nested", "[nf4]") {
  // absmax 1: 1 -> 15, -1 -> 0, 0 -> 7, 0.5 -> 12 (0.4407 is nearer than 0.5626), 0.25 -> 10,
  // -0.5 -> 2, 0.1 -> 8, 0.9 -> 15. Bytes: F0 7C A2 8F.
  const at::Tensor w = at::tensor({1.0f, -1.0f, 0.0f, 0.5f, 0.25f, -0.5f, 0.1f, 0.9f}).reshape({2, 4});
  const NF4Tensor t = nf4_quantize(w, 64, false);
  CHECK(t.shape == std::vector<int64_t>{2, 4});
  CHECK(t.dtype == at::kFloat);
  CHECK(bitwise_equal(t.packed, bytes({0xF0, 0x7C, 0xA2, 0x8F})));
  REQUIRE(t.absmax.numel() == 1);
  CHECK(t.absmax.item<float>() == 1.0f);
  const at::Tensor d = nf4_dequantize(t, at::kFloat);
  CHECK(d.sizes() == w.sizes());
  const float expect[8] = {1.0f, -1.0f, 0.0f, 0.44070982933044434f, 0.24611230194568634f, -0.5250730514526367f,
                           0.07958029955625534f, 1.0f};
  for (int i = 0; i < 8; ++i) CHECK(d.reshape({-1})[i].item<float>() == expect[i]);
}

TEST_CASE("NF4 hand-checked odd tail", "[nf4]") {
  // absmax 3, inv = fl(1/3): 2/3 -> 14, -1/6 -> 5, fl(3 * fl(1/3)) == 1 -> 15, zero padding -> 7.
  const NF4Tensor t = nf4_quantize(at::tensor({2.0f, -0.5f, 3.0f}), 64, false);
  CHECK(bitwise_equal(t.packed, bytes({0xE5, 0xF7})));
  const at::Tensor d = nf4_dequantize(t, at::kFloat);
  CHECK(d[0].item<float>() == 0.7229568362236023f * 3.0f);
  CHECK(d[1].item<float>() == -0.18477343022823334f * 3.0f);
  CHECK(d[2].item<float>() == 3.0f);
}

TEST_CASE("NF4 all-zero blocks follow bitsandbytes' CUDA kernels", "[nf4]") {
  // 1/0 = inf and 0 * inf = NaN, which fails every `>` of the tree: code 0, stored absmax 0,
  // dequantized as -1.0 * 0 = -0.0; no NaN anywhere.
  at::Tensor w = at::cat({at::zeros({64}), at::ones({64}), at::zeros({1})});
  const NF4Tensor t = nf4_quantize(w, 64, false);
  REQUIRE(t.packed.numel() == 65);
  for (int j = 0; j < 32; ++j) CHECK(t.packed[j].item<int>() == 0x00);
  for (int j = 32; j < 64; ++j) CHECK(t.packed[j].item<int>() == 0xFF);
  CHECK(t.packed[64].item<int>() == 0x00);  // a one-element zero block: value and padding both code 0
  CHECK(t.absmax[0].item<float>() == 0.0f);
  const at::Tensor d = nf4_dequantize(t, at::kFloat);
  CHECK(at::isnan(d).sum().item<int64_t>() == 0);
  CHECK(d[0].item<float>() == 0.0f);
  CHECK(std::signbit(d[0].item<float>()));
  CHECK(d[64].item<float>() == 1.0f);
}

TEST_CASE("NF4 hand-checked double quantization", "[nf4]") {
  // Block absmax 1 and 3: offset 2, centred -1 and +1, absmax2 1; -1 -> code 0 (below code[0] ==
  // -0.99296875), +1 -> code 255 (== 1.0). Rebuilt: fl(code[0] * 1 + 2) and 3.
  const at::Tensor w = at::cat({at::ones({64}), at::full({64}, 3.0f)}).to(at::kBFloat16);
  const NF4Tensor t = nf4_quantize(w, 64, true);
  REQUIRE(t.nested);
  CHECK(t.offset == 2.0);
  CHECK(bitwise_equal(t.absmax, bytes({0, 255})));
  REQUIRE(t.absmax2.numel() == 1);
  CHECK(t.absmax2.item<float>() == 1.0f);
  CHECK(t.code2.numel() == 256);
  for (int j = 0; j < 64; ++j) CHECK(t.packed[j].item<int>() == 0xFF);
  const at::Tensor d = nf4_dequantize(t, at::kFloat);
  const float am0 = bnb_signed_dynamic_map()[0] * 1.0f + 2.0f;
  CHECK(d[0].item<float>() == am0);
  CHECK(d[127].item<float>() == 3.0f);
  CHECK(nf4_dequantize(t).scalar_type() == at::kBFloat16);
}

TEST_CASE("NF4 all-equal absmax: absmax2 == 0 gives code 0 and the offset back", "[nf4]") {
  const NF4Tensor t = nf4_quantize(at::full({64 * 5}, -2.0f), 64, true);
  CHECK(t.offset == 2.0);
  CHECK(t.absmax2.item<float>() == 0.0f);
  for (int b = 0; b < 5; ++b) CHECK(t.absmax[b].item<int>() == 0);
  const at::Tensor d = nf4_dequantize(t, at::kFloat);
  CHECK(at::all(d == -2.0f).item<bool>());
}

// ---- round trips on odd sizes --------------------------------------------------------------------------

TEST_CASE("NF4 CPU round trip: sizes, blocksizes, dtypes, nested", "[nf4]") {
  const int64_t n = GENERATE(int64_t{1}, int64_t{63}, int64_t{64}, int64_t{65}, int64_t{64 * 256 + 1},
                             int64_t{64 * 256 * 3 + 17});
  const int64_t bs = GENERATE(int64_t{64}, int64_t{32}, int64_t{128}, int64_t{4096});
  const bool nested = GENERATE(false, true);
  const at::ScalarType in_dtype = GENERATE(at::kFloat, at::kHalf, at::kBFloat16);
  CAPTURE(n, bs, nested, in_dtype);
  at::manual_seed(n * 7 + bs);
  const at::Tensor w = (at::randn({n}, at::kFloat) * 0.02).to(in_dtype);
  const NF4Tensor t = nf4_quantize(w, bs, nested);
  nf4_check(t);
  const int64_t nb = (n + bs - 1) / bs;
  REQUIRE(t.packed.numel() == (n + 1) / 2);
  REQUIRE(t.absmax.numel() == nb);
  if (nested) REQUIRE(t.absmax2.numel() == (nb + 255) / 256);

  const at::Tensor d32 = nf4_dequantize(t, at::kFloat);
  CHECK(bitwise_equal(d32, naive_dequant_fp32(t)));
  for (at::ScalarType out : {at::kHalf, at::kBFloat16}) {
    const at::Tensor d = nf4_dequantize(t, out);
    CHECK(d.scalar_type() == out);
    CHECK(bitwise_equal(d, d32.to(out)));  // one fp32 product, then round to nearest even
    at::Tensor scratch = at::full({n + 5}, 7.0f, at::TensorOptions().dtype(out)).narrow(0, 0, n);
    nf4_dequantize_out(t, scratch);
    CHECK(bitwise_equal(scratch, d));
  }

  // Error bound: half the widest code gap (0.152 * absmax), plus the absmax rebuild error when nested.
  const at::Tensor x = w.to(at::kFloat);
  const at::Tensor am = at::constant_pad_nd(x.abs().reshape({-1}), {0, nb * bs - n}).reshape({nb, bs}).amax(1);
  at::Tensor bound = am * 0.152f + 1e-7f;
  if (nested) bound = bound + 0.011f * am.max();
  const at::Tensor err = at::constant_pad_nd((x - d32).abs().reshape({-1}), {0, nb * bs - n}).reshape({nb, bs}).amax(1);
  CHECK(at::all(err <= bound).item<bool>());
  // every element took the nearest code of its block's scale (ties may go either way within 1 ulp)
  if (!nested) {
    const at::Tensor inv = 1.0f / t.absmax;
    const at::Tensor y = x * inv.repeat_interleave(bs).narrow(0, 0, n);
    const at::Tensor cb = at::from_blob(const_cast<float*>(nf4_codebook().data()), {16}, at::kFloat);
    const at::Tensor dist = (y.unsqueeze(1) - cb.unsqueeze(0)).abs();
    const at::Tensor chosen = (y - d32 / t.absmax.repeat_interleave(bs).narrow(0, 0, n)).abs();
    CHECK(at::all(chosen <= std::get<0>(dist.min(1)) + 1e-6f).item<bool>());
  }
  // quantization is deterministic
  const NF4Tensor t2 = nf4_quantize(w, bs, nested);
  CHECK(bitwise_equal(t2.packed, t.packed));
  CHECK(bitwise_equal(t2.absmax, t.absmax));
  CHECK(t2.offset == t.offset);
}

TEST_CASE("NF4 quantize: 2-D shape and non-contiguous input", "[nf4]") {
  at::manual_seed(3);
  const at::Tensor w = at::randn({96, 70}, at::kFloat);
  const NF4Tensor a = nf4_quantize(w.t(), 64, true);  // transposed: quantizes the row-major values
  const NF4Tensor b = nf4_quantize(w.t().contiguous(), 64, true);
  CHECK(a.shape == std::vector<int64_t>{70, 96});
  CHECK(bitwise_equal(a.packed, b.packed));
  CHECK(bitwise_equal(a.absmax, b.absmax));
  CHECK(nf4_dequantize(a, at::kHalf).sizes() == at::IntArrayRef({70, 96}));
}

TEST_CASE("NF4 quantize rejects bad arguments", "[nf4]") {
  CHECK_THROWS_AS(nf4_quantize(at::ones({8}), 48, false), UserError);
  CHECK_THROWS_AS(nf4_quantize(at::ones({8}), 8192, false), UserError);
  CHECK_THROWS_AS(nf4_quantize(at::ones({8}, at::kInt), 64, false), UserError);
  const NF4Tensor t = nf4_quantize(at::ones({8}), 64, false);
  CHECK_THROWS_AS(nf4_dequantize(t, at::kDouble), UserError);
  at::Tensor wrong_size = at::empty({9}, at::kFloat);
  CHECK_THROWS_WITH(nf4_dequantize_out(t, wrong_size), ContainsSubstring("9 elements, expected 8"));
  at::Tensor strided = at::empty({16}, at::kFloat).slice(0, 0, 16, 2);
  CHECK_THROWS_WITH(nf4_dequantize_out(t, strided), ContainsSubstring("contiguous"));
}

// ---- malformed NF4 tensors ---------------------------------------------------------------------------

TEST_CASE("nf4_check names the bad field", "[nf4]") {
  at::manual_seed(4);
  const NF4Tensor good = nf4_quantize(at::randn({3, 100}), 64, true);  // 300 elements, 5 blocks
  REQUIRE(user_error_of(good) == "");
  const NF4Tensor plain = nf4_quantize(at::randn({3, 100}), 64, false);
  REQUIRE(user_error_of(plain) == "");

  NF4Tensor t = good;
  t.packed = t.packed.narrow(0, 0, 149);
  CHECK_THAT(user_error_of(t), ContainsSubstring("packed has 149 elements, expected 150"));

  t = good;
  t.shape = {3, 101};  // numel mismatch with the data
  CHECK_THAT(user_error_of(t), ContainsSubstring("packed has 150 elements, expected 152"));

  t = good;
  t.absmax = t.absmax.narrow(0, 0, 4);
  CHECK_THAT(user_error_of(t), ContainsSubstring("absmax has 4 elements, expected 5"));

  t = good;
  t.absmax = at::zeros({5}, at::kFloat);  // nested wants uint8 codes
  CHECK_THAT(user_error_of(t), ContainsSubstring("absmax must be Byte"));

  t = plain;
  t.absmax = at::zeros({5}, at::kByte);
  CHECK_THAT(user_error_of(t), ContainsSubstring("absmax must be Float"));

  t = good;
  t.absmax2 = at::zeros({2}, at::kFloat);
  CHECK_THAT(user_error_of(t), ContainsSubstring("absmax2 has 2 elements, expected 1"));

  t = good;
  t.code2 = at::zeros({255}, at::kFloat);
  CHECK_THAT(user_error_of(t), ContainsSubstring("code2 has 255 elements, expected 256"));

  t = good;
  t.code2 = at::Tensor();
  CHECK_THAT(user_error_of(t), ContainsSubstring("code2 is missing"));

  t = good;
  t.blocksize = 48;
  CHECK_THAT(user_error_of(t), ContainsSubstring("blocksize must be a power of two"));

  t = good;
  t.shape = {-3, -100};
  CHECK_THAT(user_error_of(t), ContainsSubstring("negative dimension"));

  t = good;
  t.dtype = at::kInt;
  CHECK_THAT(user_error_of(t), ContainsSubstring("dtype must be"));

  t = good;
  t.offset = std::nan("");
  CHECK_THAT(user_error_of(t), ContainsSubstring("offset must be finite"));

  t = good;
  t.packed = at::Tensor();
  CHECK_THAT(user_error_of(t), ContainsSubstring("packed is missing"));

  t = good;
  t.shape = {int64_t{1} << 40, int64_t{1} << 40};
  CHECK_THAT(user_error_of(t), ContainsSubstring("overflows"));

  t = good;
  t.absmax2 = at::zeros({3});
  CHECK_THROWS_AS(nf4_dequantize(t, at::kFloat), UserError);  // the API validates before it reads
}

// ---- ops through the dispatcher -------------------------------------------------------------------

namespace {
using QuantizeSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                                                         bool);
using DequantSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, int64_t, c10::SymIntArrayRef, at::ScalarType);
using DequantOutSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t, c10::SymIntArrayRef, at::ScalarType, at::Tensor&);

auto quantize_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("qlora::nf4_quantize", "").typed<QuantizeSig>();
}
auto dequant_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("qlora::nf4_dequantize", "").typed<DequantSig>();
}
auto dequant_out_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("qlora::nf4_dequantize", "out").typed<DequantOutSig>();
}
}  // namespace

TEST_CASE("NF4 ops on CPU match the C++ API", "[nf4]") {
  const bool nested = GENERATE(false, true);
  at::manual_seed(5);
  const at::Tensor w = at::randn({33, 65}, at::kBFloat16);
  const NF4Tensor t = nf4_quantize(w, 64, nested);
  const auto [packed, absmax, absmax2, code2, offset] = quantize_op().call(w, 64, nested);
  CHECK(bitwise_equal(packed, t.packed));
  CHECK(bitwise_equal(absmax, t.absmax));
  if (nested) {
    CHECK(bitwise_equal(absmax2, t.absmax2));
    CHECK(bitwise_equal(code2, t.code2));
    CHECK(offset.dim() == 0);
    CHECK(offset.scalar_type() == at::kFloat);
    CHECK(offset.item<float>() == static_cast<float>(t.offset));
  } else {
    CHECK(absmax.scalar_type() == at::kFloat);
    CHECK(absmax2.numel() == 0);
    CHECK(code2.numel() == 0);
    CHECK(offset.numel() == 0);
  }
  const std::vector<c10::SymInt> shape = {c10::SymInt(33), c10::SymInt(65)};
  for (at::ScalarType dt : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const at::Tensor d = dequant_op().call(packed, absmax, absmax2, code2, offset, 64, shape, dt);
    CHECK(d.sizes() == at::IntArrayRef({33, 65}));
    CHECK(bitwise_equal(d, nf4_dequantize(t, dt)));
    at::Tensor out = at::empty({33 * 65}, dt);
    out.fill_(7);  // poison: every element must be overwritten
    dequant_out_op().call(packed, absmax, absmax2, code2, offset, 64, shape, dt, out);
    CHECK(bitwise_equal(out, d.reshape({-1})));
  }
  at::Tensor wrong = at::empty({33 * 65}, at::kHalf);
  CHECK_THROWS(dequant_out_op().call(packed, absmax, absmax2, code2, offset, 64, shape, at::kFloat, wrong));
  if (nested)  // nested (uint8 absmax) without an offset value
    CHECK_THROWS_WITH(dequant_op().call(packed, absmax, absmax2, code2, at::empty({0}), 64, shape, at::kFloat),
                      ContainsSubstring("offset must be one fp32 value"));
  const std::vector<c10::SymInt> bad_shape = {c10::SymInt(33), c10::SymInt(66)};
  CHECK_THROWS_AS(dequant_op().call(packed, absmax, absmax2, code2, offset, 64, bad_shape, at::kFloat), UserError);
}

TEST_CASE("NF4 ops: Meta shapes", "[nf4]") {
  const at::Tensor w = at::empty({4096, 1000}, at::TensorOptions().dtype(at::kHalf).device(at::kMeta));
  {
    const auto [packed, absmax, absmax2, code2, offset] = quantize_op().call(w, 64, true);
    CHECK(packed.is_meta());
    CHECK(packed.sizes() == at::IntArrayRef({4096 * 1000 / 2}));
    CHECK(packed.scalar_type() == at::kByte);
    CHECK(absmax.sizes() == at::IntArrayRef({64000}));
    CHECK(absmax.scalar_type() == at::kByte);
    CHECK(absmax2.sizes() == at::IntArrayRef({250}));
    CHECK(code2.sizes() == at::IntArrayRef({256}));
    CHECK(offset.dim() == 0);
    const std::vector<c10::SymInt> shape = {c10::SymInt(4096), c10::SymInt(1000)};
    const at::Tensor d = dequant_op().call(packed, absmax, absmax2, code2, offset, 64, shape, at::kBFloat16);
    CHECK(d.is_meta());
    CHECK(d.sizes() == at::IntArrayRef({4096, 1000}));
    CHECK(d.scalar_type() == at::kBFloat16);
  }
  {
    const at::Tensor odd = at::empty({3, 43}, at::TensorOptions().dtype(at::kFloat).device(at::kMeta));
    const auto [packed, absmax, absmax2, code2, offset] = quantize_op().call(odd, 128, false);
    CHECK(packed.sizes() == at::IntArrayRef({65}));
    CHECK(absmax.sizes() == at::IntArrayRef({2}));
    CHECK(absmax.scalar_type() == at::kFloat);
    CHECK(absmax2.numel() == 0);
  }
  CHECK_THROWS(quantize_op().call(w, 100, true));
}
