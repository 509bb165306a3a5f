// The NCCL engine: collectives through c10d's ProcessGroupNCCL over the rendezvous TCPStore, one
// process per GPU. Ops are queued on NCCL's internal stream; CollectiveWork::wait() makes the
// caller's current stream wait for them (c10d::Work::wait), so the host does not block.
#ifdef QLORA_WITH_CUDA

// torch's CMake config defines it for its users; set it here as well so that this file does not
// silently compile to nothing when that changes.
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL
#endif
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <stdexcept>

#include "dist/collective_internal.h"

namespace qlora::dist_detail {
namespace {

class NcclCollective final : public Collective {
 public:
  NcclCollective(c10::intrusive_ptr<c10d::Store> store, int rank, int world, const at::Device& device,
                 std::chrono::milliseconds timeout)
      : rank_(rank), world_(world), device_(device) {
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    pg_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(std::move(store), rank, world, opts);
    // Bound to our device and connected now: a rank that cannot join fails here, at startup, not
    // in the middle of the first step.
    pg_->setBoundDeviceId(device_);
    pg_->eagerConnectSingleDevice(device_);
  }

  ~NcclCollective() override {
    // Without shutdown(), ProcessGroupNCCL's destructor warns and may leave NCCL's watchdog running.
    try {
      pg_->shutdown();
    } catch (...) {
    }
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  std::string engine() const override { return "nccl"; }

  CollectiveWork all_gather(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) override {
    check(OpKind::all_gather, -1, outs, ins);
    if (ins.empty()) return {};
    std::vector<at::Tensor> out_v(outs.begin(), outs.end()), in_v = contiguous(ins);
    c10::intrusive_ptr<c10d::Work> work;
    if (in_v.size() == 1)
      work = pg_->_allgather_base(out_v[0], in_v[0]);
    else
      work = pg_->allgather_into_tensor_coalesced(out_v, in_v);  // one NCCL group launch
    return wrap(std::move(work), std::move(in_v));
  }

  CollectiveWork reduce_scatter(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) override {
    check(OpKind::reduce_scatter, -1, outs, ins);
    if (ins.empty()) return {};
    std::vector<at::Tensor> out_v(outs.begin(), outs.end()), in_v = contiguous(ins);
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    c10::intrusive_ptr<c10d::Work> work;
    if (in_v.size() == 1)
      work = pg_->_reduce_scatter_base(out_v[0], in_v[0], opts);
    else
      work = pg_->reduce_scatter_tensor_coalesced(out_v, in_v, opts);
    return wrap(std::move(work), std::move(in_v));
  }

  void all_reduce(at::Tensor& t, ReduceOp op) override {
    check(op == ReduceOp::sum ? OpKind::all_reduce_sum : OpKind::all_reduce_max, -1, {}, {t});
    c10d::AllreduceOptions opts;
    opts.reduceOp = op == ReduceOp::sum ? c10d::ReduceOp::SUM : c10d::ReduceOp::MAX;
    in_place(t, [&](std::vector<at::Tensor>& v) { return pg_->allreduce(v, opts); });
  }

  void broadcast(at::Tensor& t, int root) override {
    check(OpKind::broadcast, root, {}, {t});
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    in_place(t, [&](std::vector<at::Tensor>& v) { return pg_->broadcast(v, opts); });
  }

  void barrier() override {
    // A one-element all-reduce on our own device (ProcessGroupNCCL::barrier would guess the device
    // from the rank when none is bound), then a host wait so that the barrier holds for the host.
    std::vector<at::Tensor> v = {at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device_))};
    pg_->allreduce(v)->wait();
    c10::cuda::getCurrentCUDAStream(device_.index()).synchronize();
  }

 private:
  // The checks one rank can make alone (NCCL does not compare ranks' shapes before it runs).
  void check(OpKind kind, int root, const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins) const {
    std::string err = check_op(std::vector<OpDesc>(world_, describe_op(kind, root, outs, ins)));
    for (const auto* list : {&outs, &ins})
      for (const auto& t : *list)
        if (err.empty() && t.device() != device_)
          err = std::string(op_name(kind)) + ": a tensor is on " + t.device().str() + ", expected " + device_.str();
    if (!err.empty()) throw std::runtime_error(err);
  }

  static std::vector<at::Tensor> contiguous(const std::vector<at::Tensor>& ts) {
    std::vector<at::Tensor> v;
    for (const auto& t : ts) v.push_back(t.contiguous());
    return v;
  }

  // The inputs stay referenced until wait(): the caller's may be temporaries made contiguous here.
  static CollectiveWork wrap(c10::intrusive_ptr<c10d::Work> work, std::vector<at::Tensor> inputs) {
    return CollectiveWork([work = std::move(work), inputs = std::move(inputs)] { work->wait(); });
  }

  // Runs an in-place op on `t`, through a contiguous copy when `t` is not contiguous.
  template <class Op>
  static void in_place(at::Tensor& t, Op op) {
    std::vector<at::Tensor> v = {t.is_contiguous() ? t : t.contiguous()};
    op(v)->wait();
    if (!v[0].is_same(t)) t.copy_(v[0]);
  }

  c10::intrusive_ptr<c10d::ProcessGroupNCCL> pg_;
  int rank_, world_;
  at::Device device_;
};

}  // namespace

std::shared_ptr<Collective> make_nccl_collective(c10::intrusive_ptr<c10d::Store> store, int rank, int world,
                                                 const at::Device& device, std::chrono::milliseconds timeout) {
  const at::Device dev = device.has_index() ? device : at::Device(at::kCUDA, c10::cuda::current_device());
  return std::make_shared<NcclCollective>(std::move(store), rank, world, dev, timeout);
}

}  // namespace qlora::dist_detail

#endif  // QLORA_WITH_CUDA
