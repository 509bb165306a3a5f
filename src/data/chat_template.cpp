// Chat templates, everything but the rendering (chat_template_render.cpp): conversations read from
// the JSON users keep in datasets, Python-compatible JSON output (HF's tojson), template names and
// recognising a tokenizer's Jinja template by its markers.
#include "qlora/chat_template.h"

#include "qlora/error.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>

namespace qlora {

namespace {

using ojson = nlohmann::ordered_json;

// A string value for error messages: short, on one line.
std::string show(const ojson& v) {
  std::string s = v.dump();
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

std::string type_of(const ojson& v) { return std::string(v.type_name()) + " " + show(v); }

std::string string_field(const ojson& obj, const char* key, const std::string& at, bool required) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    if (required) throw UserError(at + ": missing \"" + key + "\" (expected a string)");
    return "";
  }
  if (!it->is_string()) throw UserError(at + "." + key + ": expected a string, found " + type_of(*it));
  return it->get<std::string>();
}

ToolCall tool_call_from_json(const ojson& j, const std::string& at) {
  if (!j.is_object()) throw UserError(at + ": expected an object {id, type, function: {name, arguments}}, found " + type_of(j));
  ToolCall call;
  call.id = string_field(j, "id", at, false);
  // OpenAI nests name/arguments under "function"; HF templates also take them flat.
  const ojson* fn = &j;
  std::string fn_at = at;
  if (const auto it = j.find("function"); it != j.end()) {
    if (!it->is_object()) throw UserError(at + ".function: expected an object {name, arguments}, found " + type_of(*it));
    fn = &*it;
    fn_at = at + ".function";
  }
  call.name = string_field(*fn, "name", fn_at, true);
  const auto a = fn->find("arguments");
  if (a == fn->end() || a->is_null()) throw UserError(fn_at + ": missing \"arguments\" (expected an object or a JSON string of one)");
  if (a->is_string()) {
    try {
      call.arguments = ojson::parse(a->get<std::string>());
    } catch (const ojson::exception&) {  // parse_error, or out_of_range for a number like 1e999
      throw UserError(fn_at + ".arguments: expected a JSON object in the string, found " + show(*a));
    }
    if (!call.arguments.is_object())
      throw UserError(fn_at + ".arguments: expected a JSON object in the string, found " + show(*a));
  } else if (a->is_object()) {
    call.arguments = *a;
  } else {
    throw UserError(fn_at + ".arguments: expected an object or a JSON string of one, found " + type_of(*a));
  }
  return call;
}

ChatMessage message_from_json(const ojson& j, const std::string& at) {
  if (!j.is_object()) throw UserError(at + ": expected an object {role, content}, found " + type_of(j));
  ChatMessage m;
  m.role = string_field(j, "role", at, true);
  if (m.role == "ipython") m.role = "tool";  // Llama 3.1's name for the tool turn
  if (m.role != "system" && m.role != "user" && m.role != "assistant" && m.role != "tool")
    throw UserError(at + ".role: expected one of system, user, assistant, tool, found \"" + m.role + "\"");
  if (const auto tc = j.find("tool_calls"); tc != j.end() && !tc->is_null()) {
    if (m.role != "assistant") throw UserError(at + ".tool_calls: only an assistant turn may call tools (role is " + m.role + ")");
    if (!tc->is_array()) throw UserError(at + ".tool_calls: expected an array, found " + type_of(*tc));
    for (size_t i = 0; i < tc->size(); ++i)
      m.tool_calls.push_back(tool_call_from_json((*tc)[i], at + ".tool_calls[" + std::to_string(i) + "]"));
  }
  const auto c = j.find("content");
  if (c == j.end() || c->is_null()) {
    if (m.tool_calls.empty()) throw UserError(at + ": missing \"content\" (expected a string; null only with tool_calls)");
  } else if (!c->is_string()) {
    throw UserError(at + ".content: expected a string, found " + type_of(*c));
  } else {
    m.content = c->get<std::string>();
  }
  if (m.role == "tool") {
    m.tool_call_id = string_field(j, "tool_call_id", at, false);
    m.name = string_field(j, "name", at, false);
  }
  return m;
}

}  // namespace

Conversation conversation_from_json(const ojson& messages, const ojson& tools, const std::string& where) {
  Conversation conv;
  if (!messages.is_array()) throw UserError(where + ": messages: expected an array of {role, content}, found " + type_of(messages));
  if (messages.empty()) throw UserError(where + ": messages: expected at least one message, found []");
  for (size_t i = 0; i < messages.size(); ++i)
    conv.messages.push_back(message_from_json(messages[i], where + ": messages[" + std::to_string(i) + "]"));
  if (!tools.is_null()) {
    if (!tools.is_array()) throw UserError(where + ": tools: expected an array of {type, function}, found " + type_of(tools));
    for (size_t i = 0; i < tools.size(); ++i) {
      const ojson& t = tools[i];
      const std::string at = where + ": tools[" + std::to_string(i) + "]";
      if (!t.is_object()) throw UserError(at + ": expected an object {type: function, function: {...}}, found " + type_of(t));
      const ojson& fn = t.contains("function") ? t.at("function") : t;
      if (!fn.is_object() || !fn.contains("name") || !fn.at("name").is_string())
        throw UserError(at + ": expected a function with a string \"name\", found " + show(t));
    }
    conv.tools = tools;
  }
  return conv;
}

Conversation conversation_from_json(const nlohmann::json& messages, const nlohmann::json& tools, const std::string& where) {
  return conversation_from_json(ojson(messages), ojson(tools), where);
}

Conversation alpaca_conversation(const std::string& instruction, const std::string& input, const std::string& output) {
  Conversation conv;
  conv.messages.push_back({"user", instruction, {}, "", ""});
  if (!input.empty()) conv.messages.push_back({"user", input, {}, "", ""});
  conv.messages.push_back({"assistant", output, {}, "", ""});
  return conv;
}

// ---- Python's json.dumps ----------------------------------------------------------------------

namespace {

void dump_string(const std::string& s, std::string& out) {
  // ensure_ascii=False: only '"', '\\' and control characters are escaped.
  out += '"';
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

// float.__repr__: the shortest round-tripping digits, fixed notation for exponents -4..15.
void dump_float(double d, std::string& out) {
  if (std::isnan(d)) { out += "NaN"; return; }
  if (std::isinf(d)) { out += d < 0 ? "-Infinity" : "Infinity"; return; }
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // [-]d[.ddd]e[+-]xx
  std::string sign;
  if (sci[0] == '-') { sign = "-"; sci.erase(0, 1); }
  const size_t e = sci.find('e');
  const int exp10 = std::stoi(sci.substr(e + 1));
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  out += sign;
  if (exp10 >= -4 && exp10 < 16) {
    const int decpt = exp10 + 1;
    if (decpt <= 0) {
      out += "0." + std::string(static_cast<size_t>(-decpt), '0') + digits;
    } else if (static_cast<size_t>(decpt) >= digits.size()) {
      out += digits + std::string(decpt - digits.size(), '0') + ".0";
    } else {
      out += digits.substr(0, decpt) + "." + digits.substr(decpt);
    }
  } else {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    out += eb;
  }
}

void dump(const ojson& v, int indent, int level, std::string& out) {
  const auto newline = [&](int lvl) {
    out += '\n';
    out.append(static_cast<size_t>(indent * lvl), ' ');
  };
  // Python's separators: (', ', ': ') without indent, (',', ': ') with it.
  const char* item_sep = indent < 0 ? ", " : ",";
  switch (v.type()) {
    case ojson::value_t::null: out += "null"; break;
    case ojson::value_t::boolean: out += v.get<bool>() ? "true" : "false"; break;
    case ojson::value_t::number_integer: out += std::to_string(v.get<int64_t>()); break;
    case ojson::value_t::number_unsigned: out += std::to_string(v.get<uint64_t>()); break;
    case ojson::value_t::number_float: dump_float(v.get<double>(), out); break;
    case ojson::value_t::string: dump_string(v.get_ref<const std::string&>(), out); break;
    case ojson::value_t::array: {
      if (v.empty()) { out += "[]"; break; }
      out += '[';
      bool first = true;
      for (const auto& x : v) {
        if (!first) out += item_sep;
        first = false;
        if (indent >= 0) newline(level + 1);
        dump(x, indent, level + 1, out);
      }
      if (indent >= 0) newline(level);
      out += ']';
      break;
    }
    case ojson::value_t::object: {
      if (v.empty()) { out += "{}"; break; }
      out += '{';
      bool first = true;
      for (const auto& [k, x] : v.items()) {
        if (!first) out += item_sep;
        first = false;
        if (indent >= 0) newline(level + 1);
        dump_string(k, out);
        out += ": ";
        dump(x, indent, level + 1, out);
      }
      if (indent >= 0) newline(level);
      out += '}';
      break;
    }
    default: throw UserError("chat template: cannot write a JSON " + std::string(v.type_name()) + " value");
  }
}

}  // namespace

std::string python_json_dumps(const ojson& value, int indent) {
  std::string out;
  dump(value, indent, 0, out);
  return out;
}

// ---- names and detection -----------------------------------------------------------------------

ChatTemplateKind chat_template_from_name(const std::string& name) {
  std::string n;
  for (const char c : name) n += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  static const std::pair<const char*, ChatTemplateKind> kNames[] = {
      {"llama3", ChatTemplateKind::llama3},   {"llama-3", ChatTemplateKind::llama3},
      {"llama3.1", ChatTemplateKind::llama3}, {"llama-3.1", ChatTemplateKind::llama3},
      {"llama31", ChatTemplateKind::llama3},  {"chatml", ChatTemplateKind::chatml},
      {"qwen", ChatTemplateKind::chatml},     {"qwen2", ChatTemplateKind::chatml},
      {"qwen2.5", ChatTemplateKind::chatml},  {"qwen25", ChatTemplateKind::chatml},
      {"smollm", ChatTemplateKind::chatml},   {"smollm2", ChatTemplateKind::chatml},
      {"mistral", ChatTemplateKind::mistral}, {"mixtral", ChatTemplateKind::mistral},
      {"alpaca", ChatTemplateKind::alpaca},   {"hermes", ChatTemplateKind::hermes},
      {"hermes3", ChatTemplateKind::hermes},  {"hermes-3", ChatTemplateKind::hermes},
  };
  for (const auto& [key, kind] : kNames)
    if (n == key) return kind;
  throw UserError("chat_template: expected one of llama3, chatml, mistral, alpaca, hermes (or llama-3, llama3.1, "
                  "qwen2, qwen2.5, smollm, mixtral, hermes-3) or a .jinja file, found \"" + name + "\"");
}

std::string chat_template_name(ChatTemplateKind kind) {
  switch (kind) {
    case ChatTemplateKind::llama3: return "llama3";
    case ChatTemplateKind::chatml: return "chatml";
    case ChatTemplateKind::mistral: return "mistral";
    case ChatTemplateKind::alpaca: return "alpaca";
    case ChatTemplateKind::hermes: return "hermes";
  }
  return "unknown";
}

bool detect_chat_template(const std::string& src, ChatTemplateKind& kind) {
  const auto has = [&](const char* marker) { return src.find(marker) != std::string::npos; };
  if (has("<|start_header_id|>") && has("<|eot_id|>")) {
    kind = ChatTemplateKind::llama3;
    return true;
  }
  if (has("<|im_start|>")) {
    kind = has("You are a function calling AI model") || has("json_to_python_type") ? ChatTemplateKind::hermes
                                                                                      : ChatTemplateKind::chatml;
    return true;
  }
  // Llama 2's [INST] template puts the system prompt in <<SYS>>: not a format we render.
  if (has("[INST]") && !has("<<SYS>>")) {
    kind = ChatTemplateKind::mistral;
    return true;
  }
  if (has("### Instruction")) {
    kind = ChatTemplateKind::alpaca;
    return true;
  }
  return false;
}

}  // namespace qlora
