// key=value overrides applied to the parsed YAML tree before typed parsing, so that they pass
// through the same strict checks as keys written in the file.
#pragma once
#include <yaml-cpp/yaml.h>

#include <string>
#include <vector>

#include "config/yaml_values.h"

namespace qlora::config_detail {

// Paths: "lora_r", "datasets.0.path", "datasets[0].path". The value is parsed as YAML ("32" is a
// number, "[q_proj,v_proj]" a list, "null" unsets an optional string). An index may be the list's
// size, to append an entry. Records each override's text in ctx.override_text for error messages.
void apply_overrides(YAML::Node& root, const std::vector<std::string>& overrides, ParseContext& ctx);

}  // namespace qlora::config_detail
