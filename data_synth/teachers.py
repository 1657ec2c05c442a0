"""The one client every stage uses to talk to teacher LLMs behind OpenAI-compatible endpoints.

SGLang (GPU), sglang-jax (TPU/CPU), a loopback replay server in tests: all are reached through
`AsyncOpenAI(...).chat.completions.create` here, with per-role endpoints from config, bounded
concurrency, timeouts, retries with exponential backoff, an on-disk response cache keyed by the
request (a re-run issues zero requests), and token / latency accounting. API keys are read from
the environment variable *named* in config; the key itself is never stored, printed or logged.

The client owns a private event loop in a daemon thread so it can be used both from async stage
code (`await client.chat(...)`) and from the synchronous mock-world runtime in any thread
(`client.chat_sync(...)`, `client.as_callable(role)` -> `chat(messages) -> str`).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Sequence

import openai

from agq_jax.envs.schema import stable_hash
from data_synth.io_utils import atomic_write_json

log = logging.getLogger(__name__)

ROLES = ("synthesizer", "mock_user", "mock_tool", "judge", "solver")
_RETRYABLE = ("timeout", "connection", "rate_limit", "server_error")


class TeacherError(RuntimeError):
    """A request that failed after all retries; `kind` is one of timeout / connection / rate_limit /
    server_error / bad_request / empty."""

    def __init__(self, kind: str, role: str, url: str, message: str):
        super().__init__(f"teacher {role!r} at {url}: {kind}: {message}")
        self.kind, self.role, self.url = kind, role, url


class TeacherUnavailable(RuntimeError):
    """A teacher endpoint that never answered its health check."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where one role's requests go and how they are sampled. Holds the *name* of the key's env var."""
    base_url: str
    model: str
    api_key_env: str = ""
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 2048
    timeout_s: float = 120.0
    max_retries: int = 3
    backoff_s: float = 1.0
    concurrency: int = 8
    seed: int | None = 0
    extra_body: Mapping[str, Any] | None = None  # e.g. {"chat_template_kwargs": {"enable_thinking": False}}

    def api_key(self) -> str:
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise TeacherUnavailable(f"env var {self.api_key_env!r} (API key for {self.base_url}) is not set")
            return key
        return "EMPTY"  # SGLang accepts any key when launched without --api-key

    def public(self) -> dict:
        """What may go into manifests and logs (no key, only the env var's name)."""
        d = dataclasses.asdict(self)
        d["extra_body"] = dict(self.extra_body or {})
        return d


def is_loopback(url: str) -> bool:
    return url == "loopback" or url.startswith("loopback?")


def _loopback_options(url: str) -> dict:
    """`loopback?malformed_rate=0.2` -> {"malformed_rate": 0.2}; an unknown option names itself."""
    import urllib.parse

    query = urllib.parse.parse_qs(url.partition("?")[2], strict_parsing=bool(url.partition("?")[2]))
    out = {}
    for key, values in query.items():
        if key != "malformed_rate":
            raise ValueError(f"config teachers base_url {url!r}: unknown loopback option {key!r} (malformed_rate)")
        out[key] = float(values[-1])
    return out


def client_from_config(teachers, cache_dir: str) -> "TeacherClient | None":
    """The client of a run config's `teachers` section (agq_jax.run_config TeachersSection), or None offline.

    Every role's endpoint is fully resolved by the section (role value, else `teachers.default`'s); the
    trainer and `python -m data_synth.run` both build their client here. A `loopback` URL starts the
    scripted loopback teacher in-process for the client's lifetime (data_synth.loopback_teacher);
    `loopback?malformed_rate=0.2` makes that share of its replies malformed (seeded by teachers.default.seed)."""
    specs = teachers.endpoints()
    if not specs:
        return None
    server = None
    loop_urls = {ep["base_url"] for ep in specs.values() if is_loopback(ep["base_url"])}
    if len(loop_urls) > 1:
        raise ValueError(f"config teachers: one loopback teacher per run, got {sorted(loop_urls)}")
    if loop_urls:
        from data_synth.loopback_teacher import start_loopback_teacher

        url = loop_urls.pop()
        server = start_loopback_teacher(**_loopback_options(url), seed=int(specs[next(iter(specs))]["seed"]))
        specs = {r: dict(ep, base_url=server.base_url if ep["base_url"] == url else ep["base_url"])
                 for r, ep in specs.items()}
    endpoints = {}
    for role, ep in specs.items():
        thinking = ep.pop("enable_thinking")
        endpoints[role] = Endpoint(**ep, extra_body={"chat_template_kwargs": {"enable_thinking": bool(thinking)}})
    client = TeacherClient(endpoints, cache_dir=teachers.cache_dir or cache_dir)
    if server is not None:
        client.on_close(server.stop)
    return client


@dataclasses.dataclass
class ChatResult:
    text: str                     # message content with any <think>...</think> block removed
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cached: bool
    model: str
    reasoning: str = ""           # reasoning_content or the stripped <think> block
    request_hash: str = ""

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


_THINK_RE = re.compile(r"<think>(.*?)(</think>|$)", re.S)


def split_thinking(content: str) -> tuple[str, str]:
    """Qwen3 without a reasoning parser puts its thoughts inline: return (answer, thoughts)."""
    thoughts = " ".join(m.group(1).strip() for m in _THINK_RE.finditer(content))
    return _THINK_RE.sub("", content).strip(), thoughts


class ResponseCache:
    """One JSON file per request hash under `root/ab/abcd....json`, written atomically."""

    def __init__(self, root: str | None):
        self.root = root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key + ".json")

    def get(self, key: str) -> dict | None:
        if not self.root:
            return None
        p = self._path(key)
        if not os.path.exists(p):
            return None
        try:
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None  # a corrupt entry is simply re-requested

    def put(self, key: str, value: dict) -> None:
        if self.root:
            atomic_write_json(self._path(key), value)


def request_key(ep: Endpoint, messages: Sequence[Mapping], *, temperature: float, top_p: float,
                max_tokens: int, stop, seed, response_format, sample: int) -> str:
    """Hash of everything that determines the reply (not the URL: the same model anywhere answers the same)."""
    return stable_hash({"model": ep.model, "messages": list(messages), "temperature": temperature, "top_p": top_p,
                        "max_tokens": max_tokens, "stop": stop, "seed": seed, "response_format": response_format,
                        "sample": sample, "extra_body": dict(ep.extra_body or {})}, n=40)


@dataclasses.dataclass
class RoleStats:
    requests: int = 0            # HTTP requests actually sent (retries included)
    calls: int = 0               # chat() calls
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    max_latency_s: float = 0.0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["errors"] = dict(self.errors)
        sent = max(1, self.calls - self.cache_hits)
        d["mean_latency_s"] = round(self.latency_s / sent, 4)
        return d


def _render_tool_calls(calls) -> str:
    """A server launched with a tool-call parser may lift `<tool_call>` blocks out of the text; put them back
    in the Qwen3 form so the callers (agents, stages) always see one text format."""
    out = ""
    for c in calls:
        fn = getattr(c, "function", None)
        if fn is None:
            continue
        try:
            args = json.loads(fn.arguments or "{}")
        except (TypeError, json.JSONDecodeError):
            args = fn.arguments
        out += "\n<tool_call>\n" + json.dumps({"name": fn.name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"
    return out


def _classify(exc: BaseException) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.RateLimitError):
        return "rate_limit"
    if isinstance(exc, openai.APIStatusError):
        return "server_error" if exc.status_code >= 500 else "bad_request"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    return "bad_request"


class TeacherClient:
    """Per-role OpenAI-compatible chat client with cache, retries, concurrency limits and accounting."""

    def __init__(self, endpoints: Mapping[str, Endpoint], cache_dir: str | None = None):
        self.endpoints = dict(endpoints)
        self.cache = ResponseCache(cache_dir)
        self.stats: dict[str, RoleStats] = collections.defaultdict(RoleStats)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-loop", daemon=True)
        self._thread.start()
        self._clients: dict[tuple[str, str], openai.AsyncOpenAI] = {}
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._closed = False
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run `fn` when the client closes (e.g. stop a loopback server it owns)."""
        self._on_close.append(fn)

    # ---- public API -------------------------------------------------------------------------
    def has_role(self, role: str) -> bool:
        return role in self.endpoints

    def endpoint(self, role: str) -> Endpoint:
        if role not in self.endpoints:
            raise KeyError(f"no teacher configured for role {role!r} (configured: {sorted(self.endpoints)})")
        return self.endpoints[role]

    async def chat(self, role: str, messages: Sequence[Mapping], **kw) -> ChatResult:
        """Await a reply from any event loop; the request runs on the client's own loop."""
        fut = asyncio.run_coroutine_threadsafe(self._chat(role, list(messages), **kw), self._loop)
        return await asyncio.wrap_future(fut)

    def chat_sync(self, role: str, messages: Sequence[Mapping], **kw) -> ChatResult:
        """Blocking call, safe from any thread except the client's own loop thread."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("chat_sync called from the teacher loop thread (would deadlock); use await chat()")
        return asyncio.run_coroutine_threadsafe(self._chat(role, list(messages), **kw), self._loop).result()

    def as_callable(self, role: str, **kw) -> Callable[[list[dict]], str]:
        """`chat(messages) -> str` for the mock-world runtime (teacher users, tools, solver agents)."""
        def chat(messages: list[dict]) -> str:
            return self.chat_sync(role, messages, **kw).text
        chat.__name__ = f"teacher_{role}"
        return chat

    def stats_dict(self) -> dict:
        with self._lock:
            return {r: s.as_dict() for r, s in sorted(self.stats.items())}

    def models(self) -> dict[str, str]:
        """Role -> model name (what manifests record)."""
        return {r: e.model for r, e in sorted(self.endpoints.items())}

    def endpoints_public(self) -> dict[str, dict]:
        """Role -> endpoint settings without secrets (the key's env var name only)."""
        return {r: e.public() for r, e in sorted(self.endpoints.items())}

    def check_health(self, timeout_s: float = 30.0) -> None:
        for url in sorted({e.base_url for e in self.endpoints.values()}):
            ep = next(e for e in self.endpoints.values() if e.base_url == url)
            wait_until_healthy(url, timeout_s=timeout_s, api_key=ep.api_key())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async def _close_all():
            me = asyncio.current_task()
            for t in asyncio.all_tasks():  # requests of an interrupted round: cancel, don't leak
                if t is not me:
                    t.cancel()
            for c in self._clients.values():
                await c.close()
        try:
            asyncio.run_coroutine_threadsafe(_close_all(), self._loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        for fn in self._on_close:
            fn()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- internals (run on the client's loop) -----------------------------------------------
    def _client(self, ep: Endpoint) -> openai.AsyncOpenAI:
        key = (ep.base_url, ep.api_key_env)
        if key not in self._clients:
            # Retries are ours (counted, backoff), so the SDK's own are off.
            self._clients[key] = openai.AsyncOpenAI(base_url=ep.base_url, api_key=ep.api_key(), max_retries=0,
                                                    timeout=ep.timeout_s)
        return self._clients[key]

    def _sem(self, ep: Endpoint) -> asyncio.Semaphore:
        if ep.base_url not in self._sems:
            self._sems[ep.base_url] = asyncio.Semaphore(max(1, ep.concurrency))
        return self._sems[ep.base_url]

    def _count(self, role: str, **kw) -> None:
        with self._lock:
            s = self.stats[role]
            for k, v in kw.items():
                if k == "error":
                    s.errors[v] += 1
                elif k == "latency_s":
                    s.latency_s += v
                    s.max_latency_s = max(s.max_latency_s, v)
                else:
                    setattr(s, k, getattr(s, k) + v)

    async def _chat(self, role: str, messages: list, *, sample: int = 0, temperature: float | None = None,
                    max_tokens: int | None = None, stop=None, response_format=None) -> ChatResult:
        ep = self.endpoint(role)
        temperature = ep.temperature if temperature is None else temperature
        max_tokens = ep.max_tokens if max_tokens is None else max_tokens
        seed = None if ep.seed is None else ep.seed + sample
        key = request_key(ep, messages, temperature=temperature, top_p=ep.top_p, max_tokens=max_tokens, stop=stop,
                          seed=seed, response_format=response_format, sample=sample)
        self._count(role, calls=1)
        hit = self.cache.get(key)
        if hit is not None:
            self._count(role, cache_hits=1)
            return ChatResult(**{**hit, "cached": True, "latency_s": 0.0})
        kwargs: dict[str, Any] = dict(model=ep.model, messages=messages, temperature=temperature, top_p=ep.top_p,
                                      max_tokens=max_tokens)
        if stop is not None:
            kwargs["stop"] = stop
        if seed is not None:
            kwargs["seed"] = seed
        if response_format is not None:
            kwargs["response_format"] = response_format
        if ep.extra_body:
            kwargs["extra_body"] = dict(ep.extra_body)
        last_exc: BaseException | None = None
        kind = "connection"
        for attempt in range(ep.max_retries + 1):
            if attempt:
                await asyncio.sleep(ep.backoff_s * (2 ** (attempt - 1)))
            t0 = time.perf_counter()
            try:
                async with self._sem(ep):
                    self._count(role, requests=1)
                    resp = await asyncio.wait_for(self._client(ep).chat.completions.create(**kwargs),
                                                  timeout=ep.timeout_s + 5)
            except Exception as e:  # noqa: BLE001 - classified and counted below
                kind, last_exc = _classify(e), e
                self._count(role, error=kind)
                log.warning("teacher %s at %s: %s (attempt %d/%d)", role, ep.base_url, kind, attempt + 1,
                            ep.max_retries + 1)
                if kind not in _RETRYABLE:
                    break
                continue
            latency = time.perf_counter() - t0
            if not resp.choices:
                kind, last_exc = "empty", ValueError("response has no choices")
                self._count(role, error=kind)
                continue
            choice = resp.choices[0]
            content = choice.message.content or ""
            reasoning = getattr(choice.message, "reasoning_content", None) or ""
            if not content and getattr(choice.message, "refusal", None):
                content = str(choice.message.refusal)
            content += _render_tool_calls(getattr(choice.message, "tool_calls", None) or [])
            text, inline_thoughts = split_thinking(content)
            usage = resp.usage
            result = ChatResult(text=text, finish_reason=choice.finish_reason,
                                prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                                completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                                latency_s=latency, cached=False, model=resp.model or ep.model,
                                reasoning=(reasoning or inline_thoughts), request_hash=key)
            self._count(role, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        latency_s=latency)
            self.cache.put(key, {k: v for k, v in dataclasses.asdict(result).items() if k not in ("cached",)})
            return result
        raise TeacherError(kind, role, ep.base_url, f"{type(last_exc).__name__}: {last_exc}")


def models_url(base_url: str) -> str:
    u = base_url.rstrip("/")
    return u + "/models" if u.endswith("/v1") else u + "/v1/models"


def wait_until_healthy(base_url: str, timeout_s: float = 600.0, poll_s: float = 1.0, api_key: str | None = None) -> dict:
    """Poll `<base_url>/models` until it answers 200 with JSON; raise TeacherUnavailable naming the URL.

    A refused connection is retried until `timeout_s` (a server still loading weights refuses
    connections); launch scripts pass a long timeout, a round a short one so a down teacher fails fast."""
    url = models_url(base_url)
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while True:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        try:
            with urllib.request.urlopen(req, timeout=max(0.5, min(5.0, deadline - time.monotonic()))) as r:
                body = json.loads(r.read().decode("utf-8"))
                if r.status == 200:
                    return body
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if time.monotonic() + poll_s > deadline:
            raise TeacherUnavailable(f"teacher at {url} did not answer within {timeout_s:g}s (last error: {last})")
        time.sleep(poll_s)
