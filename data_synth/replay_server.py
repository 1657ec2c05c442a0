"""A loopback OpenAI-compatible server that replays recorded teacher replies.

Tests (and offline demos) point the production `TeacherClient` at it, so the code path is the
same as against SGLang. Replies come from rules: the first rule whose `match` strings all occur in
the request's messages answers with its next reply (the last one repeats once the list is used up).
A reply may carry `finish_reason` ("length" = truncated), `status` (an HTTP error to return),
`delay_s` (a slow teacher) or `tool_calls` (as a server with a tool-call parser returns them). Every request is logged so tests can count them.

Fixture file format: {"rules": [{"match": ["..."], "replies": [{"content": "..."} | "text", ...]}]}
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


_CONTROL_KEYS = {"content", "finish_reason", "status", "delay_s", "tool_calls"}


class ReplayServer:
    """`with ReplayServer(rules) as srv: srv.base_url` -> 'http://127.0.0.1:PORT/v1'."""

    def __init__(self, rules: list[dict] | None = None, *, model: str = "replay-teacher",
                 default_reply: Any = "I'm sorry, but I can't help with that.",
                 responder: Callable[[dict], Any] | None = None, port: int = 0, host: str = "127.0.0.1"):
        self.rules = [dict(r, _next=0) for r in (rules or [])]
        self.host, self.port = host, port
        self.model = model
        self.default_reply = default_reply
        self.responder = responder  # optional fn(request_body) -> reply | None, consulted before rules
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_files(cls, *paths: str, **kw) -> "ReplayServer":
        rules: list[dict] = []
        for p in paths:
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
                raise ValueError(f"{p}: expected an object with a 'rules' list")
            for i, r in enumerate(data["rules"]):
                if not r.get("match") or not r.get("replies"):
                    raise ValueError(f"{p}: rules[{i}] needs non-empty 'match' and 'replies'")
                rules.append(dict(r, _source=f"{p}#{i}"))
        return cls(rules, **kw)

    # ---- reply selection ----------------------------------------------------------------------
    @staticmethod
    def _norm(r: Any) -> dict:
        """A dict made only of control keys is a reply spec; any other object is the JSON content itself."""
        if isinstance(r, dict) and r and set(r) <= _CONTROL_KEYS:
            return r
        return {"content": r}

    def _pick(self, body: dict) -> dict:
        if self.responder is not None:
            r = self.responder(body)
            if r is not None:
                return self._norm(r)
        text = "\n".join(str(m.get("content") or "") for m in body.get("messages", []))
        with self._lock:
            for rule in self.rules:
                if all(s in text for s in rule["match"]):
                    i = min(rule["_next"], len(rule["replies"]) - 1)
                    rule["_next"] += 1
                    return self._norm(rule["replies"][i])
        return self._norm(self.default_reply)

    def request_count(self, path: str = "/v1/chat/completions") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r["path"] == path)

    # ---- server -------------------------------------------------------------------------------
    def start(self) -> "ReplayServer":
        if self._httpd is not None:   # already serving (e.g. `with start_loopback_teacher() as srv`)
            return self
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def _send(self, code: int, obj: dict):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                with server._lock:
                    server.requests.append({"path": self.path, "body": None})
                if self.path.rstrip("/") in ("/v1/models", "/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "body is not JSON"}})
                    return
                with server._lock:
                    server.requests.append({"path": self.path, "body": body})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                reply = server._pick(body)
                if reply.get("delay_s"):
                    time.sleep(float(reply["delay_s"]))
                if reply.get("status", 200) != 200:
                    self._send(int(reply["status"]), {"error": {"message": reply.get("content", "error")}})
                    return
                content = reply.get("content", "")
                if not isinstance(content, str):  # fixtures may hold the JSON object itself
                    content = json.dumps(content)
                prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body.get("messages", []))
                self._send(200, {
                    "id": f"replay-{len(server.requests)}", "object": "chat.completion", "created": 0,
                    "model": body.get("model", server.model),
                    "choices": [{"index": 0, "finish_reason": reply.get("finish_reason", "stop"),
                                 "message": {"role": "assistant", "content": content,
                                             **({"tool_calls": [
                                                 {"id": f"call_{i}", "type": "function",
                                                  "function": {"name": c["name"],
                                                               "arguments": json.dumps(c.get("arguments", {}))}}
                                                 for i, c in enumerate(reply["tool_calls"])]}
                                                if reply.get("tool_calls") else {})}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content.split()),
                              "total_tokens": prompt_tokens + len(content.split())},
                })

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="replay-server", daemon=True)
        self._thread.start()
        return self

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://{self.host}:{self._httpd.server_address[1]}/v1"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
