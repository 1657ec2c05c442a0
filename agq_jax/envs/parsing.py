"""Strict, counted parsing of a Qwen3 agent reply.

A reply may hold `<think>…</think>` (ignored for actions), any number of
`<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks, plain text for the user (optionally wrapped in
`<question>` / `<answer>` as in the AgenticQwen reference), and the `###TRANSFER_TO_HUMAN` marker.
Nothing here raises on model output: every defect becomes a `ParseIssue` (kind + detail) that the runtime
shows to the agent and counts.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TRANSFER_MARKER = "###TRANSFER_TO_HUMAN"
STOP_MARKER = "###STOP"   # the reference user's end marker (a trailing "###" is tolerated)

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S)
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_TAG = re.compile(r"<(question|answer)>(.*?)</\1>", re.S)

_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
ISSUE_KINDS = ("unclosed_tool_call", "stray_tool_call_end", "invalid_json", "not_an_object", "missing_name",
               "bad_arguments", "arguments_as_string", "unclosed_think", "empty_reply")


@dataclass
class ParsedCall:
    name: str
    arguments: dict
    raw: str = ""


@dataclass
class ParseIssue:
    kind: str
    detail: str
    raw: str = ""
    fatal: bool = True      # False: accepted leniently but still counted (e.g. arguments sent as a JSON string)


@dataclass
class ParsedReply:
    thinking: str = ""
    content: str = ""                       # visible text without think / tool-call blocks
    tool_calls: list[ParsedCall] = field(default_factory=list)
    issues: list[ParseIssue] = field(default_factory=list)
    question: str | None = None
    answer: str | None = None
    transfer: bool = False

    @property
    def malformed(self) -> bool:
        return any(i.fatal for i in self.issues)

    def user_text(self) -> str:
        """What the user sees: the question / answer bodies if tagged, else the content."""
        parts = [p for p in (self.question, self.answer) if p]
        text = "\n".join(parts) if parts else self.content
        return text.replace(TRANSFER_MARKER, "").strip()


def split_thinking(text: str) -> tuple[str, str, list[ParseIssue]]:
    """(thinking, rest, issues). A leading `…</think>` without an opening tag is thinking too (the
    generation prompt may already contain `<think>`)."""
    issues: list[ParseIssue] = []
    thinking = []
    if "</think>" in text and "<think>" not in text.split("</think>", 1)[0]:
        head, text = text.split("</think>", 1)
        thinking.append(head)
    thinking += [m[len("<think>"):-len("</think>")] for m in _THINK_BLOCK.findall(text)]
    text = _THINK_BLOCK.sub("", text)
    if "<think>" in text:
        head, tail = text.split("<think>", 1)
        issues.append(ParseIssue("unclosed_think", "a <think> block was never closed; its text was ignored", tail[:200]))
        thinking.append(tail)
        text = head
    return "\n".join(t.strip() for t in thinking).strip(), text, issues


def _parse_call(body: str) -> tuple[ParsedCall | None, list[ParseIssue]]:
    raw = body.strip()
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, [ParseIssue("invalid_json", f"tool call is not valid JSON: {e.msg} at char {e.pos}", raw[:300])]
    if not isinstance(obj, dict):
        return None, [ParseIssue("not_an_object", f"tool call must be a JSON object, got {type(obj).__name__}", raw[:300])]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None, [ParseIssue("missing_name", 'tool call needs a string "name"', raw[:300])]
    issues: list[ParseIssue] = []
    args: Any = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
            issues.append(ParseIssue("arguments_as_string", "arguments were a JSON string; accepted", raw[:300], fatal=False))
        except json.JSONDecodeError:
            return None, [ParseIssue("bad_arguments", '"arguments" is a string that is not JSON', raw[:300])]
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None, [ParseIssue("bad_arguments", f'"arguments" must be an object, got {type(args).__name__}', raw[:300])]
    return ParsedCall(name, args, raw), issues


def parse_reply(text: str) -> ParsedReply:
    """Parse one agent reply; never raises."""
    out = ParsedReply()
    text = text or ""
    for tok in _END_TOKENS:   # a decoded reply may still carry its end-of-turn token
        text = text.replace(tok, "")
    out.thinking, rest, out.issues = split_thinking(text)
    pos, visible = 0, []
    for m in _TOOL_CALL.finditer(rest):
        visible.append(rest[pos:m.start()])
        pos = m.end()
        call, issues = _parse_call(m.group(1))
        out.issues += issues
        if call is not None:
            out.tool_calls.append(call)
    tail = rest[pos:]
    if "<tool_call>" in tail:
        head, body = tail.split("<tool_call>", 1)
        out.issues.append(ParseIssue("unclosed_tool_call", "a <tool_call> was opened but never closed", body[:300]))
        tail = head
    if "</tool_call>" in tail:
        out.issues.append(ParseIssue("stray_tool_call_end", "</tool_call> without an opening <tool_call>", tail[:300]))
        tail = tail.replace("</tool_call>", "")
    visible.append(tail)
    out.content = "".join(visible).strip()
    for tag, body in _TAG.findall(out.content):
        setattr(out, tag, ((getattr(out, tag) or "") + "\n" + body.strip()).strip())
    out.transfer = TRANSFER_MARKER in out.content
    if not out.content and not out.tool_calls and not out.issues:
        out.issues.append(ParseIssue("empty_reply", "the reply had no text and no tool call", ""))
    return out


def format_tool_call(name: str, arguments: dict) -> str:
    """The Qwen3 rendering of one call (what the chat template emits for an assistant `tool_calls` entry)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"
