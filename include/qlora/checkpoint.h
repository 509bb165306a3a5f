// Training checkpoints (issue 7): output_dir/checkpoint-<step>/ holding tensors.safetensors (LoRA
// weights, optimizer state, RNG states: whatever the trainer names), state.json (step, scheduler,
// loss scaler, data position...) and manifest.json (each file's size and CRC-32). A checkpoint is
// written into a temp directory and renamed into place, so a kill at any moment leaves either the
// complete checkpoint or none (plus a temp directory that is ignored and later removed).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "qlora/safetensors.h"  // NamedTensors

namespace qlora {

inline constexpr const char* kCheckpointTensorsFile = "tensors.safetensors";
inline constexpr const char* kCheckpointStateFile = "state.json";
inline constexpr const char* kCheckpointManifestFile = "manifest.json";

// "checkpoint-<step>", the name HF Trainer uses.
std::string checkpoint_dir_name(int64_t step);

// Writes output_dir/checkpoint-<step>/ atomically (temp dir, fsync of every file and of both
// directories, rename) and returns its path. An existing checkpoint of the same step is replaced.
// Leftover temp directories of killed saves are removed first. Then, when keep_last > 0, the
// oldest complete checkpoints beyond the newest keep_last are deleted; the one just written is
// never deleted. Tensors may live on any device (copied to the CPU one at a time).
std::filesystem::path save_checkpoint(const std::filesystem::path& output_dir, int64_t step, const NamedTensors& tensors,
                                      const nlohmann::json& state, int keep_last = 0);

struct Checkpoint {
  std::filesystem::path dir;
  int64_t step = 0;
  NamedTensors tensors;  // CPU tensors, in file order. Sharded checkpoint: each sharded tensor
                         // reassembled whole from every rank's rows; per-rank tensors from rank 0
  nlohmann::json state;
  int world_size = 1;                     // ranks that wrote it
  std::vector<NamedTensors> rank_tensors; // [saved rank]: that rank's tensors that are not sharded
                                          // (RNG states...); one-file checkpoints: [0] = all tensors

  const at::Tensor* find(const std::string& name) const;    // nullptr when absent
  const at::Tensor& tensor(const std::string& name) const;  // UserError naming the checkpoint when absent
};

// Checks `dir` without loading tensors: manifest present and well-formed, every listed file
// present with its recorded size and CRC-32. Throws a UserError naming the first bad file.
void verify_checkpoint(const std::filesystem::path& dir);

// verify_checkpoint, then reads the tensors and state. Nothing on disk is modified. Sharded
// checkpoints are reassembled (see below); a missing rank file, overlapping or missing rows, or
// shards that disagree on shape or dtype are UserErrors naming the file and the tensor.
Checkpoint load_checkpoint(const std::filesystem::path& dir);

// The valid checkpoint-<step> directory of output_dir with the highest step, or nullopt when there
// is none. Temp directories are ignored; a corrupt or incomplete checkpoint is skipped with a
// warning naming it and the problem.
std::optional<std::filesystem::path> find_latest_checkpoint(const std::filesystem::path& output_dir);

// resume_from_checkpoint as a user writes it: "" or "false": none; "auto" or "true": the latest
// valid checkpoint of output_dir (none when there is none, with an info line); anything else: a
// checkpoint directory, which must verify (UserError otherwise).
std::optional<std::filesystem::path> resolve_resume_checkpoint(const std::string& value,
                                                               const std::filesystem::path& output_dir);

// Removes temp directories left in output_dir by saves that were killed; returns how many.
int remove_incomplete_checkpoints(const std::filesystem::path& output_dir);

// CRC-32 (IEEE, as zlib's crc32) of a file's bytes; UserError naming the file when unreadable.
uint32_t file_crc32(const std::filesystem::path& path);
uint32_t crc32_update(uint32_t crc, const void* data, size_t size);  // crc = 0 to start

// ---- sharded checkpoints (issue 8) ----
// A multi-rank run saves one checkpoint directory holding one tensor file per rank,
// "tensors-<rank>-of-<world>.safetensors" (5 digits each; world 1 writes the one-file layout,
// tensors.safetensors), plus state.json and manifest.json written by rank 0 after every rank's file
// is on disk. A sharded tensor is split on dim 0: each rank stores only its valid rows, and the file's
// safetensors metadata records "rank", "world_size" and "shards" = JSON {name: [row_offset, rows,
// global dim 0]} (the global offsets), so load_checkpoint can rebuild the whole tensor at any world
// size. Every other tensor of a rank file is that rank's own (RNG states...).

class Collective;  // qlora/dist.h

// Where one rank's shard of a tensor sits in the whole tensor (dim 0).
struct ShardPlacement {
  int64_t row_offset = 0;   // first global row this rank stores
  int64_t rows = 0;         // rows it stores (0 allowed: padding-only ranks)
  int64_t global_rows = 0;  // dim 0 of the whole tensor
};

// Collective form of save_checkpoint: every rank of `comm` calls it with the same step, state and
// keep_last. `tensors`: this rank's tensors; those named in `shards` are shards (their dim 0 ==
// ShardPlacement::rows), the rest per-rank. Same atomicity as save_checkpoint (rank 0 creates the
// temp directory, every rank writes its file, rank 0 writes state.json and the manifest with every
// file's CRC, renames, prunes), and no rank returns before the checkpoint is complete. A rank that
// fails to write makes every rank throw the UserError (the temp directory is removed).
std::filesystem::path save_sharded_checkpoint(const std::filesystem::path& output_dir, int64_t step,
                                              const NamedTensors& tensors,
                                              const std::vector<std::pair<std::string, ShardPlacement>>& shards,
                                              const nlohmann::json& state, int keep_last, Collective& comm);

// RNG states as tensors, for a checkpoint: "rng.cpu" (the default CPU generator) and, when CUDA is
// present, "rng.cuda.<i>" per device. Restoring sets each generator found in `tensors`; a CUDA
// state for a device this process does not have is skipped with a warning.
NamedTensors rng_state_tensors();
void restore_rng_state(const NamedTensors& tensors);

}  // namespace qlora
