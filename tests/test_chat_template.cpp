// Chat templates: exact texts (taken from HF transformers' apply_chat_template with the real
// templates), segment boundaries, JSON written as Python writes it, conversations read from JSON
// and their errors, names and detection. Also the hook of tests/oracle/chat_template_hf.py.
#include "qlora/chat_template.h"

#include "qlora/error.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace qlora;
using Catch::Matchers::ContainsSubstring;
using ojson = nlohmann::ordered_json;

namespace {

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Conversation parse(const std::string& messages, const std::string& tools = "null") {
  return conversation_from_json(ojson::parse(messages), ojson::parse(tools), "t.jsonl:1");
}

std::string joined(const std::vector<ChatSegment>& s, int trainable = -1) {
  std::string out;
  for (const auto& x : s)
    if (trainable < 0 || x.trainable == (trainable == 1)) out += x.text;
  return out;
}

std::vector<std::string> trainable_parts(const std::vector<ChatSegment>& s) {
  std::vector<std::string> out;
  for (const auto& x : s)
    if (x.trainable) out.push_back(x.text);
  return out;
}

const char* kToolConv = R"([
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "Weather in Paris?"},
  {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}]},
  {"role": "tool", "tool_call_id": "c1", "content": "22 C"},
  {"role": "assistant", "content": "It is 22 C."}])";
const char* kTools = R"([{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
  "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
  "required": ["city"]}}}])";

}  // namespace

TEST_CASE("python_json_dumps writes what json.dumps(ensure_ascii=False) writes", "[chat]") {
  const ojson v = ojson::parse(R"({"z": 1, "a": [1.5, 1e-5, 1e16, 0.0001, 123456789012345.0, -0.0, true, null],
                                   "s": "é\n\"\\\t\u0001/", "e": {}, "l": []})");
  CHECK(python_json_dumps(v) ==
        "{\"z\": 1, \"a\": [1.5, 1e-05, 1e+16, 0.0001, 123456789012345.0, -0.0, true, null], "
        "\"s\": \"é\\n\\\"\\\\\\t\\u0001/\", \"e\": {}, \"l\": []}");
  CHECK(python_json_dumps(ojson::parse(R"({"a": {"b": [1, 2]}, "c": []})"), 4) ==
        "{\n    \"a\": {\n        \"b\": [\n            1,\n            2\n        ]\n    },\n    \"c\": []\n}");
  CHECK(python_json_dumps(ojson(0.1)) == "0.1");
  CHECK(python_json_dumps(ojson(2.5e-300)) == "2.5e-300");
  CHECK(python_json_dumps(ojson(1e22)) == "1e+22");
  CHECK(python_json_dumps(ojson(-7)) == "-7");
}

TEST_CASE("conversation_from_json reads OpenAI / HF fields", "[chat]") {
  const Conversation c = parse(kToolConv, kTools);
  REQUIRE(c.messages.size() == 5);
  CHECK(c.messages[2].content.empty());
  REQUIRE(c.messages[2].tool_calls.size() == 1);
  CHECK(c.messages[2].tool_calls[0].id == "c1");
  CHECK(c.messages[2].tool_calls[0].name == "get_weather");
  CHECK(python_json_dumps(c.messages[2].tool_calls[0].arguments) == R"({"city": "Paris", "unit": "C"})");
  CHECK(c.messages[3].tool_call_id == "c1");
  CHECK(c.tools.size() == 1);
  // Key order kept (not sorted): "type" before "function", "name" before "description".
  CHECK(python_json_dumps(c.tools[0]).rfind("{\"type\": \"function\", \"function\": {\"name\"", 0) == 0);
  // Flat tool calls, arguments as an object, role ipython.
  const Conversation f = parse(R"([{"role": "user", "content": "x"},
    {"role": "assistant", "tool_calls": [{"name": "f", "arguments": {"b": 1, "a": 2}}]},
    {"role": "ipython", "content": "ok", "name": "f"}])");
  CHECK(f.messages[1].tool_calls[0].name == "f");
  CHECK(python_json_dumps(f.messages[1].tool_calls[0].arguments) == R"({"b": 1, "a": 2})");
  CHECK(f.messages[2].role == "tool");
  CHECK(f.messages[2].name == "f");
}

TEST_CASE("conversation_from_json errors name where and what was expected", "[chat]") {
  const auto err = [](const std::string& m, const std::string& t = "null") {
    try {
      parse(m, t);
    } catch (const UserError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK_THAT(err(R"([{"role": "bot", "content": "x"}])"),
             ContainsSubstring("t.jsonl:1: messages[0].role: expected one of system, user, assistant, tool, found \"bot\""));
  CHECK_THAT(err(R"([{"content": "x"}])"), ContainsSubstring("t.jsonl:1: messages[0]: missing \"role\""));
  CHECK_THAT(err(R"([{"role": "user", "content": 3}])"),
             ContainsSubstring("messages[0].content: expected a string, found number 3"));
  CHECK_THAT(err(R"([{"role": "user"}])"), ContainsSubstring("messages[0]: missing \"content\""));
  CHECK_THAT(err(R"([{"role": "user", "content": null}])"), ContainsSubstring("missing \"content\""));
  CHECK_THAT(err(R"([{"role": "user", "content": "x", "tool_calls": []}])"),
             ContainsSubstring("messages[0].tool_calls: only an assistant turn may call tools"));
  CHECK_THAT(err(R"([{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}])"),
             ContainsSubstring("messages[0].tool_calls[0].function.arguments: expected a JSON object in the string"));
  CHECK_THAT(err(R"([{"role": "assistant", "content": null, "tool_calls": [{"function": {"arguments": "{}"}}]}])"),
             ContainsSubstring("messages[0].tool_calls[0].function: missing \"name\""));
  CHECK_THAT(err(R"([{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}])"),
             ContainsSubstring("arguments: expected an object or a JSON string of one, found array [1]"));
  CHECK_THAT(err(R"({"role": "user"})"), ContainsSubstring("t.jsonl:1: messages: expected an array"));
  CHECK_THAT(err("[]"), ContainsSubstring("messages: expected at least one message"));
  CHECK_THAT(err(R"([{"role": "user", "content": "x"}])", R"({"a": 1})"), ContainsSubstring("t.jsonl:1: tools: expected an array"));
  CHECK_THAT(err(R"([{"role": "user", "content": "x"}])", R"([{"type": "function"}])"),
             ContainsSubstring("t.jsonl:1: tools[0]: expected a function with a string \"name\""));
  // nlohmann::json input works too (keys already sorted by it).
  CHECK(conversation_from_json(nlohmann::json::parse(R"([{"role": "user", "content": "x"}])"), nullptr, "w").messages.size() == 1);
}

TEST_CASE("llama3: the Llama 3.1 template, text and trainable segments", "[chat]") {
  ChatRenderOptions o;
  o.bos_token = "<|begin_of_text|>";
  const auto s = render_chat(ChatTemplateKind::llama3,
                             parse(R"([{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello!\n"}])"), o);
  const std::string sys = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
                          "2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>";
  CHECK(joined(s) == sys + "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>");
  CHECK(trainable_parts(s) == std::vector<std::string>{"Hello!<|eot_id|>"});
  CHECK(s.back().trainable);

  // Tools in the first user message, the call as {"name", "parameters"}, the result as ipython (tojson'd).
  const auto t = render_chat(ChatTemplateKind::llama3, parse(kToolConv, kTools), o);
  const std::string text = joined(t);
  CHECK_THAT(text, ContainsSubstring("system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\n"
                                     "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                                     "Given the following functions"));
  CHECK_THAT(text, ContainsSubstring("{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"get_weather\",\n"));
  CHECK_THAT(text, ContainsSubstring("}\n\nWeather in Paris?<|eot_id|>"));
  CHECK(trainable_parts(t) == std::vector<std::string>{
                                  "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\", \"unit\": \"C\"}}<|eot_id|>",
                                  "It is 22 C.<|eot_id|>"});
  CHECK_THAT(text, ContainsSubstring("<|start_header_id|>ipython<|end_header_id|>\n\n\"22 C\"<|eot_id|>"));

  o.add_generation_prompt = true;
  o.date_string = "01 Jan 2025";
  const std::string g = render_chat_text(ChatTemplateKind::llama3, parse(R"([{"role": "user", "content": "Hi"}])"), o);
  CHECK_THAT(g, ContainsSubstring("Today Date: 01 Jan 2025\n\n"));
  CHECK_THAT(g, Catch::Matchers::EndsWith("Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"));

  CHECK_THROWS_WITH(render_chat(ChatTemplateKind::llama3,
                                parse(R"([{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls":
                                  [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]}])"), o, "d:3"),
                    ContainsSubstring("d:3: messages[1]: the llama3 template takes one tool call per assistant turn, found 2"));
}

TEST_CASE("chatml: the Qwen2.5 template, tools, grouped tool responses, segments", "[chat]") {
  ChatRenderOptions o;
  const auto plain = parse(R"([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])");
  auto s = render_chat(ChatTemplateKind::chatml, plain, o);
  CHECK(joined(s) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n");
  CHECK(trainable_parts(s) == std::vector<std::string>{"Hello<|im_end|>"});
  CHECK(s.back().text == "\n");   // the "\n" after <|im_end|> is prompt
  CHECK_FALSE(s.back().trainable);
  o.default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
  CHECK(render_chat_text(ChatTemplateKind::chatml, plain, o).rfind(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n", 0) == 0);

  const auto c = parse(R"([{"role": "user", "content": "Two cities"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [{"function": {"name": "w", "arguments": {"city": "A"}}},
                                                   {"function": {"name": "w", "arguments": {"city": "B"}}}]},
    {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}, {"role": "assistant", "content": "Done"}])",
                       R"([{"type": "function", "function": {"name": "w", "parameters": {}}}])");
  o.add_generation_prompt = false;
  s = render_chat(ChatTemplateKind::chatml, c, o);
  CHECK(joined(s) ==
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\nYou may call "
        "one or more functions to assist with the user query.\n\nYou are provided with function signatures within "
        "<tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"w\", \"parameters\": {}}}\n"
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
        "</tool_call><|im_end|>\n<|im_start|>user\nTwo cities<|im_end|>\n<|im_start|>assistant\nChecking.\n<tool_call>\n"
        "{\"name\": \"w\", \"arguments\": {\"city\": \"A\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"w\", \"arguments\": "
        "{\"city\": \"B\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n1\n</tool_response>\n"
        "<tool_response>\n2\n</tool_response><|im_end|>\n<|im_start|>assistant\nDone<|im_end|>\n");
  CHECK(trainable_parts(s).size() == 2);
  CHECK(trainable_parts(s)[0].rfind("Checking.\n<tool_call>", 0) == 0);
  o.default_system.clear();
  CHECK(render_chat_text(ChatTemplateKind::chatml, c, o).rfind("<|im_start|>system\n# Tools\n\n", 0) == 0);
}

TEST_CASE("hermes: the Hermes 3 tool_use template", "[chat]") {
  ChatRenderOptions o;
  o.bos_token = "<|begin_of_text|>";
  o.add_generation_prompt = true;
  const auto c = parse(R"([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f",
      "arguments": {"a": ["x"]}}}]}, {"role": "tool", "content": "r"}])",
                       R"([{"type": "function", "function": {"name": "f", "description": "D", "parameters": {"type": "object",
      "properties": {"a": {"type": "array", "items": {"type": "string"}, "description": " x "}, "b": {"type": ["string",
      "integer"]}, "c": {"description": "no type"}, "d": {"type": "object", "additionalProperties": {"type": "number"}},
      "e": {"type": "object"}}, "required": ["a"]}}}])");
  const auto s = render_chat(ChatTemplateKind::hermes, c, o);
  const std::string text = joined(s);
  CHECK_THAT(text, ContainsSubstring(
                       "<tools> {\"type\": \"function\", \"function\": {\"name\": \"f\", \"description\": \"f(a: list[Union[]], "
                       "b: Union[str,int], c: Union[], d: dict[str, float], e: dict) - D\n\n    Args:\n        a(list[Union[]]): x"
                       "        b(Union[str,int]):         c(Union[]): no type        d(dict[str, float]):         e(dict): \", "
                       "\"parameters\": {\"type\": \"object\", \"properties\": {\"a\": "));
  CHECK_THAT(text, Catch::Matchers::EndsWith(
                       "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"f\", \"arguments\": "
                       "{\"a\": [\"x\"]}}\n</tool_call><|im_end|>\n<|im_start|>tool\n<tool_response>\nr\n</tool_response>"
                       "<|im_end|><|im_start|>assistant\n"));
  CHECK(text.rfind("<|begin_of_text|><|im_start|>system\nYou are a function calling AI model.", 0) == 0);
}

TEST_CASE("mistral and alpaca", "[chat]") {
  ChatRenderOptions o;
  o.bos_token = "<s>";
  const auto c = parse(R"([{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant",
    "content": "A1"}, {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}])");
  const auto m = render_chat(ChatTemplateKind::mistral, c, o);
  CHECK(joined(m) == "<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]A2</s>");
  CHECK(trainable_parts(m) == std::vector<std::string>{"A1</s>", "A2</s>"});
  CHECK_THROWS_WITH(render_chat(ChatTemplateKind::mistral, parse(R"([{"role": "assistant", "content": "x"}])"), o, "m:1"),
                    ContainsSubstring("m:1: messages[0]: the mistral template needs user and assistant turns in turn"));
  CHECK_THROWS_WITH(render_chat(ChatTemplateKind::mistral,
                                parse(R"([{"role": "user", "content": "x"}, {"role": "system", "content": "x"}])"), o, "m:2"),
                    ContainsSubstring("m:2: messages[1]: the mistral template takes a system message only as the first"));

  o.bos_token = "";
  o.eos_token = "</s>";
  const auto a = render_chat(ChatTemplateKind::alpaca, alpaca_conversation("Add.", "1 2", "3"), o);
  CHECK(joined(a) == "Below is an instruction that describes a task, paired with an input that provides further context. "
                     "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
                     "### Input:\n1 2\n\n### Response:\n3</s>");
  CHECK(trainable_parts(a) == std::vector<std::string>{"3</s>"});
  o.add_generation_prompt = true;
  CHECK(render_chat_text(ChatTemplateKind::alpaca, parse(R"([{"role": "user", "content": "Hi"}])"), o) ==
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nHi\n\n### Response:\n");
  CHECK_THROWS_WITH(render_chat(ChatTemplateKind::alpaca, parse(kToolConv), o, "a:1"),
                    ContainsSubstring("a:1: messages[2]: the alpaca template needs instruction (user)"));
}

TEST_CASE("chat template names and detection", "[chat]") {
  CHECK(chat_template_from_name("Llama-3") == ChatTemplateKind::llama3);
  CHECK(chat_template_from_name("qwen2.5") == ChatTemplateKind::chatml);
  CHECK(chat_template_from_name("hermes-3") == ChatTemplateKind::hermes);
  CHECK_THROWS_WITH(chat_template_from_name("vicuna"), ContainsSubstring("expected one of llama3, chatml, mistral, alpaca"));
  for (auto k : {ChatTemplateKind::llama3, ChatTemplateKind::chatml, ChatTemplateKind::mistral, ChatTemplateKind::alpaca,
                 ChatTemplateKind::hermes})
    CHECK(chat_template_from_name(chat_template_name(k)) == k);

  const fs::path assets = "/work/shared/assets";
  if (!fs::exists(assets / "templates")) SKIP("no " + assets.string());
  const std::pair<const char*, ChatTemplateKind> files[] = {
      {"meta-llama-Llama-3.1-8B-Instruct.jinja", ChatTemplateKind::llama3},
      {"Qwen-Qwen2.5-7B-Instruct.jinja", ChatTemplateKind::chatml},
      {"NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", ChatTemplateKind::hermes},
      {"HuggingFaceTB-SmolLM3-3B.jinja", ChatTemplateKind::chatml}};
  for (const auto& [f, kind] : files) {
    ChatTemplateKind k{};
    INFO(f);
    CHECK(detect_chat_template(read_text(assets / "templates" / f), k));
    CHECK(k == kind);
  }
  ChatTemplateKind k{};
  const auto cfg = nlohmann::json::parse(read_text(assets / "tokenizers/llama3/tokenizer_config.json"));
  CHECK(detect_chat_template(cfg.at("chat_template").get<std::string>(), k));
  CHECK(k == ChatTemplateKind::llama3);
  CHECK(detect_chat_template("{{ bos_token }}{% for message in messages %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endfor %}", k));
  CHECK(k == ChatTemplateKind::mistral);
  CHECK_FALSE(detect_chat_template("[INST] <<SYS>>\n{{ system }}\n<</SYS>>", k));
  CHECK_FALSE(detect_chat_template("{{ messages }}", k));
}

// Hook for tests/oracle/chat_template_hf.py: every *.case.json in $QLORA_CHAT_ORACLE_DIR holds
// {"kind", "messages", "tools", "options": {bos_token, eos_token, add_generation_prompt,
// date_string, default_system}}; the hook writes NAME.ours.txt (the text), NAME.segments.json
// ([[text, trainable], ...]) or NAME.error.txt.
TEST_CASE("chat template oracle hook: render the cases the script wrote", "[.chat_oracle]") {
  const char* root = std::getenv("QLORA_CHAT_ORACLE_DIR");
  if (!root) SKIP("QLORA_CHAT_ORACLE_DIR not set");
  std::vector<fs::path> cases;
  for (const auto& de : fs::directory_iterator(root)) {
    const std::string n = de.path().filename().string();
    if (n.size() > 10 && n.substr(n.size() - 10) == ".case.json") cases.push_back(de.path());
  }
  std::sort(cases.begin(), cases.end());
  int failed = 0;
  for (const auto& p : cases) {
    const std::string name = p.filename().string().substr(0, p.filename().string().size() - 10);
    const fs::path dir = p.parent_path();
    try {
      const ojson c = ojson::parse(read_text(p));
      const ojson& opt = c.at("options");
      ChatRenderOptions o;
      o.bos_token = opt.value("bos_token", "");
      o.eos_token = opt.value("eos_token", "");
      o.add_generation_prompt = opt.value("add_generation_prompt", false);
      o.date_string = opt.value("date_string", o.date_string);
      o.default_system = opt.value("default_system", "");
      const Conversation conv = conversation_from_json(c.at("messages"), c.value("tools", ojson()), name);
      const auto segs = render_chat(chat_template_from_name(c.at("kind").get<std::string>()), conv, o, name);
      ojson js = ojson::array();
      for (const auto& s : segs) js.push_back(ojson::array({s.text, s.trainable}));
      std::ofstream(dir / (name + ".ours.txt"), std::ios::binary) << joined(segs);
      std::ofstream(dir / (name + ".segments.json"), std::ios::binary) << js.dump();
    } catch (const std::exception& e) {
      ++failed;
      std::ofstream(dir / (name + ".error.txt")) << e.what();
      std::printf("chat oracle: %s: error: %s\n", name.c_str(), e.what());
    }
  }
  std::printf("chat oracle: %zu cases, %d errors\n", cases.size(), failed);
  CHECK(!cases.empty());
}
