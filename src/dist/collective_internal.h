// What the collective engines share (src/dist/collective*.cpp): the description of one op that
// every rank checks against every other rank's, the rank-order arithmetic that makes the CPU
// engines agree bit for bit, and the factories that make_process_group_collective dispatches to.
#pragma once
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qlora/dist.h"

namespace qlora::dist_detail {

enum class OpKind : uint8_t { all_gather, reduce_scatter, all_reduce_sum, all_reduce_max, broadcast, barrier };
const char* op_name(OpKind kind);

struct TensorDesc {
  int8_t dtype = 0;  // at::ScalarType
  bool contiguous = true;
  int64_t numel = 0;
};

// One rank's view of one op: what it called and with which tensors. all_reduce and broadcast put
// their one tensor in `ins`.
struct OpDesc {
  OpKind kind = OpKind::barrier;
  int root = -1;  // broadcast only
  std::vector<TensorDesc> outs, ins;
};

OpDesc describe_op(OpKind kind, int root, const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins);

// Every rank's description of the same op (index = rank): "" when they agree and each is valid,
// otherwise the error message. Deterministic, so every rank reaches the same verdict and all throw.
std::string check_op(const std::vector<OpDesc>& per_rank);

// out (contiguous) = every rank's in, flattened, concatenated in rank order.
void gather_into(const at::Tensor& out, const std::vector<at::Tensor>& ins_by_rank);

// Elementwise sum (or max) of chunk `chunk` (numel `chunk_numel`) of every rank's tensor, combined
// left to right in rank order in the tensors' dtype: a new 1-D tensor.
at::Tensor reduce_chunk(const std::vector<at::Tensor>& ins_by_rank, int64_t chunk, int64_t chunk_numel, ReduceOp op);

// Engines over an already connected store.
std::shared_ptr<Collective> make_tcpstore_collective(c10::intrusive_ptr<c10d::Store> store, int rank, int world);
#ifdef QLORA_WITH_CUDA
std::shared_ptr<Collective> make_nccl_collective(c10::intrusive_ptr<c10d::Store> store, int rank, int world,
                                                 const at::Device& device, std::chrono::milliseconds timeout);
#endif

}  // namespace qlora::dist_detail
