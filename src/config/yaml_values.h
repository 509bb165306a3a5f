// Typed reads of YAML values with errors that name the key path and where the value came from
// (file:line:column, or the key=value override that set it). Shared by the config parser's
// top-level keys and the dataset entries.
#pragma once
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace qlora::config_detail {

struct ParseContext {
  std::string source;                                // file name (or "<text>")
  std::map<std::string, std::string> override_text;  // key path -> the "key=value" that set it

  // "config.yaml:5:3" or "override 'lora_r=abc'" for the value at `path`.
  std::string where(const std::string& path, const YAML::Node& node) const;
  [[noreturn]] void fail(const std::string& path, const YAML::Node& node, const std::string& what) const;
};

// "a list", "a mapping", "null" or "'text'": what was found, for messages.
std::string describe_found(const YAML::Node& node);

int64_t read_int(const ParseContext& ctx, const std::string& path, const YAML::Node& node, int64_t lo, int64_t hi);
double read_float(const ParseContext& ctx, const std::string& path, const YAML::Node& node, double lo, double hi,
                  bool lo_open, bool hi_open);
bool read_bool(const ParseContext& ctx, const std::string& path, const YAML::Node& node);
std::string read_string(const ParseContext& ctx, const std::string& path, const YAML::Node& node);

template <typename E>
using EnumNames = std::vector<std::pair<const char*, E>>;  // first entry per value is its canonical name

template <typename E>
E read_enum(const ParseContext& ctx, const std::string& path, const YAML::Node& node, const EnumNames<E>& names) {
  std::string text = read_string(ctx, path, node);
  for (const auto& [name, value] : names)
    if (text == name) return value;
  std::string list;
  for (const auto& [name, value] : names) list += (list.empty() ? "" : ", ") + std::string(name);
  ctx.fail(path, node, "expected one of " + list + ", found '" + text + "'");
}

template <typename E>
const char* enum_name(E value, const EnumNames<E>& names) {
  for (const auto& [name, v] : names)
    if (v == value) return name;
  return "?";
}

// Checks that `node` is a mapping without duplicate keys and with only `known` keys (an unknown
// one is reported with the nearest known name).
void check_mapping_keys(const ParseContext& ctx, const std::string& path, const YAML::Node& node,
                        const std::vector<std::string>& known);

}  // namespace qlora::config_detail
