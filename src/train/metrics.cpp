// metrics.jsonl (append-only, trimmed on resume) and the loss-curve SVG drawn from it. The SVG is
// hand-written text: a fixed frame, "nice" ticks (1, 2, 5 x 10^k), one polyline for the train loss
// and circles for the eval loss; no dependency beyond the standard library.
#include "qlora/metrics.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/safetensors.h"  // write_file_atomic

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace qlora {
namespace {

std::vector<std::string> read_lines(const fs::path& path) {
  std::vector<std::string> lines;
  std::ifstream in(path, std::ios::binary);
  if (!in) return lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(line);
  return lines;
}

// The line as a JSON object, or null when it is not one.
json parse_object(const std::string& line) {
  json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return json();
  return j;
}

std::string num(double v, const char* fmt = "%.2f") {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        // Control characters are not allowed in XML 1.0 text.
        if (static_cast<unsigned char>(c) < 0x20 && c != '\t' && c != '\n') out += ' ';
        else out += c;
    }
  }
  return out;
}

// A round tick spacing giving about `target` intervals over `range`.
double nice_step(double range, int target) {
  const double raw = range / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / mag;
  return (f < 1.5 ? 1.0 : f < 3.5 ? 2.0 : f < 7.5 ? 5.0 : 10.0) * mag;
}

struct Axis {
  double lo, hi, step;
};

// Range padded out to whole ticks; a degenerate range is widened around its value.
Axis make_axis(double lo, double hi, int target, bool integer) {
  if (!(hi > lo)) {
    const double pad = integer ? 1.0 : (lo == 0 ? 1.0 : std::abs(lo) * 0.1);
    lo -= pad;
    hi += pad;
  }
  double step = nice_step(hi - lo, target);
  if (integer) step = std::max(1.0, std::round(step));
  return {std::floor(lo / step) * step, std::ceil(hi / step) * step, step};
}

std::string tick_label(double v, double step) {
  if (std::abs(v) < step * 1e-9) v = 0;
  return num(v, "%.6g");
}

}  // namespace

MetricsLog open_metrics_log(const fs::path& path, int64_t resume_step) {
  std::error_code ec;
  if (path.has_parent_path()) fs::create_directories(path.parent_path(), ec);
  if (resume_step < 0) {
    write_file_atomic(path, "");
  } else if (fs::exists(path)) {
    const std::vector<std::string> lines = read_lines(path);
    std::string kept;
    size_t dropped = 0;
    for (const auto& line : lines) {
      if (line.empty()) continue;
      const json j = parse_object(line);
      const bool later = j.is_object() && j.contains("step") && j["step"].is_number() && j["step"].get<double>() > static_cast<double>(resume_step);
      if (j.is_null() || later) { ++dropped; continue; }
      kept += line + "\n";
    }
    if (dropped > 0) {
      log_info(cat(path.string(), ": dropped ", dropped, " line(s) written after step ", resume_step, " (resuming)"));
    }
    // Rewritten even when nothing was dropped: a last line without its newline gets one.
    write_file_atomic(path, kept);
  }
  MetricsLog log;
  log.path = path;
  log.out.open(path, std::ios::binary | std::ios::app);
  if (!log.out) throw UserError(path.string() + ": cannot open for appending (expected a writable metrics file)");
  return log;
}

void append_metrics(MetricsLog& log, const json& record) {
  if (!record.is_object()) throw UserError(log.path.string() + ": metrics record must be a JSON object, found " + record.dump());
  // error_handler replace: a stray non-UTF-8 byte in a string must not end the run.
  log.out << record.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
  errno = 0;
  log.out.flush();
  // The stream keeps no errno of its own; the failed write(2) of the flush leaves it set.
  if (!log.out) throw WriteError(log.path.string() + ": write failed: " + (errno != 0 ? std::strerror(errno) : "disk full?"));
}

LossCurve read_loss_curve(const fs::path& metrics_jsonl) {
  LossCurve c;
  for (const auto& line : read_lines(metrics_jsonl)) {
    const json j = parse_object(line);
    if (!j.is_object() || !j.contains("step") || !j["step"].is_number()) continue;
    const auto step = static_cast<int64_t>(j["step"].get<double>());
    for (auto [key, dst] : {std::pair{"loss", &c.train}, std::pair{"eval_loss", &c.eval}}) {
      if (!j.contains(key) || !j[key].is_number()) continue;
      const double v = j[key].get<double>();
      if (std::isfinite(v)) dst->emplace_back(step, v);
    }
  }
  auto by_step = [](const auto& a, const auto& b) { return a.first < b.first; };
  std::stable_sort(c.train.begin(), c.train.end(), by_step);
  std::stable_sort(c.eval.begin(), c.eval.end(), by_step);
  return c;
}

std::string loss_curve_svg(const LossCurve& curve, const std::string& title) {
  const double W = 800, H = 480, left = 80, right = 24, top = 48, bottom = 64;
  const double pw = W - left - right, ph = H - top - bottom;
  std::vector<std::pair<int64_t, double>> train, eval;
  for (const auto& p : curve.train) if (std::isfinite(p.second)) train.push_back(p);
  for (const auto& p : curve.eval) if (std::isfinite(p.second)) eval.push_back(p);
  const bool empty = train.empty() && eval.empty();

  double x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (!empty) {
    x0 = y0 = INFINITY;
    x1 = y1 = -INFINITY;
    for (const auto* v : {&train, &eval})
      for (const auto& [s, l] : *v) {
        x0 = std::min(x0, static_cast<double>(s)); x1 = std::max(x1, static_cast<double>(s));
        y0 = std::min(y0, l); y1 = std::max(y1, l);
      }
  }
  const Axis ax = make_axis(x0, x1, 8, /*integer=*/true);
  const Axis ay = make_axis(y0, y1, 6, /*integer=*/false);
  auto X = [&](double s) { return left + (s - ax.lo) / (ax.hi - ax.lo) * pw; };
  auto Y = [&](double l) { return top + (ay.hi - l) / (ay.hi - ay.lo) * ph; };

  std::ostringstream o;
  o << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
    << " " << H << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect x=\"0\" y=\"0\" width=\"" << W << "\" height=\"" << H << "\" fill=\"white\"/>\n"
    << "<text x=\"" << W / 2 << "\" y=\"28\" text-anchor=\"middle\" font-size=\"16\">" << xml_escape(title) << "</text>\n";
  // Grid, ticks and tick labels.
  o << "<g class=\"x-axis\" stroke=\"#ccc\">\n";
  for (double v = ax.lo; v <= ax.hi + ax.step * 1e-9; v += ax.step) {
    const std::string x = num(X(v));
    o << "<line x1=\"" << x << "\" y1=\"" << top << "\" x2=\"" << x << "\" y2=\"" << top + ph + 5 << "\"/>"
      << "<text x=\"" << x << "\" y=\"" << top + ph + 20 << "\" text-anchor=\"middle\" stroke=\"none\" fill=\"black\">"
      << tick_label(v, ax.step) << "</text>\n";
  }
  o << "</g>\n<g class=\"y-axis\" stroke=\"#ccc\">\n";
  for (double v = ay.lo; v <= ay.hi + ay.step * 1e-9; v += ay.step) {
    const std::string y = num(Y(v));
    o << "<line x1=\"" << left - 5 << "\" y1=\"" << y << "\" x2=\"" << left + pw << "\" y2=\"" << y << "\"/>"
      << "<text x=\"" << left - 8 << "\" y=\"" << y << "\" dy=\"4\" text-anchor=\"end\" stroke=\"none\" fill=\"black\">"
      << tick_label(v, ay.step) << "</text>\n";
  }
  o << "</g>\n";
  // Frame and axis labels.
  o << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << pw << "\" height=\"" << ph
    << "\" fill=\"none\" stroke=\"black\"/>\n"
    << "<text x=\"" << left + pw / 2 << "\" y=\"" << H - 16 << "\" text-anchor=\"middle\">step</text>\n"
    << "<text x=\"20\" y=\"" << top + ph / 2 << "\" text-anchor=\"middle\" transform=\"rotate(-90 20 " << top + ph / 2
    << ")\">loss</text>\n";
  if (empty) {
    o << "<text x=\"" << left + pw / 2 << "\" y=\"" << top + ph / 2 << "\" text-anchor=\"middle\" fill=\"#888\">no data</text>\n";
  }
  if (!train.empty()) {
    o << "<polyline class=\"train-loss\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"";
    for (size_t i = 0; i < train.size(); ++i)
      o << (i ? " " : "") << num(X(static_cast<double>(train[i].first))) << "," << num(Y(train[i].second));
    o << "\"/>\n";
  }
  if (!eval.empty()) {
    o << "<g class=\"eval-loss\" fill=\"#d62728\">\n";
    if (eval.size() > 1) {
      o << "<polyline fill=\"none\" stroke=\"#d62728\" stroke-dasharray=\"4 3\" points=\"";
      for (size_t i = 0; i < eval.size(); ++i)
        o << (i ? " " : "") << num(X(static_cast<double>(eval[i].first))) << "," << num(Y(eval[i].second));
      o << "\"/>\n";
    }
    for (const auto& [s, l] : eval)
      o << "<circle cx=\"" << num(X(static_cast<double>(s))) << "\" cy=\"" << num(Y(l)) << "\" r=\"3.5\"><title>step " << s
        << ": eval loss " << num(l, "%.6g") << "</title></circle>\n";
    o << "</g>\n";
  }
  // Legend, top right inside the frame.
  const double lx = left + pw - 150, ly = top + 16;
  o << "<g class=\"legend\">\n"
    << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 24 << "\" y2=\"" << ly
    << "\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/><text x=\"" << lx + 30 << "\" y=\"" << ly + 4 << "\">train loss</text>\n"
    << "<circle cx=\"" << lx + 12 << "\" cy=\"" << ly + 18 << "\" r=\"3.5\" fill=\"#d62728\"/><text x=\"" << lx + 30
    << "\" y=\"" << ly + 22 << "\">eval loss</text>\n"
    << "</g>\n</svg>\n";
  return o.str();
}

void write_loss_curve_svg(const fs::path& path, const LossCurve& curve, const std::string& title) {
  write_file_atomic(path, loss_curve_svg(curve, title));
}

}  // namespace qlora
