// Collectives for multi-GPU training (issue 8). One interface, three engines:
//   - c10d ProcessGroupNCCL over a c10d TCPStore rendezvous (CUDA; the real engine, multi-node alike),
//   - a c10d TCPStore-only engine for CPU ranks in separate processes (small models, CI: the
//     Gloo headers are not shipped with libtorch, so Gloo cannot be used from C++),
//   - an in-process, multi-threaded engine (one thread per rank) for tests of the sharding logic.
// World size 1 needs no engine at all: make_single_rank_collective() does every op locally.
// Every rank must issue the same collectives in the same order with matching shapes and dtypes.
#pragma once
#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace qlora {

enum class ReduceOp { sum, max };

// A started collective. wait() blocks until its outputs may be read by work queued after it on the
// caller's current stream (NCCL: the current CUDA stream is made to wait for NCCL's stream; the
// CPU engines are synchronous and wait() returns at once). Waiting twice is harmless; destroying an
// unwaited handle waits.
class CollectiveWork {
 public:
  CollectiveWork() = default;
  explicit CollectiveWork(std::function<void()> wait_fn) : wait_fn_(std::move(wait_fn)) {}
  CollectiveWork(CollectiveWork&& o) noexcept : wait_fn_(std::move(o.wait_fn_)) { o.wait_fn_ = nullptr; }
  CollectiveWork& operator=(CollectiveWork&& o) noexcept {
    if (this != &o) { wait(); wait_fn_ = std::move(o.wait_fn_); o.wait_fn_ = nullptr; }
    return *this;
  }
  CollectiveWork(const CollectiveWork&) = delete;
  CollectiveWork& operator=(const CollectiveWork&) = delete;
  ~CollectiveWork() { if (wait_fn_) { try { wait(); } catch (...) {} } }
  void wait() {
    if (!wait_fn_) return;
    auto f = std::move(wait_fn_);
    wait_fn_ = nullptr;
    f();
  }
  bool pending() const { return static_cast<bool>(wait_fn_); }

 private:
  std::function<void()> wait_fn_;
};

class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string engine() const = 0;  // "single", "in-process", "tcpstore", "nccl"

  // For each i: outs[i] (contiguous, numel = world * ins[i].numel(), same dtype and device) becomes
  // the concatenation over ranks, in rank order, of every rank's ins[i]. One grouped operation
  // (NCCL: a single group launch); the outputs are valid after wait(). Inputs must stay alive and
  // unmodified until then.
  virtual CollectiveWork all_gather(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) = 0;

  // For each i: outs[i] (contiguous, numel = ins[i].numel() / world) becomes the sum over ranks of
  // chunk `rank` (in rank order) of every rank's ins[i]. Floating dtypes only. Valid after wait().
  virtual CollectiveWork reduce_scatter(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) = 0;

  // In place on every rank: the sum (or max) over ranks, elementwise. Blocking.
  virtual void all_reduce(at::Tensor& t, ReduceOp op = ReduceOp::sum) = 0;

  // In place: every rank's `t` becomes root's. Blocking.
  virtual void broadcast(at::Tensor& t, int root) = 0;

  // Returns when every rank has called it.
  virtual void barrier() = 0;

  // Called on a rank that failed (exception) so the others do not wait forever: the in-process
  // engine makes every pending and later op of every rank throw; the multi-process engines do
  // nothing (the launcher stops the other processes).
  virtual void abort(const std::string& reason) { (void)reason; }
};

// World size 1: all_gather/reduce_scatter copy, all_reduce/broadcast/barrier do nothing.
std::shared_ptr<Collective> make_single_rank_collective();

// `world` collectives sharing one in-process group; give element r to the thread that plays rank r.
// Reductions add the ranks' values in rank order (deterministic). `timeout`: an op waiting longer
// for the other ranks throws (a test that deadlocks fails instead of hanging).
std::vector<std::shared_ptr<Collective>> make_in_process_collectives(
    int world, std::chrono::milliseconds timeout = std::chrono::minutes(5));

// The torchrun environment: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
struct DistEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
};
// nullopt when WORLD_SIZE is unset (a plain single-process run). A malformed or inconsistent
// variable (non-integer, RANK >= WORLD_SIZE, LOCAL_RANK >= LOCAL_WORLD_SIZE, port outside 1..65535,
// missing MASTER_ADDR/MASTER_PORT when WORLD_SIZE > 1) is a UserError naming it.
std::optional<DistEnv> read_dist_env();

// Rendezvous through a c10d TCPStore at MASTER_ADDR:MASTER_PORT (rank 0 serves it) and a process
// group for `device`: ProcessGroupNCCL for a CUDA device (the caller has already made it the
// current device), the TCPStore engine for the CPU. NCCL on a build without CUDA, or a timeout
// reaching the store, is a UserError naming MASTER_ADDR:MASTER_PORT.
std::shared_ptr<Collective> make_process_group_collective(const DistEnv& env, const at::Device& device,
                                                          std::chrono::milliseconds timeout = std::chrono::minutes(10));

}  // namespace qlora
