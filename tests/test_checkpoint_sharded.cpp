// Sharded checkpoints (issue 8): ranks of an in-process group (one thread per rank) each save their
// dim-0 shards and their own tensors; load_checkpoint puts the whole tensors back together. Also:
// world 1, old one-file checkpoints, pruning, a failing rank (every rank throws, nothing left
// behind), and damaged sets (a truncated or missing rank file, overlapping rows, bad metadata).
#include "qlora/checkpoint.h"
#include "qlora/dist.h"
#include "qlora/error.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <thread>

#include "test_util.h"

using Catch::Matchers::ContainsSubstring;
using qlora::test::read_file;
using qlora::test::TempDir;
using qlora::test::write_file;
namespace fs = std::filesystem;
using json = nlohmann::json;
using Shards = std::vector<std::pair<std::string, qlora::ShardPlacement>>;

namespace {

// The whole tensors a run shards: odd row counts so that the last ranks hold fewer rows or none.
qlora::NamedTensors full_tensors(int64_t seed) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  return {{"lora.A", at::randn({7, 5}, g, at::kFloat)},
          {"lora.B", at::randn({2, 3}, g, at::kFloat)},
          {"bias", at::randn({5}, g, at::kFloat)},
          {"half", at::randn({4, 2}, g, at::kFloat).to(at::kBFloat16)}};
}

// Padded rows per rank, as FSDP shards: rank r holds rows [r * per, (r + 1) * per) clipped to rows.
qlora::ShardPlacement place(int64_t rows, int world, int rank) {
  const int64_t per = (rows + world - 1) / world;
  const int64_t off = std::min<int64_t>(rank * per, rows);
  return {off, std::clamp<int64_t>(rows - off, 0, per), rows};
}

// What rank `rank` saves: its rows of every full tensor, plus its own "rng.cpu" and "data.position".
qlora::NamedTensors own_tensors(int rank, int64_t seed) {
  return {{"rng.cpu", at::arange(rank, rank + 16, at::kLong).to(at::kByte)},
          {"data.position", at::scalar_tensor(seed * 100 + rank, at::kLong)}};
}

void rank_args(const qlora::NamedTensors& full, int world, int rank, int64_t seed, qlora::NamedTensors& tensors,
               Shards& shards) {
  tensors = own_tensors(rank, seed);
  shards.clear();
  for (const auto& [name, t] : full) {
    const auto p = place(t.size(0), world, rank);
    tensors.emplace_back(name, t.narrow(0, p.row_offset, p.rows).clone());
    shards.emplace_back(name, p);
  }
}

bool same(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes().equals(b.sizes()) &&
         a.reshape({-1}).contiguous().view(at::kByte).equal(b.reshape({-1}).contiguous().view(at::kByte));
}

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

struct RankResult {
  fs::path path;
  bool threw = false;
  std::string error;
};

// Runs fn(rank, comm) on one thread per rank of an in-process group.
std::vector<RankResult> run_ranks(int world, const std::function<fs::path(int, qlora::Collective&)>& fn) {
  auto comms = qlora::make_in_process_collectives(world, std::chrono::seconds(30));
  std::vector<RankResult> res(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      try {
        res[r].path = fn(r, *comms[r]);
      } catch (const qlora::UserError& e) {
        res[r].threw = true;
        res[r].error = e.what();
      } catch (const std::exception& e) {
        res[r].threw = true;
        res[r].error = std::string("not a UserError: ") + e.what();
        comms[r]->abort(e.what());
      }
    });
  for (auto& t : threads) t.join();
  return res;
}

// Every rank saves its part of `full` at `step`; returns the results.
std::vector<RankResult> save_all(const fs::path& out, int world, int64_t step, const qlora::NamedTensors& full,
                                 int keep_last = 0) {
  return run_ranks(world, [&](int r, qlora::Collective& comm) {
    qlora::NamedTensors ts;
    Shards shards;
    rank_args(full, world, r, step, ts, shards);
    return qlora::save_sharded_checkpoint(out, step, ts, shards, {{"global_step", step}}, keep_last, comm);
  });
}

fs::path save_ok(const fs::path& out, int world, int64_t step, const qlora::NamedTensors& full, int keep_last = 0) {
  const auto res = save_all(out, world, step, full, keep_last);
  for (int r = 0; r < world; ++r) {
    INFO("rank " << r << ": " << res[r].error);
    REQUIRE(!res[r].threw);
    REQUIRE(res[r].path == out / qlora::checkpoint_dir_name(step));
  }
  return res[0].path;
}

std::string load_error(const fs::path& dir) {
  try {
    qlora::load_checkpoint(dir);
  } catch (const qlora::UserError& e) {
    return e.what();
  }
  FAIL("expected a UserError");
  return "";
}

std::string rank_file(int rank, int world) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "tensors-%05d-of-%05d.safetensors", rank, world);
  return buf;
}

// Replaces a checkpoint file and its manifest record, as a writer with a bug would have left it.
void rewrite_rank_file(const fs::path& dir, const std::string& file, const qlora::NamedTensors& ts,
                       const std::map<std::string, std::string>& meta) {
  qlora::save_safetensors(dir / file, ts, meta);
  json m = json::parse(read_file(dir / "manifest.json"));
  char crc[16];
  std::snprintf(crc, sizeof crc, "%08x", qlora::file_crc32(dir / file));
  m["files"][file] = {{"size", static_cast<int64_t>(fs::file_size(dir / file))}, {"crc32", crc}};
  write_file(dir / "manifest.json", m.dump(2));
}

}  // namespace

TEST_CASE("sharded checkpoint: ranks' shards reassemble whole", "[checkpoint]") {
  const int world = GENERATE(2, 3);
  CAPTURE(world);
  TempDir d("qlora_ckpt_sharded");
  const auto full = full_tensors(world);
  const fs::path dir = save_ok(d / "out", world, 20, full);
  CHECK(entries(d / "out") == std::vector<std::string>{"checkpoint-20"});
  std::vector<std::string> want = {"manifest.json", "state.json"};
  for (int r = 0; r < world; ++r) want.push_back(rank_file(r, world));
  std::sort(want.begin(), want.end());
  CHECK(entries(dir) == want);

  // The placements are in each rank file's metadata, in global rows.
  const qlora::SafetensorsFile last(dir / rank_file(world - 1, world));
  CHECK(last.metadata().at("rank") == std::to_string(world - 1));
  CHECK(last.metadata().at("world_size") == std::to_string(world));
  const json sj = json::parse(last.metadata().at("shards"));
  const auto pa = place(7, world, world - 1);
  CHECK(sj["lora.A"] == json::array({pa.row_offset, pa.rows, 7}));
  CHECK(sj["lora.B"][1] == (world == 3 ? 0 : 1));  // a rank holding no rows of it

  qlora::verify_checkpoint(dir);
  CHECK(qlora::find_latest_checkpoint(d / "out") == dir);
  const qlora::Checkpoint c = qlora::load_checkpoint(dir);
  CHECK(c.step == 20);
  CHECK(c.state == json{{"global_step", 20}});
  CHECK(c.world_size == world);
  // Sharded tensors by name, then rank 0's own in file order.
  std::vector<std::string> names;
  for (const auto& [n, t] : c.tensors) names.push_back(n);
  CHECK(names == std::vector<std::string>{"bias", "half", "lora.A", "lora.B", "data.position", "rng.cpu"});
  for (const auto& [name, t] : full) {
    CAPTURE(name);
    CHECK(same(c.tensor(name), t));
  }
  REQUIRE(c.rank_tensors.size() == static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) {
    CAPTURE(r);
    const auto own = own_tensors(r, 20);
    REQUIRE(c.rank_tensors[r].size() == own.size());
    for (const auto& [name, t] : own) {
      const auto it = std::find_if(c.rank_tensors[r].begin(), c.rank_tensors[r].end(),
                                   [&name = name](const auto& e) { return e.first == name; });  // clang 14: no implicit capture of a binding
      REQUIRE(it != c.rank_tensors[r].end());
      CHECK(same(it->second, t));
    }
  }
  CHECK(same(c.tensor("rng.cpu"), own_tensors(0, 20)[0].second));

  // Saving the same step again replaces it.
  const auto full2 = full_tensors(100 + world);
  save_ok(d / "out", world, 20, full2);
  CHECK(entries(d / "out") == std::vector<std::string>{"checkpoint-20"});
  CHECK(same(qlora::load_checkpoint(dir).tensor("lora.A"), full2[0].second));
}

TEST_CASE("sharded checkpoint: world 1 writes the one-file layout with placements", "[checkpoint]") {
  TempDir d("qlora_ckpt_sharded");
  auto comm = qlora::make_single_rank_collective();
  const auto full = full_tensors(1);
  qlora::NamedTensors ts;
  Shards shards;
  rank_args(full, 1, 0, 3, ts, shards);
  const fs::path dir = qlora::save_sharded_checkpoint(d / "out", 3, ts, shards, {{"s", 3}}, 0, *comm);
  CHECK(dir == d / "out" / "checkpoint-3");
  CHECK(entries(dir) == std::vector<std::string>{"manifest.json", "state.json", "tensors.safetensors"});
  const qlora::SafetensorsFile f(dir / "tensors.safetensors");
  CHECK(f.metadata().at("rank") == "0");
  CHECK(f.metadata().at("world_size") == "1");
  CHECK(json::parse(f.metadata().at("shards"))["lora.A"] == json::array({0, 7, 7}));

  const qlora::Checkpoint c = qlora::load_checkpoint(dir);
  CHECK(c.world_size == 1);
  CHECK(c.tensors.size() == full.size() + 2);
  for (const auto& [name, t] : full) CHECK(same(c.tensor(name), t));
  REQUIRE(c.rank_tensors.size() == 1);
  CHECK(c.rank_tensors[0].size() == 2);  // the non-sharded ones
  CHECK(same(c.tensor("data.position"), own_tensors(0, 3)[1].second));

  // Arguments are checked: a shard whose dim 0 is not its placement's rows, an unknown name.
  Shards bad = shards;
  bad[0].second.rows = 6;
  CHECK_THROWS_WITH(qlora::save_sharded_checkpoint(d / "out", 4, ts, bad, {}, 0, *comm),
                    ContainsSubstring("tensor 'lora.A' has shape [7, 5]"));
  bad = shards;
  bad.emplace_back("nope", qlora::ShardPlacement{0, 1, 1});
  CHECK_THROWS_WITH(qlora::save_sharded_checkpoint(d / "out", 4, ts, bad, {}, 0, *comm),
                    ContainsSubstring("'nope' names no tensor"));
  bad = shards;
  bad[0].second = {5, 7, 7};
  CHECK_THROWS_WITH(qlora::save_sharded_checkpoint(d / "out", 4, ts, bad, {}, 0, *comm),
                    ContainsSubstring("placement rows [5, 12)"));
  CHECK(entries(d / "out") == std::vector<std::string>{"checkpoint-3"});
}

TEST_CASE("sharded checkpoint: an old one-file checkpoint loads as world 1", "[checkpoint]") {
  TempDir d("qlora_ckpt_sharded");
  const auto full = full_tensors(2);
  const fs::path dir = qlora::save_checkpoint(d / "out", 8, full, {});
  CHECK(qlora::SafetensorsFile(dir / "tensors.safetensors").metadata().count("shards") == 0);
  const qlora::Checkpoint c = qlora::load_checkpoint(dir);
  CHECK(c.world_size == 1);
  REQUIRE(c.rank_tensors.size() == 1);
  REQUIRE(c.rank_tensors[0].size() == full.size());
  REQUIRE(c.tensors.size() == full.size());
  for (size_t i = 0; i < c.tensors.size(); ++i) CHECK(c.rank_tensors[0][i].first == c.tensors[i].first);
  for (const auto& [name, t] : full) CHECK(same(c.tensor(name), t));
}

TEST_CASE("sharded checkpoint: keep_last prunes", "[checkpoint]") {
  TempDir d("qlora_ckpt_sharded");
  const auto full = full_tensors(3);
  for (int s = 1; s <= 4; ++s) save_ok(d / "out", 2, s * 10, full, /*keep_last=*/2);
  CHECK(entries(d / "out") == std::vector<std::string>{"checkpoint-30", "checkpoint-40"});
  save_ok(d / "out", 3, 15, full, /*keep_last=*/1);  // a lower step just written survives
  CHECK(entries(d / "out") == std::vector<std::string>{"checkpoint-15"});
}

TEST_CASE("sharded checkpoint: a failing rank makes every rank throw, nothing is left", "[checkpoint]") {
  TempDir d("qlora_ckpt_sharded");
  const fs::path out = d / "out";
  const auto full = full_tensors(4);
  const fs::path prev = save_ok(out, 2, 5, full);
  const std::string prev_manifest = read_file(prev / "manifest.json");

  int bad_rank = 1;
  std::string bad_msg;
  std::function<void(qlora::NamedTensors&, Shards&)> spoil;
  SECTION("rank 1: a shard's rows do not match its placement") {
    spoil = [](qlora::NamedTensors&, Shards& s) { s[0].second.rows -= 1; };  // lora.A: 3 rows at 4
    bad_msg = "expected dim 0 == 2";
  }
  SECTION("rank 1: its write fails (a name given twice)") {
    spoil = [](qlora::NamedTensors& t, Shards&) { t.push_back(t[0]); };
    bad_msg = "given twice";
  }
  SECTION("rank 0: a placement naming no tensor") {
    bad_rank = 0;
    spoil = [](qlora::NamedTensors&, Shards& s) { s.emplace_back("ghost", qlora::ShardPlacement{0, 1, 2}); };
    bad_msg = "'ghost' names no tensor";
  }
  const auto res = run_ranks(2, [&](int r, qlora::Collective& comm) {
    qlora::NamedTensors ts;
    Shards shards;
    rank_args(full, 2, r, 6, ts, shards);
    if (r == bad_rank) spoil(ts, shards);
    return qlora::save_sharded_checkpoint(out, 6, ts, shards, {}, 1, comm);
  });
  const std::string bad_file = rank_file(bad_rank, 2);
  for (int r = 0; r < 2; ++r) {
    CAPTURE(r, res[r].error);
    REQUIRE(res[r].threw);
    CHECK_THAT(res[r].error, ContainsSubstring(bad_file));
    CHECK_THAT(res[r].error, !ContainsSubstring("not a UserError"));
    if (r == bad_rank) CHECK_THAT(res[r].error, ContainsSubstring(bad_msg));
    else CHECK_THAT(res[r].error, ContainsSubstring("rank " + std::to_string(bad_rank)));
  }
  CHECK(entries(out) == std::vector<std::string>{"checkpoint-5"});  // no checkpoint-6, no temp dir
  CHECK(read_file(prev / "manifest.json") == prev_manifest);
  const qlora::Checkpoint c = qlora::load_checkpoint(prev);
  for (const auto& [name, t] : full) CHECK(same(c.tensor(name), t));
}

TEST_CASE("sharded checkpoint: a damaged or incomplete set is named", "[checkpoint]") {
  TempDir d("qlora_ckpt_sharded");
  const fs::path out = d / "out";
  const auto full = full_tensors(5);
  const fs::path older = save_ok(out, 3, 10, full);
  const fs::path dir = save_ok(out, 3, 20, full);
  const fs::path r1 = dir / rank_file(1, 3);

  SECTION("a truncated rank file") {
    fs::resize_file(r1, fs::file_size(r1) - 4);
    CHECK_THROWS_WITH(qlora::verify_checkpoint(dir), ContainsSubstring(r1.string()) && ContainsSubstring("truncated"));
    CHECK_THAT(load_error(dir), ContainsSubstring(r1.string()));
    CHECK(qlora::find_latest_checkpoint(out) == older);
  }
  SECTION("a deleted rank file") {
    fs::remove(r1);
    CHECK_THAT(load_error(dir), ContainsSubstring(rank_file(1, 3) + ": missing"));
  }
  SECTION("a rank file deleted and dropped from the manifest") {
    fs::remove(r1);
    json m = json::parse(read_file(dir / "manifest.json"));
    m["files"].erase(rank_file(1, 3));
    write_file(dir / "manifest.json", m.dump());
    CHECK_THAT(load_error(dir), ContainsSubstring("lists no " + rank_file(1, 3)) && ContainsSubstring("rank 1 of 3"));
  }
  SECTION("rank files of two world sizes") {
    json m = json::parse(read_file(dir / "manifest.json"));
    m["files"][rank_file(3, 4)] = m["files"][rank_file(0, 3)];
    write_file(dir / "manifest.json", m.dump());
    CHECK_THAT(load_error(dir), ContainsSubstring("world size 3 and 4"));
  }
  SECTION("metadata naming another rank") {
    const qlora::SafetensorsFile f(r1);
    auto meta = f.metadata();
    meta["rank"] = "2";
    qlora::NamedTensors ts;
    for (const auto& n : f.names()) ts.emplace_back(n, f.tensor(n));
    rewrite_rank_file(dir, rank_file(1, 3), ts, meta);
    CHECK_THAT(load_error(dir), ContainsSubstring(r1.string()) && ContainsSubstring("rank '2' (expected 1"));
  }
  SECTION("shards metadata that is not JSON, or of the wrong types") {
    const qlora::SafetensorsFile f(r1);
    auto meta = f.metadata();
    qlora::NamedTensors ts;
    for (const auto& n : f.names()) ts.emplace_back(n, f.tensor(n));
    meta["shards"] = "{\"lora.A\": [3, 3";
    rewrite_rank_file(dir, rank_file(1, 3), ts, meta);
    CHECK_THAT(load_error(dir), ContainsSubstring(r1.string()) && ContainsSubstring("not a JSON object"));
    meta["shards"] = R"({"lora.A": ["3", 3, 7]})";
    rewrite_rank_file(dir, rank_file(1, 3), ts, meta);
    CHECK_THAT(load_error(dir), ContainsSubstring(r1.string()) && ContainsSubstring("entry of 'lora.A'"));
    meta.erase("shards");
    rewrite_rank_file(dir, rank_file(1, 3), ts, meta);
    CHECK_THAT(load_error(dir), ContainsSubstring(r1.string()) && ContainsSubstring("no 'shards'"));
  }
}

TEST_CASE("sharded checkpoint: rows must cover each tensor exactly once", "[checkpoint]") {
  TempDir d("qlora_ckpt_sharded");
  // Each rank saves "w" with the given placement (and matching rows); the save does not compare
  // ranks, the load does.
  struct Case {
    const char* what;
    qlora::ShardPlacement p0, p1;
    int64_t cols1;
    at::ScalarType dtype1;
    const char* error;
    int named_rank;
  };
  const Case cs[] = {
      {"overlap", {0, 3, 4}, {2, 2, 4}, 3, at::kFloat, "rows [2, 4) of 'w' overlap rows [0, 3)", 1},
      {"gap", {0, 1, 4}, {2, 2, 4}, 3, at::kFloat, "'w' starts at row 2 but no rank file holds rows [1, 2)", 1},
      {"short", {0, 2, 4}, {2, 1, 4}, 3, at::kFloat, "no rank file holds rows [3, 4) of 'w'", 1},
      {"global rows differ", {0, 2, 4}, {2, 3, 5}, 3, at::kFloat, "of 5 global rows", 1},
      {"shape", {0, 2, 4}, {2, 2, 4}, 4, at::kFloat, "shard of 'w' is F32 [2, 4]", 1},
      {"dtype", {0, 2, 4}, {2, 2, 4}, 3, at::kBFloat16, "shard of 'w' is BF16", 1},
  };
  int step = 0;
  for (const Case& k : cs) {
    CAPTURE(k.what);
    ++step;
    const auto res = run_ranks(2, [&](int r, qlora::Collective& comm) {
      const auto& p = r == 0 ? k.p0 : k.p1;
      const at::Tensor w = at::randn({p.rows, r == 0 ? 3 : k.cols1}).to(r == 0 ? at::kFloat : k.dtype1);
      return qlora::save_sharded_checkpoint(d / "out", step, {{"w", w}}, {{"w", p}}, {}, 0, comm);
    });
    REQUIRE(!res[0].threw);
    REQUIRE(!res[1].threw);
    const std::string err = load_error(res[0].path);
    CHECK_THAT(err, ContainsSubstring(k.error));
    CHECK_THAT(err, ContainsSubstring(rank_file(k.named_rank, 2)));
  }

  // A tensor sharded on one rank and a rank's own on another.
  const auto res = run_ranks(2, [&](int r, qlora::Collective& comm) {
    const Shards s = r == 0 ? Shards{{"w", {0, 2, 2}}} : Shards{};
    return qlora::save_sharded_checkpoint(d / "out", 99, {{"w", at::zeros({2, 2})}}, s, {}, 0, comm);
  });
  REQUIRE(!res[0].threw);
  CHECK_THAT(load_error(res[0].path), ContainsSubstring("'w' is this rank's own here but sharded"));
}
