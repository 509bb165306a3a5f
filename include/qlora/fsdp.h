// FSDP2-style sharding of the decoder layers over a Collective (issue 8). Every rank owns a dim-0
// shard of each frozen layer tensor -- NF4 packed bytes, absmax codes and absmax2 (as opaque bytes,
// in whole double-quantization groups of 256 blocks), dense 16-bit weights and biases (whole rows)
// -- and a dim-0 shard of each LoRA master (fp32) with its AdamW state. The layer loop calls:
//   unshard_layer(i)   all-gather layer i's frozen shards into one flat byte buffer and its LoRA
//                      shards (cast to the compute dtype) into another, then point the model's
//                      and the LoraModel's tensors of layer i at views of them (no copy-out);
//   prefetch_layer(j)  start layer j's all-gather early (NCCL runs it on its own stream, so it
//                      overlaps the compute of the current layer);
//   reduce_scatter_layer_grads(i)  sum the unsharded LoRA gradients of layer i over ranks into the
//                      local shards' .grad() (fp32, or the compute dtype with pre/post scaling);
//   reshard_layer(i)   drop the gathered buffers (the model's tensors of layer i become undefined).
// Norm weights, the embedding and lm_head stay replicated (docs/DISTRIBUTED.md says why).
// World size 1 runs the same code with the single-rank collective (all-gathers are copies).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qlora/checkpoint.h"  // ShardPlacement
#include "qlora/dist.h"
#include "qlora/lora.h"
#include "qlora/model.h"

namespace qlora {

struct FsdpOptions {
  bool reshard_after_forward = true;   // false: layers stay gathered from the forward to the backward
  bool prefetch = true;                // all-gather the next layer (forward and backward order) early
  bool reduce_in_compute_dtype = false;  // false: reduce-scatter fp32 grads; true: in the compute
                                         // dtype, divided by sqrt(world) before and multiplied after (fp16)
};

// Rows of dim 0 each rank holds of a tensor with `rows` rows (padded: the last ranks may hold padding).
int64_t rows_per_rank(int64_t rows, int world);
// Where rank `rank`'s valid rows sit in the whole tensor.
ShardPlacement shard_placement(int64_t rows, int world, int rank);
// Rank `rank`'s dim-0 shard of `full`: [rows_per_rank(rows, world), ...], the rows past the end zero.
at::Tensor shard_rows(const at::Tensor& full, int world, int rank);

// One frozen tensor of a layer, sharded as bytes.
struct FrozenShard {
  at::Tensor* slot = nullptr;        // the model's tensor it restores (e.g. &layer.q_proj.nf4->packed)
  std::vector<int64_t> shape;
  at::ScalarType dtype = at::kByte;
  int64_t nbytes = 0;                // bytes of the whole tensor
  int64_t shard_bytes = 0;           // bytes each rank holds (a multiple of the shard unit)
  int64_t local_offset = 0;          // where this rank's shard sits in ShardedLayer::local
  int64_t gathered_offset = 0;       // where the world * shard_bytes region sits in the gathered buffer
};

// One LoRA master (A or B) of a layer.
struct LoraShard {
  at::Tensor* slot = nullptr;        // the LoraModel's tensor it fills (&layer.q_proj->A ...)
  size_t param = 0;                  // index into the trainer's local parameters
  int64_t rows = 0, cols = 0, rows_per_rank = 0;
  int64_t gathered_offset = 0;       // element offset of its world * rows_per_rank * cols region
};

struct ShardedLayer {
  at::Tensor local;                  // uint8: this rank's shards of every frozen tensor, concatenated
  std::vector<FrozenShard> frozen;
  std::vector<LoraShard> lora;
  int64_t gathered_bytes = 0;        // size of the frozen gather buffer
  int64_t gathered_lora_elems = 0;   // size of the LoRA gather buffer (compute dtype elements)

  // live state
  at::Tensor gathered, gathered_lora;  // defined while gathered or being gathered
  CollectiveWork gather_work;          // the pending all-gather (prefetch)
  bool installed = false;              // the views are in the model (unshard_layer ran)
  std::vector<at::Tensor> grad_shards; // pending reduce-scatter outputs, one per LoraShard
  CollectiveWork scatter_work;
};

struct Fsdp {
  std::shared_ptr<Collective> comm;
  FsdpOptions options;
  at::ScalarType compute_dtype = at::kBFloat16;
  std::vector<ShardedLayer> layers;
};

// Shards `model`'s decoder layers and `lora`'s masters in place: each frozen layer tensor is replaced
// by this rank's byte shard (the model's tensors become undefined until unshard_layer), each LoRA
// master by an undefined tensor, and `params` (the LoRA masters in named_lora_parameters order, as
// the trainer holds them) are replaced by this rank's fp32 shards [rows_per_rank, cols] (requires
// grad). Every rank must call it on identical models and adapters.
Fsdp shard_model(LlamaWeights& model, LoraModel& lora, std::vector<at::Tensor>& params,
                 std::shared_ptr<Collective> comm, const FsdpOptions& options);

void prefetch_layer(Fsdp& fsdp, size_t layer, const std::vector<at::Tensor>& params);
void unshard_layer(Fsdp& fsdp, size_t layer, const std::vector<at::Tensor>& params);
void reshard_layer(Fsdp& fsdp, size_t layer);
// Starts the reduce-scatter of layer `layer`'s LoRA gradients (the unsharded leaves' .grad()); its
// outputs are added into params[i].grad() when the layer's next reduce-scatter starts (the next
// micro-batch) or by finish_grads, which waits for every pending one (before the optimizer step).
void reduce_scatter_layer_grads(Fsdp& fsdp, size_t layer, const std::vector<at::Tensor>& params);
void finish_grads(Fsdp& fsdp, const std::vector<at::Tensor>& params);

// The whole adapter, on every rank (all-gather of the fp32 shards): a copy of `lora`'s structure
// whose masters are full fp32 tensors (no grad). For saving the PEFT adapter (rank 0 writes).
LoraModel gather_lora(Fsdp& fsdp, const LoraModel& lora, const std::vector<at::Tensor>& params);

// Bytes this rank holds: the frozen layer shards, and the LoRA shards (parameters only).
struct FsdpFootprint {
  int64_t frozen_local_bytes = 0, frozen_total_bytes = 0;
  int64_t lora_local_elems = 0, lora_total_elems = 0;
};
FsdpFootprint fsdp_footprint(const Fsdp& fsdp);

}  // namespace qlora
