// Helpers shared by the Catch2 tests: a temporary directory removed at scope exit, whole-file
// read/write, and running the real qlora binary (exit status + combined output, user errors).
#pragma once
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace qlora::test {

// A fresh directory under the system temp dir, unique per process and instance.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& prefix = "qlora_test") {
    static std::atomic<int> n{0};
    path = std::filesystem::temp_directory_path() /
           (prefix + "_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::filesystem::path operator/(const std::string& s) const { return path / s; }
};

inline void write_file(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

inline std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

struct Run {
  int status = -1;
  std::string output;  // stdout and stderr together
};

// Runs `qlora ARGS` (the binary built with the tests; QLORA_BINARY) through the shell.
inline Run run_qlora(const std::string& args) {
  const std::string cmd = std::string(QLORA_BINARY) + " " + args + " 2>&1";
  Run r;
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

// `qlora ARGS` fails as a user error: exit status 2, `text` in the output, no C++ abort. Returns
// the run for further checks (e.g. that the error is one line).
inline Run expect_user_error(const std::string& args, const std::string& text) {
  const Run r = run_qlora(args);
  INFO(args << "\n" << r.output);
  CHECK(r.status == 2);
  CHECK_THAT(r.output, Catch::Matchers::ContainsSubstring(text));
  CHECK(r.output.find("terminate") == std::string::npos);
  return r;
}

}  // namespace qlora::test
