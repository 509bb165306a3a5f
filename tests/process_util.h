// Helpers of the tests that start and watch processes (fault injection, the launcher).
#pragma once
#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "test_util.h"
#include "trainer_fixture.h"

namespace qlora::test {

// A process that still exists and is not a zombie (an orphan waiting to be reaped counts as gone).
inline bool process_alive(pid_t pid) {
  if (pid <= 0 || ::kill(pid, 0) != 0) return false;
  const std::string st = read_file("/proc/" + std::to_string(pid) + "/stat");
  const auto close = st.rfind(')');
  return close == std::string::npos || close + 2 >= st.size() || st[close + 2] != 'Z';
}

// While alive: OMP_NUM_THREADS=1 in the environment of the qlora processes a test starts. The tiny
// models gain nothing from threads, and spinning OpenMP workers slow to a crawl on shared cores.
struct OneThreadChildren {
  std::optional<std::string> old;
  OneThreadChildren() {
    if (const char* v = std::getenv("OMP_NUM_THREADS")) old = v;
    setenv("OMP_NUM_THREADS", "1", 1);
  }
  ~OneThreadChildren() {
    if (old) setenv("OMP_NUM_THREADS", old->c_str(), 1);
    else unsetenv("OMP_NUM_THREADS");
  }
  OneThreadChildren(const OneThreadChildren&) = delete;
  OneThreadChildren& operator=(const OneThreadChildren&) = delete;
};

// The trainer fixture in `dir` and dir/cfg.yaml with `extra` keys added; returns the config's path.
inline std::string write_fixture_config(const std::filesystem::path& dir, const std::string& extra) {
  write_trainer_fixture(dir);
  write_file(dir / "cfg.yaml", trainer_yaml(dir, extra));
  return (dir / "cfg.yaml").string();
}

}  // namespace qlora::test
