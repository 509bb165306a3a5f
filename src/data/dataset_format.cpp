// One record -> one TokenizedExample, for each dataset type: completion text, alpaca (rendered by
// the alpaca chat template, so that its prompt text has one definition), chat messages with tools
// (rendered segment by segment so that the mask follows the template's trainable segments) and
// pre-tokenized ids. Also the DataContext a config implies (which chat template, which BOS).
#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>

#include "qlora/dataset.h"
#include "qlora/error.h"

namespace qlora {

// ordered_json: the chat templates print tools and tool-call arguments in the user's key order.
using json = nlohmann::ordered_json;

namespace {

const char* json_type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::object: return "an object";
    case json::value_t::array: return "a list";
    case json::value_t::string: return "a string";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "an integer";
    case json::value_t::number_float: return "a number";
    default: return "a binary value";
  }
}

[[noreturn]] void fail(const std::string& where, const std::string& what) { throw UserError(where + ": " + what); }

const json& required(const json& record, const std::string& field, const std::string& what, const std::string& where) {
  auto it = record.find(field);
  if (it == record.end()) fail(where, "missing field '" + field + "' (expected " + what + ")");
  return *it;
}

const std::string& string_field(const json& record, const std::string& field, const std::string& where) {
  const json& v = required(record, field, "a string", where);
  if (!v.is_string()) fail(where, "field '" + field + "': expected a string, found " + json_type_name(v));
  return v.get_ref<const std::string&>();
}

// An optional string: absent or null is "".
std::string optional_string(const json& record, const std::string& field, const std::string& where) {
  auto it = record.find(field);
  if (it == record.end() || it->is_null()) return {};
  if (!it->is_string()) fail(where, "field '" + field + "': expected a string, found " + json_type_name(*it));
  return it->get<std::string>();
}

void append(TokenizedExample& ex, const std::vector<int32_t>& ids, bool trainable) {
  ex.input_ids.insert(ex.input_ids.end(), ids.begin(), ids.end());
  if (trainable) ex.labels.insert(ex.labels.end(), ids.begin(), ids.end());
  else ex.labels.insert(ex.labels.end(), ids.size(), kIgnoreLabel);
}

void append_token(TokenizedExample& ex, int32_t id, bool trainable) {
  ex.input_ids.push_back(id);
  ex.labels.push_back(trainable ? id : kIgnoreLabel);
}

const Tokenizer& tokenizer_of(const DataContext& c) {
  if (c.tokenizer == nullptr) throw std::logic_error("tokenize_record: DataContext.tokenizer is null");
  return *c.tokenizer;
}

std::vector<int32_t> encode_text(const Tokenizer& tok, const std::string& text) {
  EncodeOptions o;
  o.add_special_tokens = false;
  o.parse_special = true;
  return tok.encode(text, o);
}

TokenizedExample completion_example(const json& record, const DatasetConfig& d, const DataContext& c,
                                    const std::string& where) {
  const Tokenizer& tok = tokenizer_of(c);
  const std::string& text = string_field(record, d.field, where);
  TokenizedExample ex;
  if (c.add_bos && tok.adds_bos() && tok.bos_id() >= 0) append_token(ex, tok.bos_id(), true);
  append(ex, encode_text(tok, text), true);
  if (c.add_eos && tok.eos_id() >= 0) append_token(ex, tok.eos_id(), true);
  return ex;
}

// Segments of a rendered conversation, tokenized one by one (special tokens parsed).
void append_segments(TokenizedExample& ex, const std::vector<ChatSegment>& segments, const DataContext& c) {
  const Tokenizer& tok = tokenizer_of(c);
  for (const ChatSegment& s : segments) {
    if (s.text.empty()) continue;
    append(ex, encode_text(tok, s.text), s.trainable || c.train_on_inputs);
  }
}

// alpaca: the instruction (and input, when there is one) as the user turn of the alpaca template,
// the output as the assistant turn; EOS after the output (trainable) as axolotl does.
TokenizedExample alpaca_example(const json& record, const DataContext& c, const std::string& where) {
  const Tokenizer& tok = tokenizer_of(c);
  const std::string& instruction = string_field(record, "instruction", where);
  const std::string input = optional_string(record, "input", where);
  const std::string& output = string_field(record, "output", where);
  const Conversation conv = alpaca_conversation(instruction, input, output);
  ChatRenderOptions options = c.chat_options;
  if (!(c.add_bos && tok.adds_bos())) options.bos_token.clear();
  if (!c.add_eos) options.eos_token.clear();
  TokenizedExample ex;
  append_segments(ex, render_chat(ChatTemplateKind::alpaca, conv, options, where), c);
  if (c.add_eos && tok.eos_id() >= 0 && (ex.input_ids.empty() || ex.input_ids.back() != tok.eos_id()))
    append_token(ex, tok.eos_id(), true);
  return ex;
}

TokenizedExample chat_example(const json& record, const DatasetConfig& d, const DataContext& c, const std::string& where) {
  const json& messages = required(record, d.field_messages, "a list of {role, content} messages", where);
  if (!messages.is_array())
    fail(where, "field '" + d.field_messages + "': expected a list of {role, content} messages, found " +
                    json_type_name(messages));
  if (messages.empty()) fail(where, "field '" + d.field_messages + "': expected at least one message, found an empty list");
  json tools = json::array();
  if (auto it = record.find(d.field_tools); it != record.end() && !it->is_null()) {
    if (!it->is_array()) fail(where, "field '" + d.field_tools + "': expected a list of tools, found " + json_type_name(*it));
    tools = *it;
  }
  const Conversation conv = conversation_from_json(messages, tools, where);
  TokenizedExample ex;
  append_segments(ex, render_chat(c.chat_template, conv, c.chat_options, where), c);
  return ex;
}

std::vector<int32_t> id_list(const json& v, const std::string& field, int64_t vocab, bool allow_ignore,
                             const std::string& where) {
  if (!v.is_array()) fail(where, "field '" + field + "': expected a list of token ids, found " + json_type_name(v));
  std::vector<int32_t> ids;
  ids.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const json& e = v[i];
    if (!e.is_number_integer())
      fail(where, "field '" + field + "'[" + std::to_string(i) + "]: expected an integer token id, found " +
                      (e.is_primitive() ? e.dump() : std::string(json_type_name(e))));
    const int64_t id = e.get<int64_t>();
    const bool ok = (id >= 0 && id < vocab) || (allow_ignore && id == kIgnoreLabel);
    if (!ok)
      fail(where, "field '" + field + "'[" + std::to_string(i) + "]: token id " + std::to_string(id) +
                      " is outside the tokenizer's vocabulary [0, " + std::to_string(vocab) + ")" +
                      (allow_ignore ? " (or -100 for an ignored label)" : ""));
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

TokenizedExample pretokenized_example(const json& record, const DataContext& c, const std::string& where) {
  const int64_t vocab = tokenizer_of(c).vocab_size();
  TokenizedExample ex;
  ex.input_ids = id_list(required(record, "input_ids", "a list of token ids", where), "input_ids", vocab, false, where);
  if (ex.input_ids.empty()) fail(where, "field 'input_ids': expected at least one token id, found an empty list");
  auto it = record.find("labels");
  if (it == record.end() || it->is_null()) {
    ex.labels = ex.input_ids;
  } else {
    ex.labels = id_list(*it, "labels", vocab, true, where);
    if (ex.labels.size() != ex.input_ids.size())
      fail(where, "field 'labels': expected " + std::to_string(ex.input_ids.size()) + " labels (one per input id), found " +
                      std::to_string(ex.labels.size()));
  }
  return ex;
}

}  // namespace

TokenizedExample tokenize_json(const json& record, const DatasetConfig& dataset, const DataContext& context,
                               const std::string& where, bool* truncated) {
  if (!record.is_object()) fail(where, std::string("expected a JSON object per line, found ") + json_type_name(record));
  TokenizedExample ex;
  switch (dataset.type) {
    case DatasetType::completion: ex = completion_example(record, dataset, context, where); break;
    case DatasetType::alpaca: ex = alpaca_example(record, context, where); break;
    case DatasetType::chat_template: ex = chat_example(record, dataset, context, where); break;
    case DatasetType::pretokenized: ex = pretokenized_example(record, context, where); break;
    default: fail(where, "unknown dataset type " + std::to_string(static_cast<int>(dataset.type)));
  }
  const bool cut = context.sequence_len > 0 && ex.input_ids.size() > static_cast<size_t>(context.sequence_len);
  if (cut) {
    ex.input_ids.resize(context.sequence_len);
    ex.labels.resize(context.sequence_len);
  }
  if (truncated != nullptr) *truncated = cut;
  return ex;
}

TokenizedExample tokenize_record(const std::string& record_json, const DatasetConfig& dataset, const DataContext& context,
                                 const std::string& where) {
  json record = json::parse(record_json, nullptr, /*allow_exceptions=*/false);
  if (record.is_discarded()) {
    // Parse again with exceptions for nlohmann's description of what is wrong and where.
    try {
      record = json::parse(record_json);
    } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e999
      std::string msg = e.what();
      if (auto p = msg.find("parse error"); p != std::string::npos) msg = msg.substr(p);
      fail(where, "invalid JSON: " + msg);
    }
  }
  return tokenize_json(record, dataset, context, where);
}

DataContext make_data_context(const TrainConfig& config, const Tokenizer& tokenizer) {
  DataContext c;
  c.tokenizer = &tokenizer;
  c.train_on_inputs = config.train_on_inputs;
  c.sequence_len = config.sequence_len;
  if (tokenizer.bos_id() >= 0) c.chat_options.bos_token = tokenizer.id_to_token(tokenizer.bos_id());
  if (tokenizer.eos_id() >= 0) c.chat_options.eos_token = tokenizer.id_to_token(tokenizer.eos_id());
  bool needs_chat = false;
  for (const auto& d : config.datasets) needs_chat = needs_chat || d.type == DatasetType::chat_template;

  std::string jinja;  // the template source we recognise the family from
  if (!config.chat_template.empty()) {
    const std::string& name = config.chat_template;
    if (name.size() > 6 && name.compare(name.size() - 6, 6, ".jinja") == 0) {
      std::ifstream in(name, std::ios::binary);
      if (!in) throw UserError("chat_template '" + name + "': cannot open (expected a readable .jinja file or a template name)");
      std::stringstream text;
      text << in.rdbuf();
      jinja = text.str();
      if (!detect_chat_template(jinja, c.chat_template))
        throw UserError("chat_template '" + name + "': not a template family qlora knows (llama3, chatml, mistral, hermes, "
                        "alpaca); set chat_template to one of those names");
    } else {
      c.chat_template = chat_template_from_name(name);
    }
  } else if (needs_chat) {
    jinja = tokenizer.chat_template();
    if (jinja.empty())
      throw UserError("chat_template: the tokenizer has no chat template and the config sets none; set chat_template "
                      "(llama3, chatml, mistral, hermes or alpaca) for the chat_template datasets");
    if (!detect_chat_template(jinja, c.chat_template))
      throw UserError("chat_template: the tokenizer's chat template is not one qlora recognises; set chat_template "
                      "(llama3, chatml, mistral, hermes or alpaca) for the chat_template datasets");
  } else if (!tokenizer.chat_template().empty()) {
    ChatTemplateKind k;
    if (detect_chat_template(tokenizer.chat_template(), k)) c.chat_template = k;
  }
  if (jinja.empty()) jinja = tokenizer.chat_template();
  // The Qwen2.5 and SmolLM2-Instruct templates add their default system prompt when the
  // conversation has none (written '<|im_start|>system\n' + prompt + '<|im_end|>' in the template).
  static const std::string kQwenSystem = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
  static const std::string kSmolLM2System = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
  if (c.chat_template == ChatTemplateKind::chatml) {
    if (jinja.find(kQwenSystem) != std::string::npos) c.chat_options.default_system = kQwenSystem;
    else if (jinja.find("system\n" + kSmolLM2System + "<|im_end|>") != std::string::npos)
      c.chat_options.default_system = kSmolLM2System;
  }
  return c;
}

}  // namespace qlora
