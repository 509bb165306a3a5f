// Typed YAML reads with located errors (see yaml_values.h).
#include "config/yaml_values.h"

#include <cmath>
#include <sstream>
#include <set>

#include "qlora/config.h"
#include "qlora/error.h"

namespace qlora::config_detail {

std::string ParseContext::where(const std::string& path, const YAML::Node& node) const {
  // A value set by an override, inside a subtree an override set, or a subtree an override
  // created on its way names the override.
  auto within = [](const std::string& inner, const std::string& outer) {
    return inner == outer || (inner.size() > outer.size() && inner.compare(0, outer.size(), outer) == 0 &&
                              (inner[outer.size()] == '.' || inner[outer.size()] == '['));
  };
  for (const auto& [opath, text] : override_text)
    if (within(path, opath) || within(opath, path)) return "override '" + text + "'";
  const YAML::Mark mark = node.IsDefined() ? node.Mark() : YAML::Mark::null_mark();
  if (mark.is_null()) return source;
  return source + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
}

void ParseContext::fail(const std::string& path, const YAML::Node& node, const std::string& what) const {
  throw UserError(where(path, node) + ": " + path + ": " + what);
}

std::string describe_found(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return "null";
  if (node.IsSequence()) return "a list";
  if (node.IsMap()) return "a mapping";
  return "'" + node.Scalar() + "'";
}

int64_t read_int(const ParseContext& ctx, const std::string& path, const YAML::Node& node, int64_t lo, int64_t hi) {
  long long v = 0;
  if (!node.IsScalar() || !YAML::convert<long long>::decode(node, v))
    ctx.fail(path, node, "expected an integer, found " + describe_found(node));
  if (v < lo || v > hi)
    ctx.fail(path, node, "expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], found " +
                             std::to_string(v));
  return v;
}

double read_float(const ParseContext& ctx, const std::string& path, const YAML::Node& node, double lo, double hi,
                  bool lo_open, bool hi_open) {
  double v = 0;
  if (!node.IsScalar() || !YAML::convert<double>::decode(node, v) || !std::isfinite(v))
    ctx.fail(path, node, "expected a number, found " + describe_found(node));
  bool ok = (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  if (!ok) {
    auto num = [](double x) {
      std::ostringstream s;
      s << x;
      return s.str();
    };
    ctx.fail(path, node, "expected a number in " + std::string(lo_open ? "(" : "[") + num(lo) + ", " + num(hi) +
                             (hi_open ? ")" : "]") + ", found " + node.Scalar());
  }
  return v;
}

bool read_bool(const ParseContext& ctx, const std::string& path, const YAML::Node& node) {
  bool v = false;
  if (!node.IsScalar() || !YAML::convert<bool>::decode(node, v))
    ctx.fail(path, node, "expected true or false, found " + describe_found(node));
  return v;
}

std::string read_string(const ParseContext& ctx, const std::string& path, const YAML::Node& node) {
  if (!node.IsScalar()) ctx.fail(path, node, "expected a string, found " + describe_found(node));
  return node.Scalar();
}

void check_mapping_keys(const ParseContext& ctx, const std::string& path, const YAML::Node& node,
                        const std::vector<std::string>& known) {
  if (!node.IsMap()) ctx.fail(path.empty() ? "(top level)" : path, node, "expected a mapping of keys, found " + describe_found(node));
  std::set<std::string> seen;
  for (const auto& kv : node) {
    const std::string key = kv.first.Scalar();
    const std::string key_path = path.empty() ? key : path + "." + key;
    if (!seen.insert(key).second) ctx.fail(key_path, kv.first, "duplicate key");
    bool is_known = false;
    for (const auto& k : known) is_known = is_known || k == key;
    if (!is_known) {
      std::string hint = nearest_name(key, known);
      ctx.fail(key_path, kv.first, "unknown key" + (hint.empty() ? std::string() : " (did you mean '" + hint + "'?)"));
    }
  }
}

}  // namespace qlora::config_detail
