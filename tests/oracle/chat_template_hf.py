#!/usr/bin/env python3
"""Oracle: our chat templates (src/data/chat_template*.cpp) against HF transformers'
apply_chat_template, text for text.

Conversations (plain, multi-turn, with and without system, tool definitions + assistant tool
call + tool result + final answer, two tool calls with grouped results, generation prompts) are
written as JSON into a temp dir; the hidden Catch test "[.chat_oracle]"
(tests/test_chat_template.cpp) renders each with our code (QLORA_CHAT_ORACLE_DIR); transformers
renders the same conversation with a PreTrainedTokenizerFast built from
/work/shared/assets/tokenizers/llama3/tokenizer.json and chat_template set to:
  llama3   assets/templates/meta-llama-Llama-3.1-8B-Instruct.jinja
  chatml   assets/templates/Qwen-Qwen2.5-7B-Instruct.jinja (our default_system = Qwen's)
  smollm2  chatml with SmolLM2-Instruct's template (REFERENCE_TEMPLATES below; default_system =
           its prompt; no tools)
  hermes   assets/templates/NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja (tools=[] for a
           conversation without tools: the template fails on None)
  mistral  the Mistral-7B-Instruct-v0.2 template with our system-message rule (REFERENCE_TEMPLATES)
  alpaca   our Stanford Alpaca spec written as Jinja (REFERENCE_TEMPLATES)
mistral and alpaca have no real template in the assets: their references are the specs the C++
comments state, written independently in Jinja. A case marked error must fail on both sides.
Also checked: our segments concatenate to our text, and there is one trainable segment per
assistant turn, ending with the turn's end token.

Usage: .venv/bin/python tests/oracle/chat_template_hf.py --tests build/qlora_tests [--keep DIR]
Exit 0: pass, 1: a mismatch (diff printed), 77: skipped (transformers or the assets missing).
"""
import argparse
import copy
import difflib
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ASSETS = "/work/shared/assets"
try:
    from transformers import PreTrainedTokenizerFast
except ImportError as e:
    print(f"SKIP: {e} (scripts/setup installs transformers into .venv)")
    sys.exit(77)
if not os.path.isdir(os.path.join(ASSETS, "templates")):
    print(f"SKIP: {ASSETS} missing")
    sys.exit(77)

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
REFERENCE_TEMPLATES = {
    # HuggingFaceTB/SmolLM2-1.7B-Instruct's chat_template.
    "smollm2": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
                "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # Mistral-7B-Instruct-v0.2's template, plus: a first system message goes before the first user message.
    "mistral": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
                "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
                "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                "{% if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
                "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
    # Stanford Alpaca's PROMPT_DICT as a chat: a system message replaces the preamble sentence, a
    # second consecutive user message is the ### Input, "### Response:\n" is the assistant header.
    "alpaca": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
               "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}"
               "{% if messages|length > 1 and messages[1]['role'] == 'user' %}"
               "{{ 'Below is an instruction that describes a task, paired with an input that provides further context. "
               "Write a response that appropriately completes the request.\n\n' }}"
               "{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n' }}{% endif %}{% endif %}"
               "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
               "{% if loop.first or loop.previtem['role'] != 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
               "{% else %}{{ '### Input:\n' + message['content'] + '\n\n' }}{% endif %}"
               "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token }}"
               "{% if not loop.last %}{{ '\n\n' }}{% endif %}"
               "{% else %}{{ raise_exception('alpaca: user and assistant only') }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"),
}
FAMILIES = {  # name: (our kind, template file or reference, options, end-of-turn token, handles tools)
    "llama3": ("llama3", "meta-llama-Llama-3.1-8B-Instruct.jinja", {"bos_token": "<|begin_of_text|>"}, "<|eot_id|>", True),
    "chatml": ("chatml", "Qwen-Qwen2.5-7B-Instruct.jinja", {"default_system": QWEN_SYSTEM}, "<|im_end|>", True),
    "smollm2": ("chatml", None, {"default_system": SMOL_SYSTEM}, "<|im_end|>", False),
    "hermes": ("hermes", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", {"bos_token": "<|begin_of_text|>"},
               "<|im_end|>", True),
    "mistral": ("mistral", None, {"bos_token": "<s>", "eos_token": "</s>"}, "</s>", False),
    "alpaca": ("alpaca", None, {"bos_token": "", "eos_token": "<|end_of_text|>"}, "<|end_of_text|>", False),
}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["C", "F"], "description": "Temperature unit"},
        "days": {"type": "integer", "description": "Forecast days"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Current local time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "description": " IANA zone "},
                                                    "precise": {"type": "boolean"}}, "required": []}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]


def u(c):
    return {"role": "user", "content": c}


def a(c):
    return {"role": "assistant", "content": c}


def s(c):
    return {"role": "system", "content": c}


def call(name, args, as_string=False, cid="call_1"):
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False) if as_string else args}}


def cases():
    """(name, messages as in the dataset, tools or None, add_generation_prompt, families, expect_error)."""
    plain = ["llama3", "chatml", "smollm2", "hermes", "mistral", "alpaca"]
    tooly = ["llama3", "chatml", "hermes"]
    args = {"city": "Zürich", "unit": "C", "days": 2, "ratio": 0.25, "nested": {"z": [1, 2.5e-7], "a": None}}
    yield "plain", [u("Hello!"), a("Hi there. How can I help?")], None, False, plain, False
    yield "multi", [u("  What is 2+2?\n"), a("4\n"), u('Say "quoted" and a tab\there'), a(" Done: «ok» ")], None, False, plain, False
    yield "system", [s("You are terse."), u("Name a color."), a("Blue.")], None, False, plain, False
    yield "system_gen", [s("You are terse."), u("Name a color.")], None, True, plain, False
    yield "nosys_gen", [u("Write a haiku about rain.")], None, True, plain, False
    yield "gen_after_turns", [u("a"), a("b"), u("c")], None, True, plain, False
    yield "alpaca_input", [u("Summarise the text."), u("The cat sat on the mat."), a("A cat sat.")], None, False, ["alpaca"], False
    yield "system_mid", [u("a"), s("late system"), a("b")], None, False, ["llama3", "chatml", "smollm2", "hermes"], False
    yield "tools", [s("Use tools when needed."), u("Weather in Zürich?"),
                    {"role": "assistant", "content": None, "tool_calls": [call("get_weather", args, as_string=True)]},
                    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp": 21, "sky": "clear"}'},
                    a("It is 21 °C and clear.")], TOOLS, False, tooly, False
    yield "tools_nosys_gen", [u("What time is it in Tokyo?"),
                              {"role": "assistant", "content": None, "tool_calls": [call("get_time", {"zone": "Asia/Tokyo"})]},
                              {"role": "tool", "content": "09:41"}], TOOLS, True, tooly, False
    yield "tools_no_call", [u("Hi"), a("Hello! Ask me about the weather.")], TOOLS, False, tooly, False
    two = [u("Weather in Paris and Rome?"),
           {"role": "assistant", "content": "Let me check both.", "tool_calls": [
               call("get_weather", {"city": "Paris"}, cid="c1"), call("get_weather", {"city": "Rome"}, cid="c2")]},
           {"role": "tool", "tool_call_id": "c1", "content": "18 C"}, {"role": "tool", "tool_call_id": "c2", "content": "25 C"},
           a("Paris 18 C, Rome 25 C.")]
    yield "two_calls", two, TOOLS, False, ["chatml", "hermes"], False
    yield "two_calls_llama3", two, TOOLS, False, ["llama3"], True
    odd = {"f": [1.0, -0.0, 1e16, 1e15, 123456.789, 1e-5, 0.0001, 2**63 - 1, -2**63], "e": {}, "l": [],
           "s": "tab\t nl\n ctrl\u0001\u001f del\u007f \\ / \u2028 é 😀"}
    yield "odd_json", [u("\u00a0\u3000 spaces\u2003\n"), {"role": "assistant", "content": "", "tool_calls": [call("get_weather", odd)]},
                       {"role": "tool", "content": "line1\n\"q\" \u0002 ü"}, a("\u00a0ok\u200b ")], [WEATHER_TOOL], False, tooly, False
    yield "tool_in_alpaca", [u("x"), {"role": "tool", "content": "y"}], None, False, ["mistral", "alpaca"], True


def hf_messages(messages):
    """The conversation as HF gets it: arguments given as JSON strings are parsed (we parse them too)."""
    out = copy.deepcopy(messages)
    for m in out:
        for tc in m.get("tool_calls") or []:
            if isinstance(tc["function"]["arguments"], str):
                tc["function"]["arguments"] = json.loads(tc["function"]["arguments"])
    return out


def render_hf(tok, fam, messages, tools, gen):
    kind, tmpl, opts, _, _ = FAMILIES[fam]
    source = REFERENCE_TEMPLATES[fam] if tmpl is None else open(os.path.join(ASSETS, "templates", tmpl)).read()
    if fam == "hermes" and tools is None:
        tools = []
    kwargs = {k: v for k, v in opts.items() if k in ("bos_token", "eos_token")}
    if fam == "chatml" or fam == "smollm2":
        kwargs.setdefault("bos_token", "")
    return tok.apply_chat_template(hf_messages(messages), tools=tools, chat_template=source, tokenize=False,
                                   add_generation_prompt=gen, **kwargs)


def show_diff(ref, ours):
    for line in difflib.unified_diff(ref.splitlines(keepends=True), ours.splitlines(keepends=True), "transformers", "ours", n=2):
        print("   ", repr(line))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tests", required=True, help="the qlora_tests binary")
    ap.add_argument("--keep", help="write the cases and outputs here (kept)")
    args = ap.parse_args()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ASSETS, "tokenizers/llama3/tokenizer.json"))
    work = args.keep or tempfile.mkdtemp(prefix="chat_oracle_")
    os.makedirs(work, exist_ok=True)
    todo = []
    for name, messages, tools, gen, fams, expect_error in cases():
        for fam in fams:
            cid = f"{fam}.{name}"
            opts = dict(FAMILIES[fam][2], add_generation_prompt=gen)
            with open(os.path.join(work, cid + ".case.json"), "w", encoding="utf-8") as f:
                json.dump({"kind": FAMILIES[fam][0], "messages": messages, "tools": tools, "options": opts}, f,
                          ensure_ascii=False)
            todo.append((cid, fam, messages, tools, gen, expect_error))
    env = dict(os.environ, QLORA_CHAT_ORACLE_DIR=work)
    r = subprocess.run([args.tests, "[.chat_oracle]"], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-4000:])
        print("FAIL: the [.chat_oracle] hook failed")
        return 1
    failures = 0
    print(f"{'case':34} {'chars':>6} {'trainable':>9}  result")
    for cid, fam, messages, tools, gen, expect_error in todo:
        ours_p, err_p = os.path.join(work, cid + ".ours.txt"), os.path.join(work, cid + ".error.txt")
        try:
            ref, ref_err = render_hf(tok, fam, messages, tools, gen), None
        except Exception as e:  # noqa: BLE001 - the template's raise_exception and Jinja errors alike
            ref, ref_err = None, f"{type(e).__name__}: {e}"
        ours_err = open(err_p).read() if os.path.exists(err_p) else None
        ours = open(ours_p, encoding="utf-8").read() if os.path.exists(ours_p) else None
        if expect_error or ref_err or ours_err:
            ok = bool(ref_err) and bool(ours_err) and expect_error
            result = "ok (both fail)" if ok else f"FAIL: transformers: {ref_err or 'renders'}; ours: {ours_err or 'renders'}"
            print(f"{cid:34} {'-':>6} {'-':>9}  {result}")
            failures += not ok
            continue
        segs = json.load(open(os.path.join(work, cid + ".segments.json"), encoding="utf-8"))
        problems = []
        if ours != ref:
            problems.append("text differs")
        if "".join(t for t, _ in segs) != ours:
            problems.append("segments do not concatenate to the text")
        trainable = [t for t, tr in segs if tr]
        n_assistant = sum(m["role"] == "assistant" for m in messages)
        end = FAMILIES[fam][3]
        if len(trainable) != n_assistant or not all(t.endswith(end) for t in trainable):
            problems.append(f"{len(trainable)} trainable segments for {n_assistant} assistant turns (each ending {end!r})")
        print(f"{cid:34} {len(ours):6d} {sum(map(len, trainable)):9d}  {'ok' if not problems else 'FAIL: ' + ', '.join(problems)}")
        if ours != ref:
            show_diff(ref, ours)
        failures += bool(problems)
    print(f"chat_template_hf: {len(todo)} cases, {failures} failed (work dir {work})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
