// metrics.jsonl (flushed lines, trimmed on resume, torn last line dropped) and the loss-curve SVG
// (well-formed tags, every point present, title escaped, written atomically).
#include "qlora/error.h"
#include "qlora/metrics.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "test_util.h"

using Catch::Matchers::ContainsSubstring;
using qlora::test::read_file;
using qlora::test::TempDir;
using qlora::test::write_file;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::vector<json> read_records(const fs::path& p) {
  std::vector<json> out;
  std::istringstream in(read_file(p));
  std::string line;
  while (std::getline(in, line)) out.push_back(json::parse(line));  // throws on a bad line
  return out;
}

// Tags balance: every <x ...> is closed by </x> in order, <x .../> closes itself; <?...?> and
// comments are skipped; no stray '<' or '&' in text (entities only).
bool well_formed(const std::string& s, std::string& why) {
  std::vector<std::string> stack;
  size_t i = 0;
  int roots = 0;
  while (i < s.size()) {
    if (s[i] == '&') {
      static const std::regex ent("^&(amp|lt|gt|quot|apos);");
      if (!std::regex_search(s.substr(i, 8), ent)) { why = "bad entity at " + std::to_string(i); return false; }
      ++i;
      continue;
    }
    if (s[i] != '<') { ++i; continue; }
    const size_t end = s.find('>', i);
    if (end == std::string::npos) { why = "unclosed tag at " + std::to_string(i); return false; }
    const std::string tag = s.substr(i + 1, end - i - 1);
    i = end + 1;
    if (tag.rfind("?", 0) == 0 || tag.rfind("!--", 0) == 0) continue;
    if (tag.find('<') != std::string::npos) { why = "'<' inside a tag: " + tag; return false; }
    if (tag[0] == '/') {
      if (stack.empty() || stack.back() != tag.substr(1)) { why = "mismatched </" + tag.substr(1) + ">"; return false; }
      stack.pop_back();
      continue;
    }
    // Attribute quotes balance.
    if (std::count(tag.begin(), tag.end(), '"') % 2 != 0) { why = "unbalanced quotes in <" + tag + ">"; return false; }
    const std::string name = tag.substr(0, tag.find_first_of(" \t\n/"));
    if (stack.empty()) ++roots;
    if (tag.back() != '/') stack.push_back(name);
  }
  if (!stack.empty()) { why = "unclosed <" + stack.back() + ">"; return false; }
  if (roots != 1) { why = "expected one root element, found " + std::to_string(roots); return false; }
  return true;
}

size_t count_of(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("metrics.jsonl: one flushed JSON object per line", "[metrics]") {
  TempDir d("qlora_metrics_test");
  qlora::MetricsLog log = qlora::open_metrics_log(d / "out/metrics.jsonl");
  for (int s = 1; s <= 3; ++s) {
    qlora::append_metrics(log, {{"step", s}, {"loss", 2.0 / s}, {"lr", 1e-4}});
    // Readable before the log is closed: each line is flushed.
    CHECK(read_records(d / "out/metrics.jsonl").size() == static_cast<size_t>(s));
  }
  qlora::append_metrics(log, {{"step", 3}, {"eval_loss", 1.5}});
  const auto recs = read_records(d / "out/metrics.jsonl");
  REQUIRE(recs.size() == 4);
  CHECK(recs[1]["step"] == 2);
  CHECK(recs[1]["loss"] == 1.0);
  CHECK(recs[3]["eval_loss"] == 1.5);
  CHECK_THROWS_WITH(qlora::append_metrics(log, json::array({1, 2})), ContainsSubstring("must be a JSON object"));
}

TEST_CASE("metrics.jsonl: a fresh run empties the file; a resumed one drops lines after its step", "[metrics]") {
  TempDir d("qlora_metrics_test");
  const fs::path p = d / "metrics.jsonl";
  {
    qlora::MetricsLog log = qlora::open_metrics_log(p);
    for (int s = 1; s <= 8; ++s) qlora::append_metrics(log, {{"step", s}, {"loss", 1.0}});
    qlora::append_metrics(log, {{"step", 5}, {"eval_loss", 0.9}});  // eval of step 5, after step 8's line
  }
  // A kill in the middle of a write leaves a torn last line.
  write_file(p, read_file(p) + "{\"step\": 9, \"lo");
  {
    qlora::MetricsLog log = qlora::open_metrics_log(p, /*resume_step=*/5);
    auto recs = read_records(p);
    REQUIRE(recs.size() == 6);  // steps 1..5 and the eval at 5
    CHECK(recs[4]["step"] == 5);
    CHECK(recs[5]["eval_loss"] == 0.9);
    qlora::append_metrics(log, {{"step", 6}, {"loss", 0.5}});
  }
  auto recs = read_records(p);
  REQUIRE(recs.size() == 7);
  CHECK(recs.back()["step"] == 6);
  // Steps appear once each.
  std::set<int> train_steps;
  for (const auto& r : recs)
    if (r.contains("loss")) CHECK(train_steps.insert(r["step"].get<int>()).second);
  // No temp file left next to it.
  int files = 0;
  for (const auto& e : fs::directory_iterator(d.path)) { ++files; (void)e; }
  CHECK(files == 1);
  // Resuming at a step past the end keeps everything; a fresh open empties it.
  { qlora::MetricsLog log = qlora::open_metrics_log(p, 100); }
  CHECK(read_records(p).size() == 7);
  { qlora::MetricsLog log = qlora::open_metrics_log(p); }
  CHECK(read_file(p).empty());
  // Resuming without a file is fine.
  { qlora::MetricsLog log = qlora::open_metrics_log(d / "new.jsonl", 3); }
  CHECK(fs::exists(d / "new.jsonl"));
}

TEST_CASE("loss curve SVG: well-formed, every point present, title escaped", "[metrics]") {
  qlora::LossCurve c;
  for (int s = 1; s <= 57; ++s) c.train.emplace_back(s, 3.0 * std::exp(-s / 20.0) + 0.1);
  c.train.emplace_back(58, std::nan(""));  // left out
  for (int s = 10; s <= 50; s += 10) c.eval.emplace_back(s, 2.0 * std::exp(-s / 25.0) + 0.3);
  const std::string svg = qlora::loss_curve_svg(c, "tiny-llama <qlora> & \"friends\"");
  std::string why;
  CHECK(well_formed(svg, why));
  CAPTURE(why);
  CHECK(svg.rfind("<?xml", 0) == 0);
  CHECK_THAT(svg, ContainsSubstring("<svg xmlns=\"http://www.w3.org/2000/svg\""));
  CHECK_THAT(svg, ContainsSubstring("tiny-llama &lt;qlora&gt; &amp; &quot;friends&quot;"));
  CHECK_THAT(svg, ContainsSubstring(">step</text>"));
  CHECK_THAT(svg, ContainsSubstring(">loss</text>"));
  // The train polyline has one vertex per finite point.
  const size_t a = svg.find("class=\"train-loss\"");
  REQUIRE(a != std::string::npos);
  const size_t p0 = svg.find("points=\"", a) + 8;
  const std::string pts = svg.substr(p0, svg.find('"', p0) - p0);
  CHECK(count_of(pts, ",") == 57);
  // One circle per eval point (plus the legend's), each titled with its step and value.
  CHECK(count_of(svg, "<title>step ") == 5);
  CHECK_THAT(svg, ContainsSubstring("<title>step 30: eval loss "));
  CHECK(count_of(svg, "<circle") == 6);
  // Tick labels: the x axis covers steps 1..58 with round ticks.
  CHECK_THAT(svg, ContainsSubstring(">50</text>"));
  CHECK(svg.find("nan") == std::string::npos);
}

TEST_CASE("loss curve SVG: read from metrics.jsonl, written atomically; edge cases", "[metrics]") {
  TempDir d("qlora_metrics_test");
  {
    qlora::MetricsLog log = qlora::open_metrics_log(d / "metrics.jsonl");
    qlora::append_metrics(log, {{"step", 1}, {"loss", 2.5}, {"lr", 0.0}});
    qlora::append_metrics(log, {{"step", 2}, {"loss", 2.25}});
    qlora::append_metrics(log, {{"step", 2}, {"eval_loss", 2.4}});
    qlora::append_metrics(log, {{"step", 3}, {"loss", "bad"}});
  }
  const qlora::LossCurve c = qlora::read_loss_curve(d / "metrics.jsonl");
  REQUIRE(c.train.size() == 2);
  CHECK(c.train[1] == std::pair<int64_t, double>(2, 2.25));
  REQUIRE(c.eval.size() == 1);
  CHECK(c.eval[0].second == 2.4);
  qlora::write_loss_curve_svg(d / "loss.svg", c, "run");
  std::string why;
  CHECK(well_formed(read_file(d / "loss.svg"), why));
  int files = 0;
  for (const auto& e : fs::directory_iterator(d.path)) { ++files; (void)e; }
  CHECK(files == 2);

  // No points: axes and "no data"; one point (degenerate ranges) still well-formed.
  const std::string empty = qlora::loss_curve_svg({}, "empty");
  CHECK(well_formed(empty, why));
  CHECK_THAT(empty, ContainsSubstring("no data"));
  qlora::LossCurve one;
  one.train.emplace_back(1, 0.0);
  const std::string single = qlora::loss_curve_svg(one, "one");
  CHECK(well_formed(single, why));
  CHECK(single.find("nan") == std::string::npos);
  CHECK(single.find("inf") == std::string::npos);
}
