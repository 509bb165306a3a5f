// Process faults (issue 12): SIGKILL at random moments of checkpoint saves (a child process saving
// in a loop; the real qlora binary saving every step) never costs a completed checkpoint, and
// resuming continues from the newest one; SIGTERM and SIGINT to `qlora train` while it saves every
// step end in a checkpoint, exit status 0 and a resume that continues from it; a rank of a
// launched run killed with SIGKILL stops the whole run within a bounded time, also when the
// surviving rank does not stop on SIGTERM (it waits in a collective for the dead one).
// The random moments are seeded, so a failure names a reproducible schedule.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qlora/checkpoint.h"
#include "qlora/log.h"
#include "qlora/metrics.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "process_util.h"
#include "test_util.h"
#include "trainer_fixture.h"

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using qlora::test::read_file;
using qlora::test::process_alive;
using qlora::test::Run;
using qlora::test::TempDir;
using qlora::test::OneThreadChildren;
using qlora::test::write_file;
using Clock = std::chrono::steady_clock;

namespace {

// Reads one step number the saving child reported; false on timeout or end of the pipe.
bool read_step(int fd, int64_t& step, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, timeout_ms) <= 0) return false;
  return ::read(fd, &step, sizeof step) == static_cast<ssize_t>(sizeof step);
}

// Names in `dir` starting with ".checkpoint-": what killed saves leave until the next save.
int hidden_entries(const fs::path& dir) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir)) n += e.path().filename().string().rfind(".checkpoint-", 0) == 0;
  return n;
}

// The highest step of the checkpoint-<step> directories in `dir` (complete or not); 0 when none.
int64_t newest_step(const fs::path& dir) {
  int64_t best = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("checkpoint-", 0) == 0) best = std::max<int64_t>(best, std::atoll(name.c_str() + 11));
  }
  return best;
}

int checkpoint_dirs(const fs::path& dir) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir)) n += e.path().filename().string().rfind("checkpoint-", 0) == 0;
  return n;
}

// A process started with fork/exec: `argv` with `env` added to ours, default signal handling,
// stdout and stderr into `log`. Everything the child needs is built before fork().
pid_t spawn(const std::vector<std::string>& args, const fs::path& log, const std::vector<std::string>& env = {}) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (char** e = environ; *e; ++e) envp.push_back(*e);
  for (const auto& kv : env) envp.push_back(const_cast<char*>(kv.c_str()));
  envp.push_back(nullptr);
  const std::string out = log.string();
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    for (int s : {SIGINT, SIGTERM, SIGQUIT, SIGHUP, SIGPIPE}) signal(s, SIG_DFL);
    const int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) _exit(126);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::close(fd);
    ::execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  return pid;
}

// Exit status of `pid` (128 + signal when killed); -1 when it did not end within `limit` (then it
// is killed, so that a failing test leaves nothing behind).
int wait_exit(pid_t pid, std::chrono::duration<double> limit) {
  const auto end = Clock::now() + limit;
  int st = 0;
  while (Clock::now() < end) {
    if (::waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, &st, 0);
  return -1;
}

// Polls until `ready()` holds; false after `limit`.
template <class Pred>
bool wait_until(Pred ready, std::chrono::duration<double> limit) {
  const auto end = Clock::now() + limit;
  while (!ready()) {
    if (Clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// Steps of metrics.jsonl's loss lines: 1, 2, ..., n exactly once each after a clean resume.
bool steps_are_one_to(const fs::path& metrics, int64_t n) {
  const qlora::LossCurve c = qlora::read_loss_curve(metrics);
  if (static_cast<int64_t>(c.train.size()) != n) return false;
  for (int64_t i = 0; i < n; ++i)
    if (c.train[static_cast<size_t>(i)].first != i + 1) return false;
  return true;
}

int64_t step_of(const fs::path& checkpoint_dir) { return qlora::load_checkpoint(checkpoint_dir).step; }

}  // namespace

TEST_CASE("checkpoint: SIGKILL at random moments of saves never loses a completed checkpoint", "[faults]") {
  TempDir d("qlora_faults_proc");
  const fs::path out = d / "out";
  // 4 MiB per save so that a save (write, fsync, CRC read-back, rename, prune) takes a while; a
  // per-step mark tells which step's tensors a checkpoint holds. All tensors exist before fork():
  // the child runs no ATen kernels (no thread pool after fork).
  const at::Tensor payload = at::randn({1 << 20}, at::make_generator<at::CPUGeneratorImpl>(11), at::kFloat);
  constexpr int64_t kMaxStep = 2000;
  std::vector<at::Tensor> marks;
  for (int64_t s = 0; s <= kMaxStep; ++s) marks.push_back(at::full({2}, s, at::kLong));
  std::mt19937 rng(20241206);
  int killed_mid_write = 0;
  int64_t next = 1;
  constexpr int kTrials = 12;
  for (int trial = 0; trial < kTrials; ++trial) {
    CAPTURE(trial);
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      // The resumed "run": saves next, next + 1, ... back to back, reporting each completed save.
      ::close(fds[0]);
      qlora::init_logging("error");
      try {
        for (int64_t s = next; s <= kMaxStep; ++s) {
          qlora::save_checkpoint(out, s, {{"payload", payload}, {"mark", marks[static_cast<size_t>(s)]}}, {{"step", s}},
                                 /*keep_last=*/2);
          if (::write(fds[1], &s, sizeof s) != static_cast<ssize_t>(sizeof s)) _exit(3);
        }
      } catch (...) {
        _exit(4);
      }
      _exit(0);
    }
    ::close(fds[1]);
    int64_t first = -1, second = -1;
    REQUIRE(read_step(fds[0], first, 30000));
    const auto t0 = Clock::now();
    REQUIRE(read_step(fds[0], second, 30000));
    // Saves run back to back: a delay uniform over one save's duration lands anywhere in the next.
    const auto period = Clock::now() - t0;
    std::uniform_real_distribution<double> frac(0.0, 1.0);
    std::this_thread::sleep_for(std::chrono::duration_cast<Clock::duration>(period * frac(rng)));
    REQUIRE(::kill(pid, SIGKILL) == 0);
    int st = 0;
    REQUIRE(::waitpid(pid, &st, 0) == pid);
    REQUIRE(WIFSIGNALED(st));  // still saving when killed, not ended on its own
    int64_t done = second, s = -1;
    while (read_step(fds[0], s, 0)) done = s;
    ::close(fds[0]);

    killed_mid_write += hidden_entries(out) > 0;
    const auto latest = qlora::find_latest_checkpoint(out);
    REQUIRE(latest.has_value());
    const qlora::Checkpoint c = qlora::load_checkpoint(*latest);
    CHECK(c.step >= done);      // every save that returned survived the kill
    CHECK(c.step <= done + 1);  // at most the save in progress completed too
    CHECK(c.tensor("mark")[0].item<int64_t>() == c.step);
    CHECK(c.state["step"] == c.step);
    CHECK(c.tensor("payload").equal(payload));
    next = c.step + 1;
  }
  // Most kills land while files are written (the temp directory exists): the cleanup was exercised.
  CHECK(killed_mid_write > 0);
  // The next save removes what killed saves left; with keep_last 2 exactly two checkpoints remain.
  qlora::save_checkpoint(out, next, {{"payload", payload}, {"mark", marks[static_cast<size_t>(next)]}}, {{"step", next}}, 2);
  CHECK(hidden_entries(out) == 0);
  CHECK(checkpoint_dirs(out) == 2);
  CHECK(qlora::find_latest_checkpoint(out) == out / qlora::checkpoint_dir_name(next));
}

TEST_CASE("qlora train: SIGKILL while saving every step; resume continues from the newest checkpoint", "[faults]") {
  OneThreadChildren one_thread;
  TempDir d("qlora_faults_proc");
  const std::string cfg = qlora::test::write_fixture_config(d.path, "save_steps: 1\nsave_total_limit: 2\n");
  const fs::path out = d.path / "out";
  std::mt19937 rng(1206);
  int64_t prev = 0;  // the step the last resumed run ended at
  for (int trial = 0; trial < 3; ++trial) {
    CAPTURE(trial);
    const pid_t pid = spawn({QLORA_BINARY, "train", cfg, "max_steps=100000", "resume_from_checkpoint=auto"},
                            d.path / "killed.log");
    // Once this run has written its first checkpoint, kill it at a random moment of the next steps.
    REQUIRE(wait_until([&] { return newest_step(out) > prev; }, std::chrono::seconds(60)));
    std::uniform_int_distribution<int> ms(0, 400);
    std::this_thread::sleep_for(std::chrono::milliseconds(ms(rng)));
    REQUIRE(::kill(pid, SIGKILL) == 0);
    REQUIRE(wait_exit(pid, std::chrono::seconds(30)) == 128 + SIGKILL);
    const auto latest = qlora::find_latest_checkpoint(out);
    REQUIRE(latest.has_value());
    const int64_t k = step_of(*latest);
    CHECK(k > prev);
    const Run r = qlora::test::run_qlora("train " + cfg + " resume_from_checkpoint=auto max_steps=" + std::to_string(k + 1));
    INFO(r.output);
    CHECK(r.status == 0);
    CHECK_THAT(r.output, ContainsSubstring("resumed from " + latest->string() + " at step " + std::to_string(k)));
    CHECK(qlora::find_latest_checkpoint(out) == out / qlora::checkpoint_dir_name(k + 1));
    CHECK(hidden_entries(out) == 0);
    CHECK(steps_are_one_to(out / "metrics.jsonl", k + 1));  // the killed run's later lines were dropped
    prev = k + 1;
  }
}

TEST_CASE("qlora train: SIGTERM or SIGINT while saving every step: a checkpoint, exit 0, resume continues", "[faults]") {
  OneThreadChildren one_thread;
  for (const int sig : {SIGTERM, SIGINT}) {
    CAPTURE(sig);
    TempDir d("qlora_faults_proc");
    const std::string cfg = qlora::test::write_fixture_config(d.path, "save_steps: 1\nsave_total_limit: 2\n");
    const fs::path out = d.path / "out";
    const fs::path log = d.path / "train.log";
    const pid_t pid = spawn({QLORA_BINARY, "train", cfg, "max_steps=100000"}, log);
    // The handlers are installed before the first step: wait for step 2's checkpoint, then signal.
    REQUIRE(wait_until([&] { return newest_step(out) >= 2; }, std::chrono::seconds(60)));
    REQUIRE(::kill(pid, sig) == 0);
    const int status = wait_exit(pid, std::chrono::seconds(60));
    const std::string text = read_file(log);
    INFO(text);
    CHECK(status == 0);
    CHECK_THAT(text, ContainsSubstring("signal " + std::to_string(sig) + ": stopped after step "));
    const auto latest = qlora::find_latest_checkpoint(out);
    REQUIRE(latest.has_value());
    const int64_t k = step_of(*latest);
    CHECK_THAT(text, ContainsSubstring("stopped after step " + std::to_string(k) + ";"));  // the last step is saved
    CHECK(hidden_entries(out) == 0);
    const Run r = qlora::test::run_qlora("train " + cfg + " resume_from_checkpoint=auto max_steps=" + std::to_string(k + 2));
    INFO(r.output);
    CHECK(r.status == 0);
    CHECK_THAT(r.output, ContainsSubstring("resumed from " + latest->string() + " at step " + std::to_string(k)));
    CHECK(steps_are_one_to(out / "metrics.jsonl", k + 2));
    CHECK(fs::exists(out / "adapter_model.safetensors"));
  }
}

TEST_CASE("launch: a qlora rank killed by SIGKILL stops the run within the grace period", "[faults][launch]") {
  OneThreadChildren one_thread;
  TempDir d("qlora_faults_proc");
  qlora::test::write_trainer_fixture(d.path);
  const fs::path out = d.path / "out";
  write_file(d.path / "cfg.yaml", qlora::test::trainer_yaml(d.path, ""));
  // Each rank records its pid, then becomes qlora (exec keeps the pid).
  const std::string worker = "echo $$ > " + (d.path / "pid.").string() + "$RANK; exec " + QLORA_BINARY + " train " +
                             (d.path / "cfg.yaml").string() + " max_steps=100000";
  const pid_t launcher = spawn({std::string(QLORA_SOURCE_DIR) + "/scripts/launch", "--standalone", "--nproc-per-node", "2",
                                "--", "sh", "-c", worker},
                               d.path / "launch.log", {"QLORA_LAUNCH_GRACE_S=2"});
  // Training runs (rank 0 logs metrics after its first step), then rank 1 dies without a word.
  const bool training = wait_until([&] { return fs::exists(out / "metrics.jsonl") && fs::file_size(out / "metrics.jsonl") > 0; },
                                   std::chrono::seconds(90));
  INFO(read_file(d.path / "launch.log"));
  REQUIRE(training);
  const pid_t rank0 = static_cast<pid_t>(std::atol(read_file(d.path / "pid.0").c_str()));
  const pid_t rank1 = static_cast<pid_t>(std::atol(read_file(d.path / "pid.1").c_str()));
  REQUIRE(rank0 > 0);
  REQUIRE(rank1 > 0);
  const auto t0 = Clock::now();
  REQUIRE(::kill(rank1, SIGKILL) == 0);
  const int status = wait_exit(launcher, std::chrono::seconds(30));
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  const std::string log = read_file(d.path / "launch.log");
  INFO(log);
  CHECK(status == 128 + SIGKILL);  // the status of the rank that died first
  CHECK(secs < 2.0 + 5.0);         // the grace period, then SIGKILL, plus the launcher's polling
  CHECK_THAT(log, ContainsSubstring("launch: rank 1 exited with status 137; stopped the other workers"));
  // Rank 0 waits in a collective for the dead rank and does not get to its SIGTERM check: the
  // launcher escalates after the grace period, not before.
  if (log.find("sending SIGKILL") != std::string::npos) CHECK(secs >= 2.0);
  // Rank 0 is gone too (it may have stopped on SIGTERM, failed in its collective, or been killed).
  CHECK(wait_until([&] { return !process_alive(rank0); }, std::chrono::seconds(3)));
}
