// Chat templates written out in C++: each render_* function produces, character for character,
// what HF transformers' apply_chat_template produces with the template it names (checked by
// tests/oracle/chat_template_hf.py), cut into prompt and trainable segments.
// Trainable: what the model generates after the assistant header, up to and including the token
// that ends its turn (the stop token at generation). Headers, and separators the template writes
// after that token (chatml's "\n" after <|im_end|>), are prompt: at inference the template writes
// them, the model never produces them, and training on a token after the stop token teaches a
// continuation that generation never reaches.
#include "qlora/chat_template.h"

#include "qlora/error.h"

namespace qlora {

namespace {

using ojson = nlohmann::ordered_json;

struct Segments {
  std::vector<ChatSegment> out;
  void add(const std::string& text, bool trainable) {
    if (text.empty()) return;
    if (!out.empty() && out.back().trainable == trainable)
      out.back().text += text;
    else
      out.push_back({text, trainable});
  }
  void prompt(const std::string& text) { add(text, false); }
  void reply(const std::string& text) { add(text, true); }
};

// Jinja's |trim: Python's str.strip(), which strips Unicode whitespace, on UTF-8 text.
size_t space_len_at(const std::string& s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f)) return 1;
  const auto at = [&](size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0u; };
  if (c == 0xc2 && (at(1) == 0x85 || at(1) == 0xa0)) return 2;                        // U+0085, U+00A0
  if (c == 0xe1 && at(1) == 0x9a && at(2) == 0x80) return 3;                         // U+1680
  if (c == 0xe2 && at(1) == 0x80 && (at(2) <= 0x8a || at(2) == 0xa8 || at(2) == 0xa9 || at(2) == 0xaf))
    return 3;                                                                        // U+2000..200A, 2028, 2029, 202F
  if (c == 0xe2 && at(1) == 0x81 && at(2) == 0x9f) return 3;                         // U+205F
  if (c == 0xe3 && at(1) == 0x80 && at(2) == 0x80) return 3;                         // U+3000
  return 0;
}

std::string trim(const std::string& s) {
  size_t b = 0;
  while (b < s.size()) {
    const size_t n = space_len_at(s, b);
    if (n == 0) break;
    b += n;
  }
  // From the end: find the last character that is not whitespace, walking forward (UTF-8).
  size_t end = b, i = b;
  while (i < s.size()) {
    const size_t n = space_len_at(s, i);
    if (n) {
      i += n;
    } else {
      const auto c = static_cast<unsigned char>(s[i]);
      i += c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
      end = std::min(i, s.size());
    }
  }
  return s.substr(b, end - b);
}

void check_system_first(const Conversation& c, const std::string& family, const std::string& where) {
  for (size_t i = 1; i < c.messages.size(); ++i)
    if (c.messages[i].role == "system")
      throw UserError(where + ": messages[" + std::to_string(i) + "]: the " + family +
                      " template takes a system message only as the first message");
}

// ---- llama3: meta-llama/Llama-3.1-8B-Instruct's template, tools_in_user_message = true (its
// default), no builtin_tools. Its quirks are kept: every content is trimmed, an assistant turn
// with a tool call prints only the call (its content is dropped), and a tool result is printed
// through tojson (a string result appears in quotes).
std::vector<ChatSegment> render_llama3(const Conversation& c, const ChatRenderOptions& o, const std::string& where) {
  Segments s;
  const auto header = [](const std::string& role) { return "<|start_header_id|>" + role + "<|end_header_id|>\n\n"; };
  size_t i = 0;
  std::string system_message;
  if (!c.messages.empty() && c.messages[0].role == "system") system_message = trim(c.messages[i++].content);
  const bool tools = !c.tools.empty();
  std::string text = o.bos_token + header("system");
  if (tools) text += "Environment: ipython\n";
  text += "Cutting Knowledge Date: December 2023\nToday Date: " + o.date_string + "\n\n";
  text += system_message + "<|eot_id|>";
  if (tools) {
    if (i >= c.messages.size() || c.messages[i].role != "user")
      throw UserError(where + ": the llama3 template puts the tools in the first user message: expected a user message "
                      "after the system message, found " + (i < c.messages.size() ? c.messages[i].role : "none"));
    text += header("user") +
            "Given the following functions, please respond with a JSON for a function call with its proper arguments "
            "that best answers the given prompt.\n\n"
            "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
            "value}.Do not use variables.\n\n";
    for (const auto& t : c.tools) text += python_json_dumps(t, 4) + "\n\n";
    text += trim(c.messages[i++].content) + "<|eot_id|>";
  }
  s.prompt(text);
  for (; i < c.messages.size(); ++i) {
    const ChatMessage& m = c.messages[i];
    if (m.role == "tool") {
      s.prompt(header("ipython") + python_json_dumps(ojson(m.content)) + "<|eot_id|>");
    } else if (!m.tool_calls.empty()) {
      if (m.tool_calls.size() != 1)
        throw UserError(where + ": messages[" + std::to_string(i) + "]: the llama3 template takes one tool call per "
                        "assistant turn, found " + std::to_string(m.tool_calls.size()));
      const ToolCall& call = m.tool_calls[0];
      s.prompt(header("assistant"));
      s.reply("{\"name\": \"" + call.name + "\", \"parameters\": " + python_json_dumps(call.arguments) + "}<|eot_id|>");
    } else if (m.role == "assistant") {
      s.prompt(header("assistant"));
      s.reply(trim(m.content) + "<|eot_id|>");
    } else {
      s.prompt(header(m.role) + trim(m.content) + "<|eot_id|>");
    }
  }
  if (o.add_generation_prompt) s.prompt(header("assistant"));
  return std::move(s.out);
}

// ---- chatml: Qwen/Qwen2.5-7B-Instruct's template, with its default system prompt replaced by
// options.default_system ("" = no system turn: SmolLM2-style plain chatml when it holds
// SmolLM2's prompt). With tools, no system message and default_system "", the system turn starts
// with "# Tools" (as Qwen3's template writes it) instead of Qwen2.5's "\n\n# Tools".
std::vector<ChatSegment> render_chatml(const Conversation& c, const ChatRenderOptions& o, const std::string& where) {
  Segments s;
  const bool has_system = !c.messages.empty() && c.messages[0].role == "system";
  const std::string system = has_system ? c.messages[0].content : o.default_system;
  std::string text;  // the Qwen template writes no bos_token
  if (!c.tools.empty()) {
    text += "<|im_start|>system\n";
    if (has_system || !system.empty()) text += system + "\n\n";
    text += "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
            "function signatures within <tools></tools> XML tags:\n<tools>";
    for (const auto& t : c.tools) text += "\n" + python_json_dumps(t);
    text += "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call><|im_end|>\n";
  } else if (has_system || !system.empty()) {
    text += "<|im_start|>system\n" + system + "<|im_end|>\n";
  }
  s.prompt(text);
  const size_t n = c.messages.size();
  for (size_t i = has_system ? 1 : 0; i < n; ++i) {
    const ChatMessage& m = c.messages[i];
    if (m.role == "assistant") {
      s.prompt("<|im_start|>assistant\n");
      if (m.tool_calls.empty()) {
        s.reply(m.content + "<|im_end|>");
      } else {
        // The template writes "<|im_start|>assistant" then "\n" + content (when not empty) or
        // "\n<tool_call>": the "\n" is taken into the header, as in the generation prompt.
        std::string reply = m.content.empty() ? "" : m.content + "\n";
        for (size_t k = 0; k < m.tool_calls.size(); ++k) {
          if (k) reply += "\n";
          reply += "<tool_call>\n{\"name\": \"" + m.tool_calls[k].name +
                   "\", \"arguments\": " + python_json_dumps(m.tool_calls[k].arguments) + "}\n</tool_call>";
        }
        s.reply(reply + "<|im_end|>");
      }
      s.prompt("\n");
    } else if (m.role == "tool") {
      // Consecutive tool results share one user turn.
      std::string t;
      if (i == 0 || c.messages[i - 1].role != "tool") t += "<|im_start|>user";
      t += "\n<tool_response>\n" + m.content + "\n</tool_response>";
      if (i + 1 == n || c.messages[i + 1].role != "tool") t += "<|im_end|>\n";
      s.prompt(t);
    } else {
      s.prompt("<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n");
    }
  }
  if (o.add_generation_prompt) s.prompt("<|im_start|>assistant\n");
  return std::move(s.out);
}

// ---- hermes: NousResearch/Hermes-3-Llama-3.1-8B's "tool_use" template. Kept as it renders:
// json_to_python_type's "list[Union[]]" for arrays and "Union[]" for a missing type, parameter
// lines run together without newlines, a system message as an ordinary turn after the tools
// block, tool results in a "tool" turn whose <|im_end|> has no "\n" after it, an assistant
// turn's content dropped when it calls tools. HF fails on this template without tools; an
// empty tool list is rendered here.
std::string python_type(const ojson& spec, const std::string& at) {
  const auto type = spec.is_object() ? spec.find("type") : spec.end();
  if (!spec.is_object() || type == spec.end()) return "Union[]";  // Jinja: an undefined type is iterable
  const auto basic = [](const std::string& t) -> const char* {
    if (t == "string") return "str";
    if (t == "number") return "float";
    if (t == "integer") return "int";
    if (t == "boolean") return "bool";
    return nullptr;
  };
  if (type->is_string()) {
    const std::string t = type->get<std::string>();
    if (const char* b = basic(t)) return b;
    if (t == "array") return "list[Union[]]";  // json_spec|items is no schema: its type is undefined
    if (t == "object") {
      const auto ap = spec.find("additionalProperties");
      return ap == spec.end() ? "dict" : "dict[str, " + python_type(*ap, at) + "]";
    }
    // A string type the map lacks ("null"): the template recurses over its characters forever.
    throw UserError(at + ": the hermes template cannot write the JSON schema type \"" + t + "\"");
  }
  if (type->is_array()) {
    std::string u = "Union[";
    for (size_t k = 0; k < type->size(); ++k) {
      if (k) u += ",";
      u += python_type(ojson{{"type", (*type)[k]}}, at);
    }
    return u + "]";
  }
  return "Any";
}

std::string jinja_str(const ojson& v) {  // {{ value }} of a string field; the template adds strings
  return v.is_string() ? v.get<std::string>() : python_json_dumps(v);
}

std::string hermes_tool(const ojson& tool, const std::string& at) {
  const ojson& f = tool.contains("function") ? tool.at("function") : tool;
  const auto field = [&](const char* key) -> const ojson& {
    if (!f.contains(key)) throw UserError(at + ": the hermes template needs the function's \"" + std::string(key) + "\"");
    return f.at(key);
  };
  const std::string name = jinja_str(field("name"));
  const ojson& params = field("parameters");
  const ojson props = params.is_object() && params.contains("properties") ? params.at("properties") : ojson::object();
  if (!props.is_object()) throw UserError(at + ": parameters.properties: expected an object");
  std::string sig = name + "(";
  std::string args;
  bool first = true;
  for (const auto& [pname, pfields] : props.items()) {
    const std::string ty = python_type(pfields, at + ": parameters.properties." + pname);
    if (!first) sig += ", ";
    sig += pname + ": " + ty;
    args += (first ? "    Args:\n" : "");
    const std::string desc = pfields.is_object() && pfields.contains("description") ? trim(jinja_str(pfields.at("description"))) : "";
    args += "        " + pname + "(" + ty + "): " + desc;
    first = false;
  }
  sig += ")";
  if (f.contains("return")) sig += " -> " + python_type(f.at("return"), at + ": return");
  std::string out = "{\"type\": \"function\", \"function\": {\"name\": \"" + name + "\", \"description\": \"" + sig +
                    " - " + jinja_str(field("description")) + "\n\n" + args;
  if (f.contains("return") && f.at("return").is_object() && f.at("return").contains("description"))
    out += "\n    Returns:\n        " + jinja_str(f.at("return").at("description"));
  out += "\", \"parameters\": ";
  out += props.empty() ? "{}" : python_json_dumps(params);
  return out + "}";
}

std::vector<ChatSegment> render_hermes(const Conversation& c, const ChatRenderOptions& o, const std::string& where) {
  Segments s;
  std::string text = o.bos_token +
                     "<|im_start|>system\nYou are a function calling AI model. You are provided with function "
                     "signatures within <tools></tools> XML tags. You may call one or more functions to assist with "
                     "the user query. Don't make assumptions about what values to plug into functions. Here are the "
                     "available tools: <tools> ";
  for (size_t k = 0; k < c.tools.size(); ++k) {
    if (k) text += "\n";
    text += hermes_tool(c.tools[k], where + ": tools[" + std::to_string(k) + "]");
  }
  text += " </tools>Use the following pydantic model json schema for each tool call you will make: {\"properties\": "
          "{\"name\": {\"title\": \"Name\", \"type\": \"string\"}, \"arguments\": {\"title\": \"Arguments\", \"type\": "
          "\"object\"}}, \"required\": [\"name\", \"arguments\"], \"title\": \"FunctionCall\", \"type\": \"object\"}}\n"
          "For each function call return a json object with function name and arguments within "
          "<tool_call></tool_call> XML tags as follows:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
          "<args-dict>}\n</tool_call><|im_end|>\n";
  s.prompt(text);
  const size_t n = c.messages.size();
  for (size_t i = 0; i < n; ++i) {
    const ChatMessage& m = c.messages[i];
    const bool last = i + 1 == n;
    if (m.role == "tool") {
      std::string t;
      if (i > 0 && c.messages[i - 1].role != "tool") t += "<|im_start|>tool\n";
      t += "<tool_response>\n" + m.content + (last ? "\n</tool_response>" : "\n</tool_response>\n");
      if (last || c.messages[i + 1].role != "tool") t += "<|im_end|>";
      s.prompt(t);
    } else if (m.role == "assistant") {
      s.prompt("<|im_start|>assistant\n");
      if (m.tool_calls.empty()) {
        s.reply(m.content + "<|im_end|>");
      } else {
        std::string reply;
        for (size_t k = 0; k < m.tool_calls.size(); ++k) {
          if (k) reply += "\n";
          reply += "<tool_call>\n{\"name\": \"" + m.tool_calls[k].name +
                   "\", \"arguments\": " + python_json_dumps(m.tool_calls[k].arguments) + "}\n</tool_call>";
        }
        s.reply(reply + "<|im_end|>");
      }
      s.prompt("\n");
    } else {
      s.prompt("<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n");
    }
  }
  if (o.add_generation_prompt) s.prompt("<|im_start|>assistant\n");
  return std::move(s.out);
}

// ---- mistral: the template of mistralai/Mistral-7B-Instruct-v0.2 and Mixtral-8x7B-Instruct-v0.1
//   {{ bos_token }}[INST] user [/INST]reply</s>[INST] user [/INST]reply</s>
// (v0.1's differs only by a " " after each </s>; v0.3's [INST]user[/INST] drops the spaces and
// needs mistral-common's tokenizer). Roles alternate user / assistant; a system message (first
// only) goes before the first user message: "[INST] system\n\nuser [/INST]". No tools. The
// template has no generation prompt: a prompt already ends with [/INST].
std::vector<ChatSegment> render_mistral(const Conversation& c, const ChatRenderOptions& o, const std::string& where) {
  check_system_first(c, "mistral", where);
  Segments s;
  if (!c.tools.empty()) throw UserError(where + ": tools: the mistral template has no tool calls");
  const std::string eos = o.eos_token.empty() ? "</s>" : o.eos_token;
  size_t i = 0;
  std::string system;
  if (!c.messages.empty() && c.messages[0].role == "system") system = c.messages[i++].content + "\n\n";
  s.prompt(o.bos_token);
  for (size_t turn = 0; i < c.messages.size(); ++i, ++turn) {
    const ChatMessage& m = c.messages[i];
    const char* expected = turn % 2 == 0 ? "user" : "assistant";
    if (m.role != expected || !m.tool_calls.empty())
      throw UserError(where + ": messages[" + std::to_string(i) + "]: the mistral template needs user and assistant "
                      "turns in turn, starting with user: expected " + expected + ", found " + m.role +
                      (m.tool_calls.empty() ? "" : " with tool_calls"));
    if (m.role == "user") {
      s.prompt("[INST] " + system + m.content + " [/INST]");
      system.clear();
    } else {
      s.reply(m.content + eos);
    }
  }
  return std::move(s.out);
}

// ---- alpaca: the Stanford Alpaca prompt (tatsu-lab/stanford_alpaca train.py PROMPT_DICT):
//   Below is an instruction that describes a task[, paired with an input that provides further
//   context]. Write a response that appropriately completes the request.\n\n
//   ### Instruction:\n{instruction}\n\n[### Input:\n{input}\n\n]### Response:\n{output}{eos}
// A system message (first only) replaces the preamble sentence. A user turn directly followed by
// another user turn: the second is the ### Input. Further turns follow after "\n\n". "### Response:\n"
// is the assistant header (written with add_generation_prompt at the end). No tools.
std::vector<ChatSegment> render_alpaca(const Conversation& c, const ChatRenderOptions& o, const std::string& where) {
  check_system_first(c, "alpaca", where);
  if (!c.tools.empty()) throw UserError(where + ": tools: the alpaca template has no tool calls");
  Segments s;
  size_t i = 0;
  const size_t n = c.messages.size();
  std::string text = o.bos_token;
  if (n > 0 && c.messages[0].role == "system") {
    text += c.messages[i++].content + "\n\n";
  } else {
    const bool input = n >= 2 && c.messages[0].role == "user" && c.messages[1].role == "user";
    text += input ? "Below is an instruction that describes a task, paired with an input that provides further context. "
                    "Write a response that appropriately completes the request.\n\n"
                  : "Below is an instruction that describes a task. Write a response that appropriately completes the "
                    "request.\n\n";
  }
  s.prompt(text);
  bool expect_user = true;
  for (; i < n; ++i) {
    const ChatMessage& m = c.messages[i];
    if ((m.role != "user" && m.role != "assistant") || m.role != (expect_user ? "user" : "assistant") ||
        !m.tool_calls.empty())
      throw UserError(where + ": messages[" + std::to_string(i) + "]: the alpaca template needs instruction (user), "
                      "optional input (user) and response (assistant) turns: expected " +
                      (expect_user ? "user" : "assistant") + ", found " + m.role);
    if (m.role == "user") {
      std::string t = "### Instruction:\n" + m.content + "\n\n";
      if (i + 1 < n && c.messages[i + 1].role == "user") t += "### Input:\n" + c.messages[++i].content + "\n\n";
      s.prompt(t);
      expect_user = false;
    } else {
      s.prompt("### Response:\n");
      s.reply(m.content + o.eos_token);
      if (i + 1 < n) s.prompt("\n\n");
      expect_user = true;
    }
  }
  if (o.add_generation_prompt) s.prompt("### Response:\n");
  return std::move(s.out);
}

}  // namespace

std::vector<ChatSegment> render_chat(ChatTemplateKind kind, const Conversation& conversation,
                                     const ChatRenderOptions& options, const std::string& where) {
  switch (kind) {
    case ChatTemplateKind::llama3: return render_llama3(conversation, options, where);
    case ChatTemplateKind::chatml: return render_chatml(conversation, options, where);
    case ChatTemplateKind::hermes: return render_hermes(conversation, options, where);
    case ChatTemplateKind::mistral: return render_mistral(conversation, options, where);
    case ChatTemplateKind::alpaca: return render_alpaca(conversation, options, where);
  }
  throw UserError(where + ": unknown chat template kind");
}

std::string render_chat_text(ChatTemplateKind kind, const Conversation& conversation, const ChatRenderOptions& options) {
  std::string text;
  for (const ChatSegment& s : render_chat(kind, conversation, options)) text += s.text;
  return text;
}

}  // namespace qlora
