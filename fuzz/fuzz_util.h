// Helpers shared by the libFuzzer targets in fuzz/ (one fuzz_<name> binary per fuzz/<name>.cpp).
//
// The rule every target encodes: malformed input may only end in a qlora::UserError (what the CLI
// prints as one line before exiting with status 2). expect_user_error() swallows exactly that;
// any other exception escapes LLVMFuzzerTestOneInput, terminates the process and libFuzzer
// reports it as a crash. ASan/UBSan reports, timeouts and over-limit allocations are findings too.
//
// Seed mode: with QLORA_FUZZ_WRITE_SEEDS=DIR in the environment a target writes the seed files it
// can build with the project's own writers (GgufWriter, serialize_safetensors, ...) into DIR and
// exits; scripts/fuzz uses it to build the seed corpus.
#pragma once
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/error.h"

namespace qlora::fuzz {

// A scratch directory for inputs that only a path-based API can read: tmpfs when there is one,
// one per process (libFuzzer's -fork / -jobs run several).
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    const std::filesystem::path base =
        std::filesystem::is_directory("/dev/shm") ? std::filesystem::path("/dev/shm") : std::filesystem::temp_directory_path();
    std::filesystem::path d = base / ("qlora-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

inline void write_bytes(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "fuzz: cannot write %s\n", path.c_str());
    std::abort();
  }
}

// Writes `bytes` to scratch_dir()/`name` and returns that path: the input of a path-based API.
inline std::filesystem::path write_scratch(const std::string& name, std::string_view bytes) {
  std::filesystem::path file = scratch_dir() / name;
  write_bytes(file, bytes);
  return file;
}

// Runs `f`; a UserError is the expected outcome of bad input, anything else propagates.
template <typename F>
bool expect_user_error(F&& f) {
  try {
    f();
    return true;
  } catch (const qlora::UserError&) {
    return false;
  }
}

// A broken invariant on input the parser accepted: report and crash, so libFuzzer saves it.
[[noreturn]] inline void invariant_failed(const std::string& what) {
  std::fprintf(stderr, "fuzz: invariant failed: %s\n", what.c_str());
  std::abort();
}

// The directory of real test assets (tokenizers, GGUF vocabularies): $QLORA_ASSETS, else
// ../shared/assets next to the checkout (the tests' location; from the working directory or from
// the binary's build directory), else /work/shared/assets. Empty when none exists (a fresh clone, CI).
inline std::filesystem::path assets_dir() {
  namespace fs = std::filesystem;
  std::vector<fs::path> candidates;
  if (const char* env = std::getenv("QLORA_ASSETS"); env && *env) candidates.emplace_back(env);
  candidates.push_back(fs::current_path() / ".." / "shared" / "assets");
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);  // <checkout>/<build dir>/fuzz_x
  if (!ec) candidates.push_back(exe.parent_path() / ".." / ".." / "shared" / "assets");
  candidates.push_back("/work/shared/assets");
  for (const auto& c : candidates)
    if (fs::is_directory(c / "tokenizers")) return c;
  return {};
}

// For targets that need real assets: exits 0 with a message when there are none, so that a
// machine without them skips the target instead of failing.
inline std::filesystem::path require_assets(const char* target) {
  std::filesystem::path dir = assets_dir();
  if (dir.empty()) {
    std::fprintf(stderr, "%s: SKIP: no test assets (set QLORA_ASSETS to the folder holding tokenizers/ and vocab/)\n", target);
    std::exit(0);
  }
  return dir;
}

// The seed directory when the binary runs in seed mode, else empty.
inline std::filesystem::path seed_output_dir() {
  const char* env = std::getenv("QLORA_FUZZ_WRITE_SEEDS");
  if (!env || !*env) return {};
  std::filesystem::create_directories(env);
  return env;
}

// Removes the scratch directory at exit (registered by targets that use it). libFuzzer ends most
// runs with _Exit, which skips this: scripts/fuzz removes the folders of finished processes.
inline void remove_scratch_at_exit() {
  std::atexit([] {
    std::error_code ec;
    std::filesystem::remove_all(scratch_dir(), ec);
  });
}

// The start of LLVMFuzzerInitialize in the targets that read through a scratch file: with
// QLORA_FUZZ_WRITE_SEEDS=DIR, write the target's seeds there and exit; else the scratch folder goes
// when the fuzzer exits.
template <class WriteSeeds>
void initialize(WriteSeeds&& write_seeds) {
  if (const std::filesystem::path seeds = seed_output_dir(); !seeds.empty()) {
    write_seeds(seeds);
    std::exit(0);
  }
  remove_scratch_at_exit();
}

}  // namespace qlora::fuzz
