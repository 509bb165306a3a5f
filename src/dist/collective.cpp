// Collectives (include/qlora/dist.h): the op checks and rank-order arithmetic shared by the CPU
// engines, the single-rank and in-process (one thread per rank) engines, the torchrun environment,
// and make_process_group_collective, which rendezvouses through a c10d TCPStore and picks the
// NCCL engine (collective_nccl.cpp) or the TCPStore engine (collective_store.cpp).
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <charconv>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "dist/collective_internal.h"
#include "qlora/dist.h"
#include "qlora/error.h"

namespace qlora {
namespace dist_detail {

const char* op_name(OpKind kind) {
  switch (kind) {
    case OpKind::all_gather: return "all_gather";
    case OpKind::reduce_scatter: return "reduce_scatter";
    case OpKind::all_reduce_sum: return "all_reduce(sum)";
    case OpKind::all_reduce_max: return "all_reduce(max)";
    case OpKind::broadcast: return "broadcast";
    case OpKind::barrier: return "barrier";
  }
  return "?";
}

OpDesc describe_op(OpKind kind, int root, const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) {
  auto desc = [](const at::Tensor& t) {
    return TensorDesc{static_cast<int8_t>(t.scalar_type()), t.is_contiguous(), t.numel()};
  };
  OpDesc d;
  d.kind = kind;
  d.root = root;
  for (const auto& t : outs) d.outs.push_back(desc(t));
  for (const auto& t : ins) d.ins.push_back(desc(t));
  return d;
}

namespace {

std::string dtype_name(int8_t dtype) { return c10::toString(static_cast<at::ScalarType>(dtype)); }

// The per-rank rules of all_gather / reduce_scatter: outs[i] against the same rank's ins[i].
std::string check_gather_scatter(const OpDesc& d, int rank, int world) {
  const bool gather = d.kind == OpKind::all_gather;
  const std::string where = std::string(op_name(d.kind)) + " on rank " + std::to_string(rank);
  if (d.outs.size() != d.ins.size())
    return where + ": " + std::to_string(d.outs.size()) + " outputs for " + std::to_string(d.ins.size()) + " inputs";
  for (size_t i = 0; i < d.ins.size(); ++i) {
    const TensorDesc& in = d.ins[i];
    const TensorDesc& out = d.outs[i];
    const std::string ti = where + ", tensor " + std::to_string(i);
    if (out.dtype != in.dtype)
      return ti + ": output dtype " + dtype_name(out.dtype) + " differs from input dtype " + dtype_name(in.dtype);
    if (!out.contiguous) return ti + ": the output must be contiguous";
    if (gather && out.numel != in.numel * world)
      return ti + ": output has " + std::to_string(out.numel) + " elements, expected world (" + std::to_string(world) +
             ") x input (" + std::to_string(in.numel) + ")";
    if (!gather) {
      if (!at::isFloatingType(static_cast<at::ScalarType>(in.dtype)))
        return ti + ": reduce_scatter needs a floating dtype, found " + dtype_name(in.dtype);
      if (in.numel % world != 0 || out.numel != in.numel / world)
        return ti + ": input has " + std::to_string(in.numel) + " elements, expected world (" + std::to_string(world) +
               ") x output (" + std::to_string(out.numel) + ")";
    }
  }
  return "";
}

}  // namespace

std::string check_op(const std::vector<OpDesc>& per_rank) {
  const int world = static_cast<int>(per_rank.size());
  const OpDesc& a = per_rank[0];
  const std::string name = op_name(a.kind);
  for (int r = 1; r < world; ++r) {
    const OpDesc& b = per_rank[r];
    if (b.kind != a.kind)
      return std::string("collective mismatch: rank 0 called ") + name + " while rank " + std::to_string(r) +
             " called " + op_name(b.kind);
    if (b.root != a.root)
      return name + ": rank 0 uses root " + std::to_string(a.root) + ", rank " + std::to_string(r) + " root " +
             std::to_string(b.root);
    if (b.ins.size() != a.ins.size())
      return name + ": rank 0 passed " + std::to_string(a.ins.size()) + " tensors, rank " + std::to_string(r) +
             " passed " + std::to_string(b.ins.size());
    for (size_t i = 0; i < a.ins.size(); ++i) {
      const std::string ti = name + ", tensor " + std::to_string(i) + ": ";
      if (b.ins[i].dtype != a.ins[i].dtype)
        return ti + "dtype " + dtype_name(a.ins[i].dtype) + " on rank 0 but " + dtype_name(b.ins[i].dtype) +
               " on rank " + std::to_string(r);
      if (b.ins[i].numel != a.ins[i].numel)
        return ti + std::to_string(a.ins[i].numel) + " elements on rank 0 but " + std::to_string(b.ins[i].numel) +
               " on rank " + std::to_string(r);
    }
  }
  if (a.kind == OpKind::broadcast && (a.root < 0 || a.root >= world))
    return "broadcast: root " + std::to_string(a.root) + " is not a rank of a world of " + std::to_string(world);
  if ((a.kind == OpKind::broadcast || a.kind == OpKind::all_reduce_sum || a.kind == OpKind::all_reduce_max) &&
      a.ins.size() != 1)
    return name + ": expected one tensor";
  if (a.kind == OpKind::all_gather || a.kind == OpKind::reduce_scatter) {
    for (int r = 0; r < world; ++r) {
      std::string err = check_gather_scatter(per_rank[r], r, world);
      if (!err.empty()) return err;
    }
  }
  return "";
}

void gather_into(const at::Tensor& out, const std::vector<at::Tensor>& ins_by_rank) {
  at::Tensor flat = out.view({-1});
  const int64_t n = ins_by_rank[0].numel();
  for (size_t q = 0; q < ins_by_rank.size(); ++q)
    flat.narrow(0, static_cast<int64_t>(q) * n, n).copy_(ins_by_rank[q].reshape({-1}));
}

at::Tensor reduce_chunk(const std::vector<at::Tensor>& ins_by_rank, int64_t chunk, int64_t chunk_numel, ReduceOp op) {
  auto part = [&](size_t q) { return ins_by_rank[q].reshape({-1}).narrow(0, chunk * chunk_numel, chunk_numel); };
  at::Tensor acc = part(0).clone();
  for (size_t q = 1; q < ins_by_rank.size(); ++q) {
    at::Tensor p = part(q).to(acc.device());
    if (op == ReduceOp::sum)
      acc.add_(p);  // one rounding per addition, in the dtype, rank 0 + 1 + 2 ...: deterministic
    else
      acc = at::maximum(acc, p);
  }
  return acc;
}

}  // namespace dist_detail

using namespace dist_detail;

namespace {

// ---------------------------------------------------------------------------------------------
// World size 1: the ops are copies, checked by the same rules as the multi-rank engines.

class SingleRankCollective final : public Collective {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  std::string engine() const override { return "single"; }

  CollectiveWork all_gather(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) override {
    check(describe_op(OpKind::all_gather, -1, outs, ins));
    for (size_t i = 0; i < ins.size(); ++i) gather_into(outs[i], {ins[i]});
    return {};
  }
  CollectiveWork reduce_scatter(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) override {
    check(describe_op(OpKind::reduce_scatter, -1, outs, ins));
    for (size_t i = 0; i < ins.size(); ++i) gather_into(outs[i], {ins[i]});
    return {};
  }
  void all_reduce(at::Tensor& t, ReduceOp op) override {}
  void broadcast(at::Tensor& t, int root) override { check(describe_op(OpKind::broadcast, root, {}, {t})); }
  void barrier() override {}

 private:
  static void check(const OpDesc& d) {
    std::string err = check_op({d});
    if (!err.empty()) throw std::runtime_error(err);
  }
};

// ---------------------------------------------------------------------------------------------
// In-process engine: `world` threads share one group. Each op is two rendezvous: after the first
// every rank has posted its tensors, so each computes its own result from all of them; after the
// second every rank has finished reading, so each may return (and reuse its slot, or modify its
// inputs). A generation counter tells a completed rendezvous from the next one.

struct InProcessGroup {
  InProcessGroup(int world, std::chrono::milliseconds timeout)
      : world(world), timeout(timeout), arrived(world, 0), slots(world) {}

  const int world;
  const std::chrono::milliseconds timeout;

  std::mutex mu;
  std::condition_variable cv;
  std::vector<char> arrived;  // who has reached the current rendezvous
  int n_arrived = 0;
  uint64_t generation = 0;
  bool aborted = false;
  std::string abort_reason;

  // Written by its rank before the first rendezvous, read by all between the two. Tensor handles
  // (not pointers to the caller's vectors) so that a rank unwinding after an abort frees nothing
  // that another rank is still reading.
  struct Slot {
    OpDesc desc;
    std::vector<at::Tensor> outs, ins;
  };
  std::vector<Slot> slots;

  void abort(const std::string& reason) {
    std::lock_guard<std::mutex> lk(mu);
    if (!aborted) {
      aborted = true;
      abort_reason = reason;
    }
    cv.notify_all();
  }

  void rendezvous(int rank, const char* op) {
    std::unique_lock<std::mutex> lk(mu);
    if (aborted) throw std::runtime_error("collective aborted: " + abort_reason);
    const uint64_t gen = generation;
    arrived[rank] = 1;
    if (++n_arrived == world) {
      n_arrived = 0;
      std::fill(arrived.begin(), arrived.end(), 0);
      ++generation;
      cv.notify_all();
      return;
    }
    cv.wait_for(lk, timeout, [&] { return generation != gen || aborted; });
    if (generation != gen) return;
    if (aborted) throw std::runtime_error("collective aborted: " + abort_reason);
    std::string missing;
    for (int r = 0; r < world; ++r)
      if (!arrived[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    const std::string msg = std::string(op) + " timed out on rank " + std::to_string(rank) + " after " +
                            std::to_string(timeout.count()) + " ms waiting for rank(s) " + missing;
    // The group cannot recover from a rank that never came: make every other rank fail too.
    aborted = true;
    abort_reason = msg;
    cv.notify_all();
    throw std::runtime_error(msg);
  }
};

class InProcessCollective final : public Collective {
 public:
  InProcessCollective(std::shared_ptr<InProcessGroup> group, int rank) : g_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int world_size() const override { return g_->world; }
  std::string engine() const override { return "in-process"; }

  CollectiveWork all_gather(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) override {
    run(OpKind::all_gather, -1, outs, ins, [&] {
      for (size_t i = 0; i < ins.size(); ++i) gather_into(outs[i], inputs_of_all(i));
    });
    return {};
  }

  CollectiveWork reduce_scatter(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) override {
    std::vector<at::Tensor> sums(ins.size());
    run(OpKind::reduce_scatter, -1, outs, ins, [&] {
      for (size_t i = 0; i < ins.size(); ++i)
        sums[i] = reduce_chunk(inputs_of_all(i), rank_, outs[i].numel(), ReduceOp::sum);
    });
    // Written after the second rendezvous: an output may alias any rank's input.
    for (size_t i = 0; i < ins.size(); ++i) outs[i].copy_(sums[i].view(outs[i].sizes()));
    return {};
  }

  void all_reduce(at::Tensor& t, ReduceOp op) override {
    at::Tensor result;
    run(op == ReduceOp::sum ? OpKind::all_reduce_sum : OpKind::all_reduce_max, -1, {}, {t},
        [&] { result = reduce_chunk(inputs_of_all(0), 0, t.numel(), op); });
    t.copy_(result.view(t.sizes()));  // in place, so only once no rank reads `t` any more
  }

  void broadcast(at::Tensor& t, int root) override {
    run(OpKind::broadcast, root, {}, {t}, [&] {
      if (rank_ != root) t.copy_(g_->slots[root].ins[0].view(t.sizes()));
    });
  }

  void barrier() override { run(OpKind::barrier, -1, {}, {}, [] {}); }

  void abort(const std::string& reason) override { g_->abort(reason); }

 private:
  std::vector<at::Tensor> inputs_of_all(size_t i) const {
    std::vector<at::Tensor> v;
    for (const auto& s : g_->slots) v.push_back(s.ins[i]);
    return v;
  }

  template <class Compute>
  void run(OpKind kind, int root, const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins,
           Compute compute) {
    const char* name = op_name(kind);
    InProcessGroup::Slot& slot = g_->slots[rank_];
    slot = {describe_op(kind, root, outs, ins), outs, ins};
    g_->rendezvous(rank_, name);

    std::vector<OpDesc> descs;
    for (const auto& s : g_->slots) descs.push_back(s.desc);
    const std::string err = check_op(descs);  // the same verdict on every rank
    if (err.empty()) {
      try {
        compute();
      } catch (const std::exception& e) {
        g_->abort("rank " + std::to_string(rank_) + " failed in " + name + ": " + e.what());
        throw;
      }
    }
    g_->rendezvous(rank_, name);
    slot = {};
    if (!err.empty()) throw std::runtime_error(err);
  }

  std::shared_ptr<InProcessGroup> g_;
  int rank_;
};

// ---------------------------------------------------------------------------------------------
// The torchrun environment.

std::optional<std::string> get_env(const char* name) {
  const char* v = std::getenv(name);
  if (!v) return std::nullopt;
  return std::string(v);
}

// `value` as an integer in lo..hi, else a UserError naming the variable and `expected`.
int parse_env_int(const char* name, const std::string& value, int lo, int hi, const std::string& expected) {
  int x = 0;
  const char* end = value.data() + value.size();
  auto [p, ec] = std::from_chars(value.data(), end, x);
  if (value.empty() || ec != std::errc() || p != end || x < lo || x > hi)
    throw UserError(std::string(name) + "='" + value + "': expected " + expected);
  return x;
}

}  // namespace

std::shared_ptr<Collective> make_single_rank_collective() { return std::make_shared<SingleRankCollective>(); }

std::vector<std::shared_ptr<Collective>> make_in_process_collectives(int world, std::chrono::milliseconds timeout) {
  if (world < 1) throw std::invalid_argument("make_in_process_collectives: world must be >= 1, got " + std::to_string(world));
  auto group = std::make_shared<InProcessGroup>(world, timeout);
  std::vector<std::shared_ptr<Collective>> out;
  for (int r = 0; r < world; ++r) out.push_back(std::make_shared<InProcessCollective>(group, r));
  return out;
}

std::optional<DistEnv> read_dist_env() {
  const auto world = get_env("WORLD_SIZE");
  if (!world) return std::nullopt;
  DistEnv env;
  constexpr int kMax = 1 << 20;
  env.world_size = parse_env_int("WORLD_SIZE", *world, 1, kMax, "a positive integer");
  const std::string ranks = "an integer in 0.." + std::to_string(env.world_size - 1) + " (WORLD_SIZE=" + *world + ")";
  const auto rank = get_env("RANK");
  if (!rank) throw UserError("RANK is not set but WORLD_SIZE=" + *world + " is: expected " + ranks);
  env.rank = parse_env_int("RANK", *rank, 0, env.world_size - 1, ranks);

  // Without LOCAL_WORLD_SIZE: one node. Without LOCAL_RANK: nodes of LOCAL_WORLD_SIZE ranks each,
  // numbered node by node (torchrun's layout).
  const auto local_world = get_env("LOCAL_WORLD_SIZE");
  env.local_world_size = local_world ? parse_env_int("LOCAL_WORLD_SIZE", *local_world, 1, env.world_size,
                                                     "an integer in 1..WORLD_SIZE (" + *world + ")")
                                     : env.world_size;
  const auto local_rank = get_env("LOCAL_RANK");
  env.local_rank = local_rank ? parse_env_int("LOCAL_RANK", *local_rank, 0, env.local_world_size - 1,
                                              "an integer in 0.." + std::to_string(env.local_world_size - 1) +
                                                  " (LOCAL_WORLD_SIZE=" + std::to_string(env.local_world_size) + ")")
                              : (local_world ? env.rank % env.local_world_size : env.rank);

  const auto addr = get_env("MASTER_ADDR");
  const auto port = get_env("MASTER_PORT");
  if (env.world_size > 1 && !addr)
    throw UserError("MASTER_ADDR is not set but WORLD_SIZE=" + *world + ": expected the address of rank 0's host");
  if (env.world_size > 1 && !port)
    throw UserError("MASTER_PORT is not set but WORLD_SIZE=" + *world + ": expected a TCP port in 1..65535");
  if (addr) {
    if (addr->empty()) throw UserError("MASTER_ADDR is empty: expected the address of rank 0's host");
    env.master_addr = *addr;
  }
  if (port) env.master_port = parse_env_int("MASTER_PORT", *port, 1, 65535, "a TCP port in 1..65535");
  return env;
}

std::shared_ptr<Collective> make_process_group_collective(const DistEnv& env, const at::Device& device,
                                                          std::chrono::milliseconds timeout) {
  if (env.world_size < 1 || env.rank < 0 || env.rank >= env.world_size)
    throw UserError("rank " + std::to_string(env.rank) + " is not a rank of a world of " +
                    std::to_string(env.world_size));
#ifndef QLORA_WITH_CUDA
  if (device.is_cuda())
    throw UserError("NCCL needs a CUDA build: this qlora was built without CUDA, so it cannot train on " + device.str());
#endif
  if (!device.is_cuda() && !device.is_cpu())
    throw UserError("distributed training runs on CUDA (NCCL) or the CPU, not on " + device.str());

  const std::string where = "MASTER_ADDR:MASTER_PORT=" + env.master_addr + ":" + std::to_string(env.master_port);
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<uint16_t>(env.master_port);
  // Under torchrun the elastic agent already serves a TCPStore at MASTER_ADDR:MASTER_PORT and says
  // so with TORCHELASTIC_USE_AGENT_STORE=True: then every rank connects as a client (as torch's
  // env:// rendezvous does). scripts/launch runs no store and sets it to False.
  const char* agent_store = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
  const bool use_agent_store = agent_store != nullptr && std::string(agent_store) == "True";
  opts.isServer = env.rank == 0 && !use_agent_store;
  opts.numWorkers = env.world_size;
  opts.waitWorkers = true;
  opts.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, opts);
  } catch (const c10::Error& e) {
    std::string why = e.what_without_backtrace();
    why = why.substr(0, why.find('\n'));
    const std::string expected =
        env.rank == 0 ? "rank 0 serves the rendezvous store there and waits for all " + std::to_string(env.world_size) +
                            " ranks to connect"
                      : "rank " + std::to_string(env.rank) + " connects to rank 0's rendezvous store there";
    throw UserError("rendezvous at " + where + " failed within " + std::to_string(timeout.count() / 1000) +
                    " s (" + expected + "): " + why);
  }
  // Our keys live under their own prefix, apart from the agent's, one namespace per restart attempt.
  const char* restart = std::getenv("TORCHELASTIC_RESTART_COUNT");
  store = c10::make_intrusive<c10d::PrefixStore>(
      std::string("qlora/attempt_") + (restart != nullptr && *restart != '\0' ? restart : "0"), store);
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) return make_nccl_collective(store, env.rank, env.world_size, device, timeout);
#endif
  return make_tcpstore_collective(store, env.rank, env.world_size);
}

}  // namespace qlora
