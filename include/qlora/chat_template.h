// Chat templates: conversations (system / user / assistant / tool turns, assistant tool calls, a
// tools list) rendered to text exactly as the model's Jinja template renders it through HF
// transformers' apply_chat_template, for the built-in families llama3 (Llama 3.1 template, tools
// in the first user message), chatml (Qwen2.5 template: Hermes-style <tools> / <tool_call>;
// SmolLM2), hermes (the tool_use template of NousResearch Hermes-3-Llama-3.1), mistral ([INST]) and
// alpaca. No Jinja engine: each family is written out in C++ (src/data/chat_template*.cpp says
// which template each one follows, and tests/oracle/chat_template_hf.py checks it against HF).
// JSON the templates print (tools, tool-call arguments) is written as Python's json.dumps writes
// it (HF's tojson: ensure_ascii=False, no sort_keys) in the order the user wrote the keys, hence
// ordered_json here.
// Rendering returns segments so that the loss mask can be built per segment: assistant output
// (the reply and its end-of-turn token) is trainable, everything else is prompt.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace qlora {

// hermes: chatml markup, but its own system block (tools described with Python-style signatures),
// tool responses in a "tool" turn and no newline after a tool group's <|im_end|>: a mode of its own.
enum class ChatTemplateKind { llama3, chatml, mistral, alpaca, hermes };

struct ToolCall {
  std::string id;              // optional
  std::string name;
  nlohmann::ordered_json arguments = nlohmann::ordered_json::object();   // an object (a JSON string
                                                                          // holding one is parsed on input)
};

struct ChatMessage {
  std::string role;            // system | user | assistant | tool
  std::string content;
  std::vector<ToolCall> tool_calls;   // assistant only
  std::string tool_call_id;    // tool only, optional
  std::string name;            // tool only, optional: the tool that answered
};

struct Conversation {
  std::vector<ChatMessage> messages;
  nlohmann::ordered_json tools = nlohmann::ordered_json::array();   // OpenAI-style [{type: function,
                                                                    // function: {...}}], user's key order
};

// From the JSON objects users keep in their datasets: {"messages": [...], "tools": [...]} with
// OpenAI / HF field names (role, content, tool_calls[{id?, type?, function{name, arguments}}],
// tool_call_id, name). `where` (e.g. "data.jsonl:12") prefixes every UserError. content may be
// null in an assistant turn with tool_calls; arguments an object or a JSON string of one; role
// "ipython" is read as "tool"; `tools` may be null. Pass ordered_json (parse the line with
// nlohmann::ordered_json::parse) to keep the user's key order: HF prints tools and arguments in
// that order, while nlohmann::json has already sorted the keys.
Conversation conversation_from_json(const nlohmann::json& messages, const nlohmann::json& tools,
                                    const std::string& where);
Conversation conversation_from_json(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                                    const std::string& where);

// alpaca: an instruction / input / output record as the conversation the alpaca family renders
// with "### Input:" (a user turn followed directly by a second user turn: the second is the
// input); input "" gives the no-input prompt.
Conversation alpaca_conversation(const std::string& instruction, const std::string& input, const std::string& output);

struct ChatRenderOptions {
  std::string bos_token;                 // written where the template writes bos_token
  bool add_generation_prompt = false;    // end with the assistant header (for generation)
  // llama3: the "Today Date" line of the Llama 3.1 template (its default when not given).
  std::string date_string = "26 Jul 2024";
  // chatml: system prompt used when the conversation has none ("" = none). The Qwen2.5
  // template's is "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.".
  std::string default_system;
  // mistral and alpaca: written after each assistant reply; "" = "</s>" for mistral, nothing for
  // alpaca (set it to the tokenizer's EOS there).
  std::string eos_token;
};

struct ChatSegment {
  std::string text;
  bool trainable = false;   // assistant reply (content, tool calls, end-of-turn token)
};

// The segments concatenated are the rendered text. UserError (naming `where`) for what the
// family cannot express (e.g. a tool turn in alpaca, a system turn not first).
std::vector<ChatSegment> render_chat(ChatTemplateKind kind, const Conversation& conversation,
                                     const ChatRenderOptions& options, const std::string& where = "conversation");
std::string render_chat_text(ChatTemplateKind kind, const Conversation& conversation,
                             const ChatRenderOptions& options);

// "llama3" | "chatml" | "mistral" | "alpaca" | "hermes" (also "llama-3", "qwen2", "qwen2.5",
// "smollm", "hermes-3"...):
// UserError listing the names for anything else.
ChatTemplateKind chat_template_from_name(const std::string& name);
std::string chat_template_name(ChatTemplateKind kind);
// Python's json.dumps(value, ensure_ascii=False, indent=indent) (indent < 0: None), as HF's tojson.
std::string python_json_dumps(const nlohmann::ordered_json& value, int indent = -1);
// Recognises a tokenizer_config.json chat_template string by its markers; false when unknown
// (Llama 2's [INST] <<SYS>> template included).
bool detect_chat_template(const std::string& jinja_source, ChatTemplateKind& kind);

}  // namespace qlora
