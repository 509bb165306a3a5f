// Training metrics on disk (issue 7): metrics.jsonl, one JSON object per line, appended and flushed
// as the run goes and trimmed on resume so that no step appears twice; and the loss-curve picture,
// an SVG drawn from those lines (train loss per step, eval loss points) and written atomically.
#pragma once
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace qlora {

// An open metrics.jsonl. Move-only (it owns the stream).
struct MetricsLog {
  std::filesystem::path path;
  std::ofstream out;
};

// Opens `path` for appending. resume_step < 0: a fresh run, any existing file is emptied.
// resume_step >= 0: a resumed run; lines whose "step" is greater than resume_step (written after
// the checkpoint being resumed) and lines that are not a JSON object (a write cut short by a
// kill) are dropped, the rest kept in order; the trimmed file replaces the old one atomically.
// Errors (a directory that cannot be written) are UserErrors naming the path.
MetricsLog open_metrics_log(const std::filesystem::path& path, int64_t resume_step = -1);

// Writes `record` (a JSON object, by convention with an integer "step") as one line and flushes.
void append_metrics(MetricsLog& log, const nlohmann::json& record);

// Loss points read back from metrics.jsonl lines: "loss" -> train, "eval_loss" -> eval, each at
// its line's "step". Non-finite and malformed values are left out.
struct LossCurve {
  std::vector<std::pair<int64_t, double>> train;
  std::vector<std::pair<int64_t, double>> eval;
};
LossCurve read_loss_curve(const std::filesystem::path& metrics_jsonl);

// An SVG document: train loss as a polyline (one vertex per point, in step order), eval loss as
// circles joined by a dashed line, axes with ticks at round values and labels ("step", "loss"),
// a legend and `title` (XML-escaped). An empty curve draws the axes and "no data".
std::string loss_curve_svg(const LossCurve& curve, const std::string& title);

// loss_curve_svg written atomically to `path` (temp file, fsync, rename).
void write_loss_curve_svg(const std::filesystem::path& path, const LossCurve& curve, const std::string& title);

}  // namespace qlora
