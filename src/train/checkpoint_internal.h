// Helpers shared by checkpoint.cpp (one-file checkpoints, manifest, discovery) and
// checkpoint_sharded.cpp (per-rank files of a multi-rank save, reassembly at load).
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qlora/checkpoint.h"

namespace qlora::ckpt {

// A parsed manifest.json: its JSON and the tensor files it lists, in rank order
// ({tensors.safetensors} for the one-file layout).
struct Manifest {
  nlohmann::json json;
  int world_size = 1;
  std::vector<std::string> tensor_files;
};
// UserError naming manifest.json when it is missing, malformed, or lists no complete set of tensor
// files (tensors.safetensors, or tensors-<r>-of-<W>.safetensors for every r < W).
Manifest read_manifest(const std::filesystem::path& dir);

// "tensors-00001-of-00004.safetensors"
std::string rank_file_name(int rank, int world);

// output_dir/.checkpoint-<step>.tmp-<pid>: the name remove_incomplete_checkpoints recognises.
std::filesystem::path temp_dir_path(const std::filesystem::path& output_dir, int64_t step, int64_t pid);

// Creates output_dir and removes leftover temp directories; WriteError when it cannot be created.
void prepare_output_dir(const std::filesystem::path& output_dir);

// Throws the WriteError of a save that failed: it names final_dir and `cause` (which names the file
// and the reason, e.g. "...: write failed: No space left on device").
[[noreturn]] void throw_not_saved(const std::filesystem::path& final_dir, const std::string& cause);

// The end of every save, once the tensor files are in `tmp`: writes state.json and manifest.json
// (size and CRC-32 of every file, read back), fsyncs, renames `tmp` to checkpoint-<step> (replacing
// one of the same step), then prunes to keep_last. On failure `tmp` is removed and the error
// rethrown (a failed write or rename as a WriteError); nothing is pruned. `pid` names the trash directory of a replacing save.
std::filesystem::path finish_checkpoint(const std::filesystem::path& tmp, const std::filesystem::path& output_dir,
                                        int64_t step, const nlohmann::json& state,
                                        const std::vector<std::string>& tensor_files, int world_size, int keep_last,
                                        int64_t pid);

// save_checkpoint with the safetensors metadata of tensors.safetensors given.
std::filesystem::path save_one_file_checkpoint(const std::filesystem::path& output_dir, int64_t step,
                                               const NamedTensors& tensors,
                                               const std::map<std::string, std::string>& metadata,
                                               const nlohmann::json& state, int keep_last);

// Fills c.tensors, c.world_size and c.rank_tensors from the tensor files of a verified checkpoint
// (one-file, with or without shard metadata, or a set of rank files).
void read_checkpoint_tensors(const std::filesystem::path& dir, const Manifest& m, Checkpoint& c);

}  // namespace qlora::ckpt
