// Helpers shared by the GPU tests: skip without a CUDA device (or in a CPU-only build), and fresh
// random seeds that a failing run prints and QLORA_TEST_SEED=<n> replays. Include after the ATen
// headers and before Catch2's (see the test files' first comment).
#pragma once
#include <ATen/Context.h>
#include <catch2/catch_test_macros.hpp>

#include <cstdint>
#include <cstdlib>
#include <random>

#ifdef QLORA_WITH_CUDA
#define QLORA_REQUIRE_CUDA() \
  if (!at::hasCUDA()) SKIP("no CUDA device")
#else
#define QLORA_REQUIRE_CUDA() SKIP("CPU-only build (QLORA_WITH_CUDA is off)")
#endif

namespace qlora::test {

inline uint64_t fresh_seed() {
  if (const char* s = std::getenv("QLORA_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  std::random_device rd;
  return (uint64_t{rd()} << 32) | rd();
}

}  // namespace qlora::test
