// Chat templates: conversations (system / user / assistant / tool turns, assistant tool calls, a
// tools list) rendered to text exactly as the model's Jinja template renders it through HF
// transformers' apply_chat_template, for the built-in families llama3 (Llama 3.1 template, tools
// in the first user message), chatml (Qwen2.5 template: Hermes-style <tools> / <tool_call>;
// SmolLM), mistral ([INST]) and alpaca. No Jinja engine: each family is written out in C++.
// Rendering returns segments so that the loss mask can be built per segment: assistant output
// (the reply and its end-of-turn token) is trainable, everything else is prompt.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace qlora {

enum class ChatTemplateKind { llama3, chatml, mistral, alpaca };

struct ToolCall {
  std::string id;              // optional
  std::string name;
  nlohmann::json arguments;    // an object (a JSON string holding an object is parsed on input)
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
  nlohmann::json tools = nlohmann::json::array();   // OpenAI-style [{type: function, function: {...}}]
};

// From the JSON objects users keep in their datasets: {"messages": [...], "tools": [...]} with
// OpenAI / HF field names (role, content, tool_calls[{id?, type?, function{name, arguments}}],
// tool_call_id, name). `where` (e.g. "data.jsonl:12") prefixes every UserError.
Conversation conversation_from_json(const nlohmann::json& messages, const nlohmann::json& tools,
                                    const std::string& where);

struct ChatRenderOptions {
  std::string bos_token;                 // written where the template writes bos_token
  bool add_generation_prompt = false;    // end with the assistant header (for generation)
  // llama3: the "Today Date" line of the Llama 3.1 template (its default when not given).
  std::string date_string = "26 Jul 2024";
  // chatml: system prompt used when the conversation has none ("" = none). The Qwen2.5
  // template's is "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.".
  std::string default_system;
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

// "llama3" | "chatml" | "mistral" | "alpaca" (also "llama-3", "qwen2", "qwen2.5", "smollm"...):
// UserError listing the names for anything else.
ChatTemplateKind chat_template_from_name(const std::string& name);
std::string chat_template_name(ChatTemplateKind kind);
// Recognises a tokenizer_config.json chat_template string by its markers; false when unknown.
bool detect_chat_template(const std::string& jinja_source, ChatTemplateKind& kind);

}  // namespace qlora
