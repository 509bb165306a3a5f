// Sharded checkpoints (issue 8): every rank writes its own tensor file into the temp directory rank
// 0 made, a failure flag is reduced so that one rank's failure stops them all, and rank 0 finishes
// the checkpoint as save_checkpoint does. At load the dim-0 shards of every rank file are put back
// together into whole tensors, checking that the ranks' rows cover each tensor exactly once.
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <exception>
#include <map>
#include <set>

#include "checkpoint_internal.h"
#include "qlora/checkpoint.h"
#include "qlora/dist.h"
#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/shape_str.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace qlora {
namespace {

// The safetensors metadata keys of a rank file.
constexpr const char* kMetaRank = "rank";
constexpr const char* kMetaWorld = "world_size";
constexpr const char* kMetaShards = "shards";

// Empty when this rank's arguments are consistent, else what is wrong.
std::string check_shards(const NamedTensors& tensors, const std::vector<std::pair<std::string, ShardPlacement>>& shards) {
  std::set<std::string> seen;
  for (const auto& [name, p] : shards) {
    if (!seen.insert(name).second) return "shard placement for '" + name + "' given twice";
    const at::Tensor* t = nullptr;
    for (const auto& [n, tensor] : tensors)
      if (n == name) t = &tensor;
    if (!t) return "shard placement for '" + name + "' names no tensor of this rank";
    if (p.row_offset < 0 || p.rows < 0 || p.row_offset + p.rows > p.global_rows)
      return cat("tensor '", name, "': placement rows [", p.row_offset, ", ", p.row_offset + p.rows,
                 ") (expected within 0..", p.global_rows, ", the tensor's global rows)");
    if (!t->defined() || t->dim() < 1 || t->size(0) != p.rows)
      return cat("tensor '", name, "' has shape ", t->defined() ? shape_str(t->sizes()) : std::string("(undefined)"),
                 " (expected dim 0 == ", p.rows, ", its placement's rows)");
  }
  return "";
}

std::map<std::string, std::string> rank_metadata(int64_t step, int rank, int world,
                                                 const std::vector<std::pair<std::string, ShardPlacement>>& shards) {
  json sj = json::object();
  for (const auto& [name, p] : shards) sj[name] = {p.row_offset, p.rows, p.global_rows};
  return {{"format", "pt"},
          {"step", std::to_string(step)},
          {kMetaRank, std::to_string(rank)},
          {kMetaWorld, std::to_string(world)},
          {kMetaShards, sj.dump()}};
}

// The failure flags and pids travel through the collective: NCCL reduces device tensors only, the
// CPU engines take CPU tensors.
at::TensorOptions flag_options(const Collective& comm) {
  const auto o = at::TensorOptions().dtype(at::kLong);
  return comm.engine() == "nccl" ? o.device(at::kCUDA) : o;
}

int64_t to_int(const at::Tensor& t) { return t.to(at::kCPU).item<int64_t>(); }

// ---- load ----

bool parse_int(const std::string& s, int64_t& out) {
  const char* end = s.data() + s.size();
  const auto r = std::from_chars(s.data(), end, out);
  return !s.empty() && r.ec == std::errc() && r.ptr == end;
}

// The "shards" placements a rank file records (validated against the file's own entries). A
// one-file checkpoint written by save_checkpoint has no placement metadata: no shards.
std::map<std::string, ShardPlacement> read_placements(const SafetensorsFile& f, int rank, int world, bool one_file) {
  const auto& meta = f.metadata();
  const std::string where = f.path().string();
  const bool any = meta.count(kMetaRank) || meta.count(kMetaWorld) || meta.count(kMetaShards);
  if (one_file && !any) return {};
  for (const char* key : {kMetaRank, kMetaWorld, kMetaShards})
    if (!meta.count(key))
      throw UserError(where + ": safetensors metadata has no '" + key + "' (expected rank, world_size and shards)");
  int64_t v = -1;
  if (!parse_int(meta.at(kMetaRank), v) || v != rank)
    throw UserError(where + ": safetensors metadata rank '" + meta.at(kMetaRank) + "' (expected " +
                    std::to_string(rank) + ", the rank of the file name)");
  if (!parse_int(meta.at(kMetaWorld), v) || v != world)
    throw UserError(where + ": safetensors metadata world_size '" + meta.at(kMetaWorld) + "' (expected " +
                    std::to_string(world) + ", the world size of the file name)");
  const json sj = json::parse(meta.at(kMetaShards), nullptr, /*allow_exceptions=*/false);
  if (sj.is_discarded() || !sj.is_object())
    throw UserError(where + ": safetensors metadata shards is not a JSON object (expected {name: [row_offset, rows, global_rows]})");
  std::map<std::string, ShardPlacement> out;
  for (const auto& [name, a] : sj.items()) {
    const bool ints = a.is_array() && a.size() == 3 &&
                      std::all_of(a.begin(), a.end(), [](const json& x) { return x.is_number_integer(); });
    if (!ints)
      throw UserError(where + ": shards entry of '" + name + "' is " + a.dump() +
                      " (expected [row_offset, rows, global_rows], integers)");
    const ShardPlacement p{a[0].get<int64_t>(), a[1].get<int64_t>(), a[2].get<int64_t>()};
    if (p.row_offset < 0 || p.rows < 0 || p.row_offset + p.rows > p.global_rows)
      throw UserError(where + ": shards entry of '" + name + "' is " + a.dump() +
                      " (expected rows [row_offset, row_offset + rows) within 0..global_rows)");
    if (!f.contains(name))
      throw UserError(where + ": shards names '" + name + "', which the file does not hold");
    const auto& shape = f.entry(name).shape;
    if (shape.empty() || shape[0] != p.rows)
      throw UserError(where + ": tensor '" + name + "' has shape " + shape_str(shape) + " (expected dim 0 == " +
                      std::to_string(p.rows) + ", its shards entry)");
    out[name] = p;
  }
  return out;
}

struct Piece {
  const SafetensorsFile* file;
  ShardPlacement p;
};

// Puts `name` back together from its pieces: same dtype and trailing shape everywhere, the same
// global rows, every row stored by exactly one rank.
at::Tensor reassemble(const std::string& name, std::vector<Piece> pieces, const fs::path& dir) {
  const SafetensorsEntry& ref = pieces[0].file->entry(name);
  const std::string ref_file = pieces[0].file->path().string();
  const std::vector<int64_t> tail(ref.shape.begin() + 1, ref.shape.end());
  for (const Piece& pc : pieces) {
    const SafetensorsEntry& e = pc.file->entry(name);
    if (e.scalar_type != ref.scalar_type || std::vector<int64_t>(e.shape.begin() + 1, e.shape.end()) != tail ||
        pc.p.global_rows != pieces[0].p.global_rows)
      throw UserError(cat(pc.file->path().string(), ": shard of '", name, "' is ", e.dtype, " ", shape_str(e.shape),
                          " of ", pc.p.global_rows, " global rows (expected ", ref.dtype, ", dims after the first ",
                          shape_str(tail), " and ", pieces[0].p.global_rows, " global rows, as in ", ref_file, ")"));
  }
  std::stable_sort(pieces.begin(), pieces.end(),
                   [](const Piece& a, const Piece& b) { return a.p.row_offset < b.p.row_offset; });
  const int64_t global_rows = pieces[0].p.global_rows;
  int64_t next = 0;
  const Piece* prev = nullptr;
  for (const Piece& pc : pieces) {
    if (pc.p.rows == 0) continue;
    if (pc.p.row_offset < next)
      throw UserError(cat(pc.file->path().string(), ": rows [", pc.p.row_offset, ", ", pc.p.row_offset + pc.p.rows,
                          ") of '", name, "' overlap rows [", prev->p.row_offset, ", ", next, ") stored in ",
                          prev->file->path().string(), " (expected each row in one rank file)"));
    if (pc.p.row_offset > next)
      throw UserError(cat(pc.file->path().string(), ": '", name, "' starts at row ", pc.p.row_offset,
                          " but no rank file holds rows [", next, ", ", pc.p.row_offset, ")"));
    next = pc.p.row_offset + pc.p.rows;
    prev = &pc;
  }
  if (next != global_rows)
    throw UserError(cat((prev ? prev->file->path() : dir).string(), ": no rank file holds rows [", next, ", ",
                        global_rows, ") of '", name, "' (expected all ", global_rows, " rows)"));
  std::vector<int64_t> shape = ref.shape;
  shape[0] = global_rows;
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(ref.scalar_type));
  for (const Piece& pc : pieces)
    if (pc.p.rows > 0) out.narrow(0, pc.p.row_offset, pc.p.rows).copy_(pc.file->view(name));
  return out;
}

}  // namespace

namespace ckpt {

std::string rank_file_name(int rank, int world) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "tensors-%05d-of-%05d.safetensors", rank, world);
  return buf;
}

void read_checkpoint_tensors(const fs::path& dir, const Manifest& m, Checkpoint& c) {
  const int world = m.world_size;
  const bool one_file = m.tensor_files.size() == 1 && m.tensor_files[0] == kCheckpointTensorsFile;
  std::vector<SafetensorsFile> files;
  files.reserve(world);  // Piece keeps pointers into it
  std::map<std::string, std::vector<Piece>> pieces;    // sharded tensors, by name
  std::vector<std::map<std::string, ShardPlacement>> placements;
  for (int r = 0; r < world; ++r) {
    files.emplace_back(dir / m.tensor_files[r]);
    placements.push_back(read_placements(files.back(), r, world, one_file));
    for (const auto& [name, p] : placements.back()) pieces[name].push_back({&files.back(), p});
  }
  c.world_size = world;
  c.rank_tensors.assign(world, {});
  for (int r = 0; r < world; ++r) {
    for (const auto& name : files[r].names()) {
      if (placements[r].count(name)) continue;
      const auto it = pieces.find(name);
      if (it != pieces.end())
        throw UserError(files[r].path().string() + ": tensor '" + name + "' is this rank's own here but sharded in " +
                        it->second[0].file->path().string() + " (expected one or the other in every rank file)");
      c.rank_tensors[r].emplace_back(name, files[r].tensor(name));
    }
  }
  // Sharded tensors by name, then rank 0's own tensors in file order.
  c.tensors.clear();
  for (const auto& [name, ps] : pieces) c.tensors.emplace_back(name, reassemble(name, ps, dir));
  for (const auto& e : c.rank_tensors[0]) c.tensors.push_back(e);
}

}  // namespace ckpt

fs::path save_sharded_checkpoint(const fs::path& output_dir, int64_t step, const NamedTensors& tensors,
                                 const std::vector<std::pair<std::string, ShardPlacement>>& shards, const json& state,
                                 int keep_last, Collective& comm) {
  // Every rank is given the same step, so every rank throws here and none waits in a collective.
  if (step < 0) throw UserError("save_sharded_checkpoint: step " + std::to_string(step) + " (expected >= 0)");
  const int world = comm.world_size(), rank = comm.rank();
  const fs::path final_dir = output_dir / checkpoint_dir_name(step);
  const std::string file = world == 1 ? std::string(kCheckpointTensorsFile) : ckpt::rank_file_name(rank, world);
  const std::string problem = check_shards(tensors, shards);
  if (world == 1) {
    if (!problem.empty()) throw UserError((final_dir / file).string() + ": not written: " + problem);
    return ckpt::save_one_file_checkpoint(output_dir, step, tensors, rank_metadata(step, 0, 1, shards), state,
                                          keep_last);
  }

  // Until the checkpoint is complete no rank may throw before the collectives the others wait in:
  // errors are kept and thrown once every rank knows the outcome.
  const auto opts = flag_options(comm);
  std::exception_ptr own_error;
  at::Tensor pid = at::full({1}, -1, opts);  // rank 0's pid names the temp directory; -1: it failed
  if (rank == 0) {
    try {
      ckpt::prepare_output_dir(output_dir);
      const fs::path tmp = ckpt::temp_dir_path(output_dir, step, ::getpid());
      std::error_code ec;
      fs::create_directory(tmp, ec);
      if (ec) ckpt::throw_not_saved(final_dir, tmp.string() + ": cannot create a temp directory: " + ec.message());
      pid.fill_(static_cast<int64_t>(::getpid()));
    } catch (...) {
      own_error = std::current_exception();
    }
  }
  comm.broadcast(pid, 0);
  const int64_t pid0 = to_int(pid);
  if (pid0 < 0) {
    if (own_error) std::rethrow_exception(own_error);
    throw WriteError(final_dir.string() + ": not saved: rank 0 could not create the temp checkpoint directory (see its error)");
  }
  const fs::path tmp = ckpt::temp_dir_path(output_dir, step, pid0);

  // Every rank writes its file; flags[r] = 1 when rank r's arguments were wrong, 2 when its write
  // failed (so every rank throws the same kind of error).
  int64_t own_flag = 0;
  if (!problem.empty()) {
    own_flag = 1;
    own_error = std::make_exception_ptr(UserError((final_dir / file).string() + ": not written: " + problem));
  } else {
    try {
      save_safetensors(tmp / file, tensors, rank_metadata(step, rank, world, shards));
    } catch (const UserError& e) {
      own_flag = 2;
      own_error = std::make_exception_ptr(WriteError((final_dir / file).string() + ": not written: " + e.what()));
    } catch (...) {
      own_flag = 1;
      own_error = std::current_exception();
    }
  }
  at::Tensor flags = at::zeros({world}, opts);
  if (own_error) flags[rank].fill_(own_flag);
  comm.all_reduce(flags, ReduceOp::sum);
  const at::Tensor failed = flags.to(at::kCPU);
  for (int r = 0; r < world; ++r) {
    const int64_t flag = failed[r].item<int64_t>();
    if (flag == 0) continue;
    if (rank == 0) {
      std::error_code ec;
      fs::remove_all(tmp, ec);
    }
    comm.barrier();  // the temp directory is gone before any rank reports
    if (own_error) std::rethrow_exception(own_error);
    const std::string what = (final_dir / ckpt::rank_file_name(r, world)).string() + ": not written by rank " +
                             std::to_string(r) + " (see its error); the checkpoint was not saved";
    if (flag == 2) throw WriteError(what);
    throw UserError(what);
  }

  // Rank 0 writes state.json and the manifest, renames, prunes; the broadcast of the outcome keeps
  // every rank here until the checkpoint is in place.
  at::Tensor done = at::zeros({1}, opts);
  if (rank == 0) {
    std::vector<std::string> files;
    for (int r = 0; r < world; ++r) files.push_back(ckpt::rank_file_name(r, world));
    try {
      ckpt::finish_checkpoint(tmp, output_dir, step, state, files, world, keep_last, pid0);
    } catch (...) {
      own_error = std::current_exception();
      done.fill_(1);
    }
  }
  comm.broadcast(done, 0);
  if (to_int(done) != 0) {
    if (own_error) std::rethrow_exception(own_error);
    throw WriteError(final_dir.string() + ": not saved: rank 0 could not complete the checkpoint (see its error)");
  }
  return final_dir;
}

}  // namespace qlora
