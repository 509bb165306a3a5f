// Host memory parsing and the activation-offloading fit check (qlora/host_memory.h).
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "qlora/error.h"
#include "qlora/host_memory.h"

using namespace qlora;
using Catch::Matchers::ContainsSubstring;

TEST_CASE("parse_meminfo_available reads MemAvailable in kB", "[host_memory]") {
  const std::string meminfo =
      "MemTotal:       131072000 kB\nMemFree:         1000 kB\nMemAvailable:   64000000 kB\nBuffers: 1 kB\n";
  REQUIRE(parse_meminfo_available(meminfo) == int64_t{64000000} * 1024);
  CHECK(parse_meminfo_available("MemAvailable: 7 kB") == 7 * 1024);  // last line, no newline
}

TEST_CASE("parse_meminfo_available rejects malformed text", "[host_memory]") {
  CHECK_FALSE(parse_meminfo_available(""));
  CHECK_FALSE(parse_meminfo_available("MemTotal: 100 kB\nMemFree: 5 kB\n"));     // no MemAvailable line
  CHECK_FALSE(parse_meminfo_available("MemAvailable:   kB\n"));                  // no number
  CHECK_FALSE(parse_meminfo_available("MemAvailable: 12 MB\n"));                 // unit other than kB
  CHECK_FALSE(parse_meminfo_available("MemAvailable: 12\n"));                    // no unit
  CHECK_FALSE(parse_meminfo_available("MemAvailable: -12 kB\n"));                // negative
  CHECK_FALSE(parse_meminfo_available("MemAvailable: 99999999999999999999 kB\n"));  // overflows int64
  CHECK_FALSE(parse_meminfo_available("MemAvailable: 9007199254740993 kB\n"));      // * 1024 overflows
  CHECK_FALSE(parse_meminfo_available("XMemAvailable: 12 kB\n"));                // not at the start of a line
}

TEST_CASE("parse_cgroup_bytes reads a byte count; 'max' and garbage are no limit", "[host_memory]") {
  CHECK(parse_cgroup_bytes("8589934592\n") == int64_t{8589934592});
  CHECK(parse_cgroup_bytes("0") == 0);
  CHECK_FALSE(parse_cgroup_bytes("max\n"));
  CHECK_FALSE(parse_cgroup_bytes(""));
  CHECK_FALSE(parse_cgroup_bytes("12 kB\n"));
  CHECK_FALSE(parse_cgroup_bytes("-5\n"));
  CHECK_FALSE(parse_cgroup_bytes("123456789012345678901234567890\n"));
}

TEST_CASE("offload_pinned_bytes rounds each layer input up to a power of two", "[host_memory]") {
  // 8B shape, batch 1 x 262,144 tokens, bf16: 2 GiB per layer, 64 GiB for 32 layers (the OOM kill).
  CHECK(offload_pinned_bytes(32, 262144, 4096, 2) == int64_t{64} << 30);
  // 3 tokens x 5 x 4 bytes = 60 -> 64 per layer.
  CHECK(offload_pinned_bytes(2, 3, 5, 4) == 128);
  CHECK(offload_pinned_bytes(0, 3, 5, 4) == 0);
  CHECK(offload_pinned_bytes(2, 0, 5, 4) == 0);
}

TEST_CASE("check_host_memory_fits: a one-line error when the pinned inputs do not fit", "[host_memory]") {
  HostMemory host;
  host.available = int64_t{100} << 30;
  host.source = "MemAvailable";
  CHECK_NOTHROW(check_host_memory_fits(int64_t{90} << 30, 1, host, "activation_offloading", "d"));
  try {
    check_host_memory_fits(int64_t{91} << 30, 1, host, "activation_offloading", "32 layers x 262144 tokens");
    FAIL("no error");
  } catch (const UserError& e) {
    const std::string m = e.what();
    CHECK_THAT(m, ContainsSubstring("activation_offloading: needs 91.0 GiB of pinned host memory"));
    CHECK_THAT(m, ContainsSubstring("32 layers x 262144 tokens"));
    CHECK_THAT(m, ContainsSubstring("100.0 GiB the host has available (MemAvailable)"));
    CHECK(m.find('\n') == std::string::npos);
  }
  // Two ranks on the host each hold their own inputs.
  CHECK_THROWS_WITH(check_host_memory_fits(int64_t{50} << 30, 2, host, "activation_offloading", "d"),
                    ContainsSubstring("x 2 ranks on this host"));
  // Nothing known about the host: no check.
  CHECK_NOTHROW(check_host_memory_fits(int64_t{1} << 50, 1, HostMemory{}, "activation_offloading", "d"));
}

TEST_CASE("host_memory_available reads this machine", "[host_memory]") {
  const HostMemory h = host_memory_available();
  // Linux always has /proc/meminfo; the CI and dev machines have at least 1 GiB free.
  REQUIRE(h.available > (int64_t{1} << 30));
  CHECK((h.source == "MemAvailable" || h.source == "cgroup limit"));
}
