#!/usr/bin/env python3
"""Wait until OpenAI-compatible teacher servers answer `GET /v1/models`, or fail naming the URL.

Standard library only, so it runs from any interpreter on a teacher host (the project venv, the
sglang venvs, or a bare python3). Launch scripts call it after starting a server in the background:

    launch/wait_healthy.py http://127.0.0.1:30000 --timeout 900 --pid "$SERVER_PID"
    launch/wait_healthy.py http://host-a:30000/v1 http://host-b:30001/v1 --probe

`--pid` makes a server that dies while loading fail at once (with its exit) instead of after the
timeout; `--probe` also sends one tiny chat completion, which proves the model actually generates.
Exit status: 0 healthy, 1 not healthy in time / died / probe failed, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


class NotHealthy(RuntimeError):
    """The server at `url` did not answer in time (or its process died); the message names the URL."""

    def __init__(self, url: str, message: str):
        super().__init__(f"{url}: {message}")
        self.url = url


def v1_url(base_url: str, path: str) -> str:
    """`http://h:p`, `http://h:p/` and `http://h:p/v1` all map to `http://h:p/v1/<path>`."""
    u = base_url.rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise ValueError(f"base URL must start with http:// or https://, got {base_url!r}")
    if not u.endswith("/v1"):
        u += "/v1"
    return f"{u}/{path}"


def _request(url: str, api_key: str | None, timeout: float, body: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


def _pid_alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reaps our own child if it exited
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: fall back to signal 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_healthy(base_url: str, timeout_s: float = 600.0, poll_s: float = 1.0, api_key: str | None = None,
                 alive=None) -> dict:
    """Poll `<base>/v1/models` until it returns 200 with a JSON model list; returns that JSON.

    `alive`: optional zero-argument callable; when it returns False (the server process exited) the
    wait stops at once. Raises NotHealthy with the URL and the last error seen.
    """
    url = v1_url(base_url, "models")
    deadline = time.monotonic() + timeout_s
    last = "no attempt made"
    while True:
        if alive is not None and not alive():
            raise NotHealthy(url, f"server process exited before answering (last error: {last})")
        try:
            body = _request(url, api_key, timeout=max(0.5, min(10.0, deadline - time.monotonic())))
            if isinstance(body, dict) and isinstance(body.get("data"), list) and body["data"]:
                return body
            last = f"unexpected /v1/models body: {str(body)[:200]}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if e.code in (401, 403):
                raise NotHealthy(url, f"HTTP {e.code}: the server wants an API key (pass --api-key-env)") from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if time.monotonic() + poll_s > deadline:
            raise NotHealthy(url, f"no answer within {timeout_s:g}s (last error: {last})")
        time.sleep(poll_s)


def probe_chat(base_url: str, model: str, api_key: str | None = None, timeout_s: float = 300.0,
               max_tokens: int = 4) -> dict:
    """One tiny `/v1/chat/completions` request; returns `{"latency_s", "content", "usage"}`."""
    url = v1_url(base_url, "chat/completions")
    t0 = time.monotonic()
    try:
        body = _request(url, api_key, timeout_s, {"model": model, "max_tokens": max_tokens, "temperature": 0.0,
                                                  "messages": [{"role": "user", "content": "Say hi."}]})
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise NotHealthy(url, f"chat probe failed: {type(e).__name__}: {getattr(e, 'reason', e)}") from e
    choices = body.get("choices") if isinstance(body, dict) else None
    message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    # With --reasoning-parser qwen3 an unfinished <think> block lands in reasoning_content and
    # content is null: still a generation.
    texts = [message.get(k) for k in ("content", "reasoning_content")] if isinstance(message, dict) else []
    if not any(isinstance(t, str) for t in texts):
        raise NotHealthy(url, f"chat probe returned no message text: {str(body)[:200]}")
    return {"latency_s": round(time.monotonic() - t0, 3), "content": texts[0], "reasoning_content": texts[1],
            "usage": body.get("usage")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("urls", nargs="+", help="base URLs (http://host:port or http://host:port/v1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait per server (default 600)")
    ap.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
    ap.add_argument("--pid", type=int, default=None, help="server PID: stop waiting as soon as it exits")
    ap.add_argument("--api-key-env", default="", help="name of the env var holding the API key (never the key)")
    ap.add_argument("--probe", action="store_true", help="also send one tiny chat completion to each server")
    args = ap.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"wait_healthy: env var {args.api_key_env!r} is not set", file=sys.stderr)
            return 2
    alive = (lambda: _pid_alive(args.pid)) if args.pid else None
    status = 0
    for url in args.urls:
        t0 = time.monotonic()
        try:
            body = wait_healthy(url, args.timeout, args.poll, api_key, alive)
            model = body["data"][0].get("id", "")
            line = {"url": url, "healthy": True, "model": model, "wait_s": round(time.monotonic() - t0, 1)}
            if args.probe:
                line["probe"] = probe_chat(url, model, api_key)
            print(json.dumps(line, ensure_ascii=False))
        except ValueError as e:
            print(f"wait_healthy: {e}", file=sys.stderr)
            return 2
        except NotHealthy as e:
            print(f"wait_healthy: teacher not healthy: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
