"""Talking to a teacher from inside an episode: one call, parsed, with malformed replies counted and retried.

The mock user, the mock tool and the rubric judge all go through `ask`: a reply the parser rejects is counted
(`<what>/malformed`) and asked again with a short correction appended, so the retry is a different request
(a caching client would otherwise hand back the same bad reply); a teacher that raises (HTTP error after
the client's own retries, timeout) is counted (`<what>/errors`) and retried the same way. After the last
attempt `TeacherReplyError` names what failed; callers turn it into an observation or an episode error,
never a crashed batch.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Callable, Optional

ChatFn = Callable[[list[dict]], str]   # messages -> assistant text (any OpenAI-compatible teacher)


class TeacherReplyError(RuntimeError):
    """No usable teacher reply after every attempt."""


class MalformedReply(ValueError):
    """Raised by a parser: the reply cannot be used; the message is fed back to the teacher."""


def ask(chat: ChatFn, messages: list[dict], parse: Callable[[str], Any], *, what: str,
        counters: Optional[Counter] = None, attempts: int = 3) -> Any:
    """`parse(chat(messages))`, retried up to `attempts` times with the parser's complaint appended."""
    counters = counters if counters is not None else Counter()
    convo = list(messages)
    last = "no attempt"
    for _ in range(max(1, attempts)):
        counters[f"{what}/calls"] += 1
        try:
            reply = chat(convo)
        except Exception as e:  # noqa: BLE001 - an outage of the teacher, counted and retried
            counters[f"{what}/errors"] += 1
            last = f"{type(e).__name__}: {str(e)[:200]}"
            convo = list(messages) + [{"role": "user", "content": "(The previous request failed; please answer again.)"}]
            continue
        try:
            return parse(reply or "")
        except MalformedReply as e:
            counters[f"{what}/malformed"] += 1
            last = f"malformed reply ({e}): {(reply or '')[:120]!r}"
            convo = list(messages) + [{"role": "assistant", "content": (reply or "")[:2000]},
                                      {"role": "user", "content": f"Your reply could not be used: {e}. "
                                                                  f"Answer again in exactly the requested format."}]
    counters[f"{what}/failed"] += 1
    raise TeacherReplyError(f"{what}: no usable teacher reply after {attempts} attempts ({last})")


def extract_json_object(text: str) -> Any:
    """The first JSON object in a teacher reply (tolerates code fences and prose around it)."""
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch == "{":
            try:
                obj, _ = dec.raw_decode(text[i:])
                return obj
            except json.JSONDecodeError:
                continue
    raise MalformedReply(f"no JSON object in the reply: {text[:120]!r}")


def last_tag(text: str, tag: str) -> Optional[str]:
    """Body of the last <tag>...</tag> in `text` (None when there is none)."""
    end = text.rfind(f"</{tag}>")
    if end < 0:
        return None
    start = text.rfind(f"<{tag}>", 0, end)
    return None if start < 0 else text[start + len(tag) + 2:end].strip()


def openai_chat(base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0,
                max_tokens: int = 512, timeout: float = 60.0, max_retries: int = 2, **create_kwargs) -> ChatFn:
    """A `chat(messages) -> str` over any OpenAI-compatible endpoint (SGLang, vLLM, OpenAI), for standalone use
    of the envs; the trainer passes the flywheel's cached client (`TeacherClient.as_callable(role)`) instead.
    The key is read from the environment variable `api_key_env` (a placeholder when unset: local servers
    accept any key)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY", timeout=timeout,
                    max_retries=max_retries)

    def chat(messages: list[dict]) -> str:
        resp = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                              max_tokens=max_tokens, **create_kwargs)
        return resp.choices[0].message.content or ""

    return chat
