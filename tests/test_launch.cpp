// scripts/launch, the torchrun-compatible launcher: the environment each rank gets, stopping every
// worker when one fails, forwarding SIGTERM/SIGINT, usage errors, and the plain all-succeed case.
// Workers are small `sh -c` scripts that write files into a temporary directory; the launcher is
// started with fork/exec so the test can signal it and bound how long it runs.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "process_util.h"
#include "test_util.h"

namespace fs = std::filesystem;
using Catch::Matchers::ContainsSubstring;
using qlora::test::read_file;
using qlora::test::process_alive;
using qlora::test::TempDir;
using Clock = std::chrono::steady_clock;

namespace {

const std::string kLaunch = std::string(QLORA_SOURCE_DIR) + "/scripts/launch";

// A launcher started in `dir` with `args` (and `env` added to ours); its stdout and stderr go to
// dir/launch.out and dir/launch.err. Everything the child needs is built before fork().
struct Launcher {
  pid_t pid = -1;
  fs::path dir;
  Launcher(const fs::path& d, const std::vector<std::string>& args,
           const std::vector<std::string>& env = {}) : dir(d) {
    std::vector<std::string> all{kLaunch};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : all) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    std::vector<char*> envp;
    for (char** e = environ; *e; ++e) envp.push_back(*e);
    for (auto& kv : env) envp.push_back(const_cast<char*>(kv.c_str()));
    envp.push_back(nullptr);
    const std::string out = (d / "launch.out").string(), err = (d / "launch.err").string();
    pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      // Child: default signal dispositions (so the launcher can trap INT/TERM), files as output.
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      for (int s : {SIGINT, SIGTERM, SIGQUIT, SIGHUP, SIGPIPE}) signal(s, SIG_DFL);
      const int fo = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int fe = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fo < 0 || fe < 0 || ::chdir(d.c_str()) != 0) _exit(126);
      ::dup2(fo, 1);
      ::dup2(fe, 2);
      ::close(fo);
      ::close(fe);
      ::execve(argv[0], argv.data(), envp.data());
      _exit(127);
    }
  }
  // Exit status (128+signal when killed); -1 when it did not end within `limit` (then killed).
  int wait_for(std::chrono::duration<double> limit) {
    const auto end = Clock::now() + limit;
    while (Clock::now() < end) {
      int st = 0;
      const pid_t r = ::waitpid(pid, &st, WNOHANG);
      if (r == pid) {
        pid = -1;
        return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }
  ~Launcher() {  // a failed test must not leave a launcher (or its workers) behind
    if (pid > 0) {
      ::kill(pid, SIGTERM);
      if (wait_for(std::chrono::seconds(15)) < 0) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
      }
    }
  }
  std::string err() const { return read_file(dir / "launch.err"); }
  std::string out() const { return read_file(dir / "launch.out"); }
};

// `sh -c SCRIPT` as a worker command.
std::vector<std::string> with_sh(std::vector<std::string> flags, const std::string& script) {
  flags.insert(flags.end(), {"--", "sh", "-c", script});
  return flags;
}

// Runs the launcher to completion (bounded at 60 s).
int run_launch(const fs::path& dir, const std::vector<std::string>& args) {
  Launcher l(dir, args);
  return l.wait_for(std::chrono::seconds(60));
}

// KEY=VALUE lines -> map.
std::map<std::string, std::string> parse_env(const std::string& text) {
  std::map<std::string, std::string> m;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    const auto eq = line.find('=');
    if (eq != std::string::npos) m[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return m;
}

// Polls until no pid of `pids` is alive; false if some still are after `limit`.
bool all_gone(const std::vector<pid_t>& pids, std::chrono::duration<double> limit) {
  const auto end = Clock::now() + limit;
  for (;;) {
    bool any = false;
    for (pid_t p : pids) any = any || process_alive(p);
    if (!any) return true;
    if (Clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

pid_t read_pid(const fs::path& p) { return static_cast<pid_t>(std::atol(read_file(p).c_str())); }

// At scope exit, SIGKILLs every worker shell or sleep whose pid a pid.* / child.* file in `dir`
// names and that still runs: a failing check must not leave 10-minute sleepers behind.
struct KillLeftovers {
  fs::path dir;
  ~KillLeftovers() {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string name = e.path().filename().string();
      if (name.rfind("pid.", 0) != 0 && name.rfind("child.", 0) != 0) continue;
      const pid_t pid = read_pid(e.path());
      const std::string cmd = read_file("/proc/" + std::to_string(pid) + "/cmdline");
      if (process_alive(pid) && (cmd.rfind("sh", 0) == 0 || cmd.rfind("sleep", 0) == 0))
        ::kill(pid, SIGKILL);
    }
  }
};

// Waits until every file exists (the workers are set up); false after `limit`.
bool wait_files(const std::vector<fs::path>& files, std::chrono::duration<double> limit) {
  const auto end = Clock::now() + limit;
  for (;;) {
    bool all = true;
    for (const auto& f : files) all = all && fs::exists(f) && fs::file_size(f) > 0;
    if (all) return true;
    if (Clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

const std::string kWriteEnv =
    "env | grep -E '^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT)=' "
    "> env.$RANK";

}  // namespace

TEST_CASE("launch: each worker gets its rank's torchrun environment", "[launch]") {
  SECTION("one node, defaults") {
    TempDir d("qlora_launch");
    REQUIRE(run_launch(d.path, with_sh({"--nproc-per-node", "3"}, kWriteEnv)) == 0);
    for (int r = 0; r < 3; ++r) {
      CAPTURE(r);
      auto e = parse_env(read_file(d / ("env." + std::to_string(r))));
      CHECK(e["RANK"] == std::to_string(r));
      CHECK(e["LOCAL_RANK"] == std::to_string(r));
      CHECK(e["WORLD_SIZE"] == "3");
      CHECK(e["LOCAL_WORLD_SIZE"] == "3");
      CHECK(e["MASTER_ADDR"] == "127.0.0.1");
      CHECK(e["MASTER_PORT"] == "29500");
    }
    CHECK_FALSE(fs::exists(d / "env.3"));
  }
  SECTION("second of two nodes, underscore and --flag=value spellings") {
    TempDir d("qlora_launch");
    REQUIRE(run_launch(d.path, with_sh({"--nproc_per_node=3", "--nnodes", "2", "--node_rank", "1",
                                        "--master-addr=10.1.2.3", "--master_port", "31337",
                                        "--no-python"},
                                       kWriteEnv)) == 0);
    for (int r = 3; r < 6; ++r) {
      CAPTURE(r);
      auto e = parse_env(read_file(d / ("env." + std::to_string(r))));
      CHECK(e["RANK"] == std::to_string(r));
      CHECK(e["LOCAL_RANK"] == std::to_string(r - 3));
      CHECK(e["WORLD_SIZE"] == "6");
      CHECK(e["LOCAL_WORLD_SIZE"] == "3");
      CHECK(e["MASTER_ADDR"] == "10.1.2.3");
      CHECK(e["MASTER_PORT"] == "31337");
    }
    for (int r : {0, 1, 2, 6}) CHECK_FALSE(fs::exists(d / ("env." + std::to_string(r))));
  }
  SECTION("--standalone: local address, one free port shared by all ranks") {
    TempDir d("qlora_launch");
    REQUIRE(run_launch(d.path, with_sh({"--standalone", "--nproc-per-node", "2"}, kWriteEnv)) == 0);
    auto e0 = parse_env(read_file(d / "env.0"));
    auto e1 = parse_env(read_file(d / "env.1"));
    CHECK(e0["MASTER_ADDR"] == "127.0.0.1");
    const int port = std::atoi(e0["MASTER_PORT"].c_str());
    CHECK(port > 0);
    CHECK(port < 65536);
    CHECK(e1["MASTER_PORT"] == e0["MASTER_PORT"]);
    CHECK(e1["WORLD_SIZE"] == "2");
  }
}

TEST_CASE("launch: a failing worker stops all the others", "[launch]") {
  SECTION("exit 3 while the others sleep") {
    TempDir d("qlora_launch");
    // Rank 1 fails after 0.5 s; ranks 0 and 2 (a shell and its sleeping child) would run 10 min.
    const std::string script =
        "echo $$ > pid.$RANK; if [ \"$RANK\" = 1 ]; then sleep 0.5; exit 3; fi; "
        "sleep 600 & echo $! > child.$RANK; wait";
    const auto t0 = Clock::now();
    Launcher l(d.path, with_sh({"--nproc-per-node", "3"}, script));
    KillLeftovers cleanup{d.path};
    const int status = l.wait_for(std::chrono::seconds(20));
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    CHECK(status == 3);
    CHECK(secs < 20.0);
    CHECK_THAT(l.err(), ContainsSubstring("launch: rank 1 exited with status 3; stopped the other workers"));
    std::vector<pid_t> pids;
    for (const char* f : {"pid.0", "pid.1", "pid.2", "child.0", "child.2"}) {
      CAPTURE(f);
      REQUIRE(fs::exists(d / f));
      pids.push_back(read_pid(d / f));
    }
    CHECK(all_gone(pids, std::chrono::seconds(3)));
  }
  SECTION("a worker killed by a signal; a child ignoring SIGTERM gets SIGKILL after the grace") {
    TempDir d("qlora_launch");
    const std::string script =
        "if [ \"$RANK\" = 0 ]; then sleep 0.5; kill -KILL $$; fi; "
        "trap '' TERM; sleep 600 & echo $! > child.$RANK; wait";
    const auto t0 = Clock::now();
    Launcher l(d.path, with_sh({"--nproc-per-node", "2"}, script), {"QLORA_LAUNCH_GRACE_S=1"});
    KillLeftovers cleanup{d.path};
    const int status = l.wait_for(std::chrono::seconds(20));
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    CHECK(status == 128 + SIGKILL);
    CHECK(secs >= 1.0);   // waited the grace period for the TERM-ignoring worker
    CHECK(secs < 20.0);
    CHECK_THAT(l.err(), ContainsSubstring("launch: rank 0 exited with status 137"));
    REQUIRE(fs::exists(d / "child.1"));
    CHECK(all_gone({read_pid(d / "child.1")}, std::chrono::seconds(3)));
  }
}

TEST_CASE("launch: SIGTERM and SIGINT to the launcher reach every worker", "[launch]") {
  for (int sig : {SIGTERM, SIGINT}) {
    const std::string name = sig == SIGTERM ? "TERM" : "INT";
    CAPTURE(name);
    TempDir d("qlora_launch");
    const std::string script = "trap 'echo " + name + " > got.$RANK; exit 0' " + name +
                               "; sleep 600 & echo $! > child.$RANK; echo $$ > pid.$RANK; wait";
    Launcher l(d.path, with_sh({"--nproc-per-node", "3"}, script));
    KillLeftovers cleanup{d.path};
    std::vector<fs::path> ready;
    for (int r = 0; r < 3; ++r) ready.push_back(d / ("pid." + std::to_string(r)));
    REQUIRE(wait_files(ready, std::chrono::seconds(20)));
    REQUIRE(::kill(l.pid, sig) == 0);
    const int status = l.wait_for(std::chrono::seconds(20));
    CHECK(status == 128 + sig);
    std::vector<pid_t> pids;
    for (int r = 0; r < 3; ++r) {
      CAPTURE(r);
      CHECK(read_file(d / ("got." + std::to_string(r))) == name + "\n");
      pids.push_back(read_pid(d / ("pid." + std::to_string(r))));
      pids.push_back(read_pid(d / ("child." + std::to_string(r))));
    }
    CHECK(all_gone(pids, std::chrono::seconds(3)));
  }
}

TEST_CASE("launch: bad usage exits 2 naming the flag", "[launch]") {
  struct Case {
    std::vector<std::string> args;
    std::string names;
  };
  const std::vector<Case> cases = {
      {{"--bogus", "3", "touch", "ran"}, "--bogus"},
      {{"--nproc-per-node", "two", "touch", "ran"}, "--nproc-per-node"},
      {{"--nproc-per-node=0", "touch", "ran"}, "--nproc-per-node"},
      {{"--nnodes", "1:2", "touch", "ran"}, "--nnodes"},
      {{"--nnodes", "2", "--node-rank", "2", "touch", "ran"}, "--node-rank"},
      {{"--node-rank", "-1", "touch", "ran"}, "--node-rank"},
      {{"--master-port", "70000", "touch", "ran"}, "--master-port"},
      {{"--standalone", "--nnodes", "2", "touch", "ran"}, "--standalone"},
      {{"--nproc-per-node", "2"}, "COMMAND"},
      {{"--nproc-per-node"}, "--nproc-per-node"},
  };
  for (const auto& c : cases) {
    TempDir d("qlora_launch");
    Launcher l(d.path, c.args);
    CAPTURE(c.names);
    CHECK(l.wait_for(std::chrono::seconds(20)) == 2);
    const std::string err = l.err();
    CHECK_THAT(err, ContainsSubstring("launch: ") && ContainsSubstring(c.names));
    CHECK(std::count(err.begin(), err.end(), '\n') == 1);  // one line
    CHECK_FALSE(fs::exists(d / "ran"));
  }
}

TEST_CASE("launch: all workers exiting 0 gives 0, after the slowest one", "[launch]") {
  TempDir d("qlora_launch");
  const std::string script =
      "if [ \"$RANK\" = 2 ]; then sleep 1; echo done > slow; fi; echo \"hello $RANK\"";
  Launcher l(d.path, with_sh({"--nproc-per-node", "4"}, script));
  CHECK(l.wait_for(std::chrono::seconds(30)) == 0);
  CHECK(read_file(d / "slow") == "done\n");
  const std::string out = l.out();
  for (int r = 0; r < 4; ++r) CHECK_THAT(out, ContainsSubstring("hello " + std::to_string(r)));
  CHECK(l.err().empty());
}

TEST_CASE("launch: --rank-prefix prefixes each output line with its rank", "[launch]") {
  TempDir d("qlora_launch");
  Launcher l(d.path, with_sh({"--nproc-per-node", "2", "--rank-prefix"},
                             "echo \"hello $RANK\"; echo \"oops $RANK\" >&2"));
  CHECK(l.wait_for(std::chrono::seconds(30)) == 0);
  // The prefixing runs in separate processes that may flush just after the launcher exits.
  const auto end = Clock::now() + std::chrono::seconds(10);
  while (Clock::now() < end && (l.out().find("[rank 1] hello 1") == std::string::npos ||
                                l.out().find("[rank 0] hello 0") == std::string::npos ||
                                l.err().find("[rank 0] oops 0") == std::string::npos ||
                                l.err().find("[rank 1] oops 1") == std::string::npos))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK_THAT(l.out(), ContainsSubstring("[rank 0] hello 0") && ContainsSubstring("[rank 1] hello 1"));
  CHECK_THAT(l.err(), ContainsSubstring("[rank 0] oops 0") && ContainsSubstring("[rank 1] oops 1"));
}

TEST_CASE("launch: the qlora binary runs under the launcher", "[launch]") {
  TempDir d("qlora_launch");
  Launcher l(d.path, {"--nproc-per-node", "2", "--", QLORA_BINARY, "--version"});
  CHECK(l.wait_for(std::chrono::seconds(60)) == 0);
  INFO(l.out() << l.err());
  // Two workers, two version banners: the first line of `qlora --version` appears twice.
  const std::string out = l.out();
  const std::string first = out.substr(0, out.find('\n'));
  REQUIRE_FALSE(first.empty());
  CHECK(out.find(first, first.size()) != std::string::npos);
}
