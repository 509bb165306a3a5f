// Training checkpoints: atomic directory writes (temp dir + rename, fsync'd), a manifest with each
// file's size and CRC-32 so that a truncated or corrupt file is caught before any of it is used,
// pruning to the newest keep_last, latest-valid discovery for resume, and the RNG states.
#include "qlora/checkpoint.h"

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <fcntl.h>
#include <stdio.h>  // renameat2
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <regex>

#include "checkpoint_internal.h"
#include "qlora/error.h"
#include "qlora/log.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace qlora {
namespace {

constexpr const char* kFormat = "qlora-checkpoint";
constexpr int kVersion = 1;

// CRC-32 (reflected polynomial 0xEDB88320, zlib's), slicing-by-8 tables.
struct Crc32Tables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  Crc32Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
  }
};
const Crc32Tables& crc_tables() {
  static const Crc32Tables tables;
  return tables;
}

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08x", v);
  return buf;
}

void fsync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw UserError(dir.string() + ": cannot open directory to fsync: " + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0 && err != EINVAL) throw UserError(dir.string() + ": fsync failed: " + std::strerror(err));
}

// checkpoint-<digits> -> step; -1 for any other name.
int64_t step_of_dir_name(const std::string& name) {
  static const std::regex re("^checkpoint-([0-9]{1,18})$");
  std::smatch m;
  if (!std::regex_match(name, m, re)) return -1;
  return std::stoll(m[1].str());
}

// Temp and trash names of this module: ".checkpoint-<step>.tmp-<pid>", ".checkpoint-<step>.old-<pid>".
bool is_temp_dir_name(const std::string& name) {
  static const std::regex re("^\\.checkpoint-[0-9]+\\.(tmp|old)-[0-9]+$");
  return std::regex_match(name, re);
}

// (step, path) of every checkpoint-<step> directory, ascending by step.
std::vector<std::pair<int64_t, fs::path>> list_checkpoint_dirs(const fs::path& output_dir) {
  std::vector<std::pair<int64_t, fs::path>> out;
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(output_dir, ec)) {
    const int64_t step = step_of_dir_name(e.path().filename().string());
    if (step >= 0 && e.is_directory(ec)) out.emplace_back(step, e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

json file_record(const fs::path& p) {
  return {{"size", static_cast<int64_t>(fs::file_size(p))}, {"crc32", hex32(file_crc32(p))}};
}

}  // namespace

namespace ckpt {

Manifest read_manifest(const fs::path& dir) {
  const fs::path mp = dir / kCheckpointManifestFile;
  std::error_code ec;
  if (!fs::is_regular_file(mp, ec))
    throw UserError(mp.string() + ": missing (expected a complete checkpoint directory with a manifest)");
  std::ifstream in(mp, std::ios::binary);
  Manifest out;
  json& m = out.json;
  m = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (m.is_discarded() || !m.is_object() || m.value("format", "") != kFormat || !m.contains("step") ||
      !m["step"].is_number_integer() || !m.contains("files") || !m["files"].is_object())
    throw UserError(mp.string() + ": not a valid checkpoint manifest (expected a JSON object with format \"" + kFormat +
                    "\", an integer step and a files table)");
  if (m.value("version", 0) > kVersion)
    throw UserError(mp.string() + ": manifest version " + std::to_string(m.value("version", 0)) + " (expected <= " +
                    std::to_string(kVersion) + "; written by a newer qlora)");
  const json& files = m["files"];
  if (!files.contains(kCheckpointStateFile))
    throw UserError(mp.string() + ": lists no " + kCheckpointStateFile + " (expected " + kCheckpointStateFile +
                    " and the tensor files)");

  // The tensor files: tensors.safetensors, or one rank file per rank of a single world size.
  static const std::regex rank_re("^tensors-([0-9]{5})-of-([0-9]{5})\\.safetensors$");
  std::map<int, std::string> ranks;
  int world = -1;
  for (const auto& [name, rec] : files.items()) {
    std::smatch mt;
    if (!std::regex_match(name, mt, rank_re)) continue;
    const int r = std::stoi(mt[1].str()), w = std::stoi(mt[2].str());
    if (world >= 0 && w != world)
      throw UserError(mp.string() + ": lists rank files of world size " + std::to_string(world) + " and " +
                      std::to_string(w) + " (expected one set of tensors-<rank>-of-<world>.safetensors)");
    world = w;
    if (w < 1 || r >= w)
      throw UserError(mp.string() + ": lists " + name + " (expected a rank below the world size, which is at least 1)");
    ranks[r] = name;
  }
  const bool one_file = files.contains(kCheckpointTensorsFile);
  if (one_file && !ranks.empty())
    throw UserError(mp.string() + ": lists both " + kCheckpointTensorsFile + " and " + ranks.begin()->second +
                    " (expected one layout: a single tensor file or one file per rank)");
  if (one_file) {
    out.tensor_files = {kCheckpointTensorsFile};
    return out;
  }
  if (ranks.empty())
    throw UserError(mp.string() + ": lists no " + kCheckpointTensorsFile +
                    " (expected it, or tensors-<rank>-of-<world>.safetensors for every rank)");
  for (int r = 0; r < world; ++r) {
    if (!ranks.count(r))
      throw UserError(mp.string() + ": lists no " + rank_file_name(r, world) + " (rank " + std::to_string(r) +
                      " of " + std::to_string(world) + "; expected every rank's tensor file)");
    out.tensor_files.push_back(ranks[r]);
  }
  out.world_size = world;
  if (m.contains("world_size") && m["world_size"] != world)
    throw UserError(mp.string() + ": world_size " + m["world_size"].dump() + " (expected " + std::to_string(world) +
                    ", the rank files listed)");
  return out;
}

fs::path temp_dir_path(const fs::path& output_dir, int64_t step, int64_t pid) {
  return output_dir / (".checkpoint-" + std::to_string(step) + ".tmp-" + std::to_string(pid));
}

void prepare_output_dir(const fs::path& output_dir) {
  std::error_code ec;
  fs::create_directories(output_dir, ec);
  if (ec) throw WriteError(output_dir.string() + ": cannot create the output directory: " + ec.message());
  remove_incomplete_checkpoints(output_dir);
}

void throw_not_saved(const fs::path& final_dir, const std::string& cause) {
  throw WriteError(final_dir.string() + ": not saved (" + cause + "); the checkpoints saved before it are intact");
}

fs::path finish_checkpoint(const fs::path& tmp, const fs::path& output_dir, int64_t step, const json& state,
                           const std::vector<std::string>& tensor_files, int world_size, int keep_last, int64_t pid) {
  const fs::path final_dir = output_dir / checkpoint_dir_name(step);
  std::error_code ec;
  try {
    write_file_atomic(tmp / kCheckpointStateFile, state.dump(2, ' ', false, json::error_handler_t::replace) + "\n");
    // Checksums of the bytes as they landed on disk (read back), so a bad write shows up at load.
    json manifest = {{"format", kFormat}, {"version", kVersion}, {"step", step}, {"world_size", world_size},
                     {"files", json::object()}};
    for (const auto& f : tensor_files) manifest["files"][f] = file_record(tmp / f);
    manifest["files"][kCheckpointStateFile] = file_record(tmp / kCheckpointStateFile);
    write_file_atomic(tmp / kCheckpointManifestFile, manifest.dump(2) + "\n");
    fsync_dir(tmp);
    if (fs::exists(final_dir)) {
      // Same step saved again (a resumed run): swap the two directories in one atomic step, then
      // remove the old one (now at the temp name). Where the filesystem cannot exchange, move
      // the old one aside first; remove_incomplete_checkpoints puts it back if a kill comes
      // between the two renames.
      if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
        fs::remove_all(tmp, ec);
      } else {
        const fs::path old = output_dir / (".checkpoint-" + std::to_string(step) + ".old-" + std::to_string(pid));
        fs::rename(final_dir, old);
        try {
          fs::rename(tmp, final_dir);
        } catch (...) {
          std::error_code back;
          fs::rename(old, final_dir, back);  // the old checkpoint stays where resume looks for it
          throw;
        }
        fs::remove_all(old, ec);
      }
    } else {
      fs::rename(tmp, final_dir);
    }
    fsync_dir(output_dir);
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    throw_not_saved(final_dir, e.what());
  } catch (const WriteError&) {
    fs::remove_all(tmp, ec);
    throw;
  } catch (const UserError& e) {
    // The writers report a failed write (ENOSPC, EFBIG, EIO...) as a UserError naming the file.
    fs::remove_all(tmp, ec);
    throw_not_saved(final_dir, e.what());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }

  if (keep_last > 0) {
    auto dirs = list_checkpoint_dirs(output_dir);
    int kept = 0;
    for (auto it = dirs.rbegin(); it != dirs.rend(); ++it) {
      if (it->second == final_dir) continue;  // counted below, never deleted
      if (kept + 1 < keep_last) { ++kept; continue; }  // +1: the new checkpoint is one of keep_last
      // Moved aside under a temp name first: a kill during the removal then leaves a hidden folder
      // that the next save cleans, never a checkpoint-<step> with some of its files gone.
      const fs::path doomed = temp_dir_path(output_dir, it->first, pid);
      std::error_code moved;
      fs::rename(it->second, doomed, moved);
      fs::remove_all(moved ? it->second : doomed, ec);
      if (ec) log_warn(it->second.string() + ": cannot remove an old checkpoint: " + ec.message());
      else log_info(cat("removed ", it->second.string(), " (save_total_limit ", keep_last, ")"));
    }
  }
  return final_dir;
}

fs::path save_one_file_checkpoint(const fs::path& output_dir, int64_t step, const NamedTensors& tensors,
                                  const std::map<std::string, std::string>& metadata, const json& state, int keep_last) {
  if (step < 0) throw UserError("save_checkpoint: step " + std::to_string(step) + " (expected >= 0)");
  prepare_output_dir(output_dir);
  const int64_t pid = ::getpid();
  const fs::path tmp = temp_dir_path(output_dir, step, pid);
  std::error_code ec;
  fs::create_directory(tmp, ec);
  if (ec) throw_not_saved(output_dir / checkpoint_dir_name(step), tmp.string() + ": cannot create a temp directory: " + ec.message());
  try {
    save_safetensors(tmp / kCheckpointTensorsFile, tensors, metadata);
  } catch (const UserError& e) {
    fs::remove_all(tmp, ec);
    throw_not_saved(output_dir / checkpoint_dir_name(step), e.what());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  return finish_checkpoint(tmp, output_dir, step, state, {kCheckpointTensorsFile}, 1, keep_last, pid);
}

}  // namespace ckpt

uint32_t crc32_update(uint32_t crc, const void* data, size_t size) {
  const auto& t = crc_tables().t;
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  while (size >= 8) {
    const uint32_t a = crc ^ (uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24);
    crc = t[7][a & 0xff] ^ t[6][(a >> 8) & 0xff] ^ t[5][(a >> 16) & 0xff] ^ t[4][a >> 24] ^ t[3][p[4]] ^ t[2][p[5]] ^
          t[1][p[6]] ^ t[0][p[7]];
    p += 8;
    size -= 8;
  }
  while (size-- > 0) crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t file_crc32(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw UserError(path.string() + ": cannot open: " + std::strerror(errno));
  std::vector<char> buf(1 << 20);
  uint32_t crc = 0;
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      throw UserError(path.string() + ": read failed: " + std::strerror(err));
    }
    if (n == 0) break;
    crc = crc32_update(crc, buf.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  return crc;
}

std::string checkpoint_dir_name(int64_t step) { return "checkpoint-" + std::to_string(step); }

int remove_incomplete_checkpoints(const fs::path& output_dir) {
  int removed = 0;
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return 0;
  std::vector<fs::path> temps;
  for (const auto& e : fs::directory_iterator(output_dir, ec))
    if (is_temp_dir_name(e.path().filename().string())) temps.push_back(e.path());
  for (const auto& p : temps) {
    // ".checkpoint-<step>.old-<pid>" is a complete checkpoint moved aside by a replacing save
    // that did not finish: when its step has no checkpoint now, it is put back.
    const std::string name = p.filename().string();
    const size_t dot = name.find(".old-");
    if (dot != std::string::npos) {
      const fs::path final_dir = output_dir / name.substr(1, dot - 1);
      std::error_code rec;
      if (!fs::exists(final_dir, rec)) {
        fs::rename(p, final_dir, rec);
        if (!rec) { log_warn(final_dir.string() + ": restored from " + p.string() + " (a replacing save did not finish)"); continue; }
      }
    }
    std::error_code rec;
    fs::remove_all(p, rec);
    if (rec) log_warn(p.string() + ": cannot remove an incomplete checkpoint: " + rec.message());
    else { log_info(p.string() + ": removed an incomplete checkpoint (a save that did not finish)"); ++removed; }
  }
  return removed;
}

fs::path save_checkpoint(const fs::path& output_dir, int64_t step, const NamedTensors& tensors, const json& state,
                         int keep_last) {
  return ckpt::save_one_file_checkpoint(output_dir, step, tensors, {{"format", "pt"}, {"step", std::to_string(step)}},
                                        state, keep_last);
}

void verify_checkpoint(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw UserError(dir.string() + ": not a directory (expected a checkpoint directory)");
  const json m = ckpt::read_manifest(dir).json;
  for (const auto& [name, rec] : m["files"].items()) {
    const fs::path p = dir / name;
    if (name.find('/') != std::string::npos || name == ".." || !rec.is_object() || !rec.contains("size") ||
        !rec["size"].is_number_integer() || !rec.contains("crc32") || !rec["crc32"].is_string())
      throw UserError((dir / kCheckpointManifestFile).string() + ": bad entry for '" + name +
                      "' (expected {\"size\": N, \"crc32\": \"hex\"})");
    if (!fs::is_regular_file(p, ec)) throw UserError(p.string() + ": missing (listed in the checkpoint's manifest)");
    const auto size = static_cast<int64_t>(fs::file_size(p, ec));
    const int64_t want = rec["size"].get<int64_t>();
    if (size != want)
      throw UserError(p.string() + ": " + std::to_string(size) + " bytes (expected " + std::to_string(want) +
                      " from the manifest; truncated or overwritten)");
    const std::string crc = hex32(file_crc32(p));
    if (crc != rec["crc32"].get<std::string>())
      throw UserError(p.string() + ": CRC-32 " + crc + " (expected " + rec["crc32"].get<std::string>() +
                      " from the manifest; the file is corrupt)");
  }
}

const at::Tensor* Checkpoint::find(const std::string& name) const {
  for (const auto& [n, t] : tensors)
    if (n == name) return &t;
  return nullptr;
}

const at::Tensor& Checkpoint::tensor(const std::string& name) const {
  const at::Tensor* t = find(name);
  if (!t) {
    const fs::path where = world_size > 1 ? dir : dir / kCheckpointTensorsFile;
    throw UserError(where.string() + ": no tensor '" + name + "' (expected by this run)");
  }
  return *t;
}

Checkpoint load_checkpoint(const fs::path& dir) {
  verify_checkpoint(dir);
  Checkpoint c;
  c.dir = dir;
  const ckpt::Manifest m = ckpt::read_manifest(dir);
  c.step = m.json["step"].get<int64_t>();
  ckpt::read_checkpoint_tensors(dir, m, c);
  const fs::path sp = dir / kCheckpointStateFile;
  std::ifstream in(sp, std::ios::binary);
  c.state = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (c.state.is_discarded()) throw UserError(sp.string() + ": not valid JSON (expected the trainer state)");
  return c;
}

std::optional<fs::path> find_latest_checkpoint(const fs::path& output_dir) {
  auto dirs = list_checkpoint_dirs(output_dir);
  for (auto it = dirs.rbegin(); it != dirs.rend(); ++it) {
    try {
      verify_checkpoint(it->second);
      return it->second;
    } catch (const UserError& e) {
      log_warn(cat("skipping checkpoint ", it->second.string(), ": ", e.what()));
    }
  }
  return std::nullopt;
}

std::optional<fs::path> resolve_resume_checkpoint(const std::string& value, const fs::path& output_dir) {
  if (value.empty() || value == "false") return std::nullopt;
  if (value == "auto" || value == "true") {
    auto latest = find_latest_checkpoint(output_dir);
    if (!latest) log_info("resume_from_checkpoint: no valid checkpoint in " + output_dir.string() + "; starting fresh");
    return latest;
  }
  const fs::path p(value);
  std::error_code ec;
  if (!fs::is_directory(p, ec))
    throw UserError("resume_from_checkpoint: '" + value + "' is not a directory (expected a checkpoint-<step> directory, or auto)");
  verify_checkpoint(p);
  return p;
}

NamedTensors rng_state_tensors() {
  NamedTensors out;
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    out.emplace_back("rng.cpu", gen.get_state());
  }
  if (at::globalContext().hasCUDA()) {
    const int n = static_cast<int>(at::detail::getCUDAHooks().deviceCount());
    for (int i = 0; i < n; ++i) {
      at::Generator gen = at::globalContext().defaultGenerator(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(i)));
      std::lock_guard<std::mutex> lock(gen.mutex());
      out.emplace_back("rng.cuda." + std::to_string(i), gen.get_state());
    }
  }
  return out;
}

void restore_rng_state(const NamedTensors& tensors) {
  const int n_cuda = at::globalContext().hasCUDA() ? static_cast<int>(at::detail::getCUDAHooks().deviceCount()) : 0;
  for (const auto& [name, t] : tensors) {
    if (name == "rng.cpu") {
      at::Generator gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(t.to(at::kCPU));
    } else if (name.rfind("rng.cuda.", 0) == 0) {
      const int i = std::atoi(name.c_str() + 9);
      if (i >= n_cuda) {
        log_warn(cat("checkpoint has a CUDA RNG state for device ", i, " but this process sees ", n_cuda,
                     " CUDA device(s); not restored"));
        continue;
      }
      at::Generator gen = at::globalContext().defaultGenerator(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(i)));
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(t.to(at::kCPU));
    }
  }
}

}  // namespace qlora
