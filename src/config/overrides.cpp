// key=value overrides on the YAML tree (see overrides.h).
#include "config/overrides.h"

#include "qlora/error.h"

namespace qlora::config_detail {
namespace {

struct PathToken {
  std::string key;   // a map key, or
  long index = -1;   // a list index (>= 0)
};

bool all_digits(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

// A list index of all digits; more than 9 of them would overflow std::stol (an exception that is no
// UserError) and is past the end of any list anyway.
long list_index(const std::string& digits, const std::string& text) {
  if (digits.size() > 9) throw UserError("override '" + text + "': list index " + digits + " is too large");
  return std::stol(digits);
}

// "datasets[0].path" and "datasets.0.path" -> [datasets, 0, path]
std::vector<PathToken> split_path(const std::string& path, const std::string& text) {
  std::vector<PathToken> tokens;
  std::string cur;
  auto push = [&](bool allow_index) {
    if (cur.empty()) throw UserError("override '" + text + "': empty component in key path '" + path + "'");
    PathToken t;
    if (allow_index && all_digits(cur)) t.index = list_index(cur, text); else t.key = cur;
    tokens.push_back(t);
    cur.clear();
  };
  for (size_t i = 0; i < path.size(); ++i) {
    char c = path[i];
    if (c == '.') {
      push(!tokens.empty());
    } else if (c == '[') {
      if (!cur.empty()) push(!tokens.empty());
      size_t close = path.find(']', i);
      std::string idx = close == std::string::npos ? "" : path.substr(i + 1, close - i - 1);
      if (!all_digits(idx)) throw UserError("override '" + text + "': expected [N] with a list index in '" + path + "'");
      tokens.push_back({"", list_index(idx, text)});
      i = close;
      if (i + 1 < path.size() && path[i + 1] == '.') ++i;
    } else {
      cur += c;
    }
  }
  if (!cur.empty() || tokens.empty()) push(!tokens.empty());
  return tokens;
}

}  // namespace

void apply_overrides(YAML::Node& root, const std::vector<std::string>& overrides, ParseContext& ctx) {
  for (const std::string& text : overrides) {
    const size_t eq = text.find('=');
    if (eq == std::string::npos || eq == 0)
      throw UserError("override '" + text + "': expected key=value (for example lora_r=32)");
    const std::string path = text.substr(0, eq);
    YAML::Node value;
    try {
      value = YAML::Load(text.substr(eq + 1));
    } catch (const YAML::ParserException& e) {
      throw UserError("override '" + text + "': the value is not valid YAML: " + e.msg);
    }
    const std::vector<PathToken> tokens = split_path(path, text);

    // Walk to the parent of the last token, creating maps on the way. Node::reset rebinds the
    // handle; plain assignment would overwrite the node it points at.
    YAML::Node cur;
    cur.reset(root);
    std::string norm;  // normalized path, as the parser names keys: datasets[0].path
    for (size_t i = 0; i < tokens.size(); ++i) {
      const PathToken& t = tokens[i];
      const bool last = i + 1 == tokens.size();
      YAML::Node next;
      if (t.index >= 0) {
        norm.append("[").append(std::to_string(t.index)).append("]");  // (operator+ trips GCC 12's -Wrestrict)
        if (!cur.IsSequence())
          throw UserError("override '" + text + "': '" + norm + "' indexes something that is not a list");
        const long size = static_cast<long>(cur.size());
        if (t.index > size)
          throw UserError("override '" + text + "': index " + std::to_string(t.index) + " is past the end of a list of " +
                          std::to_string(size));
        if (t.index == size) cur.push_back(YAML::Node(last ? YAML::NodeType::Null : YAML::NodeType::Map));
        if (last) {
          cur[t.index] = value;
          break;
        }
        next.reset(cur[t.index]);
      } else {
        norm += (norm.empty() ? "" : ".") + t.key;
        if (!cur.IsMap() && !cur.IsNull())
          throw UserError("override '" + text + "': '" + norm + "' is inside something that is not a mapping");
        if (last) {
          cur[t.key] = value;
          break;
        }
        if (!cur[t.key]) cur[t.key] = YAML::Node(tokens[i + 1].index >= 0 ? YAML::NodeType::Sequence : YAML::NodeType::Map);
        next.reset(cur[t.key]);
      }
      cur.reset(next);
    }
    ctx.override_text[norm] = text;
  }
}

}  // namespace qlora::config_detail
