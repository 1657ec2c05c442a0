"""A scripted, deterministic teacher behind the OpenAI-compatible loopback server, for offline end-to-end runs.

`start_loopback_teacher(...)` returns a started `ReplayServer` whose `responder` answers every teacher role the
pipeline uses, with valid replies derived from the request (see `data_synth.loopback_roles`): the agentic
flywheel's synthesizer stages, the reasoning flywheel's variant writers, the reasoning and agentic solvers,
the mock user, the mock tool and the rubric judge. A configurable share of requests gets a malformed reply
instead (bad JSON, a truncated reply, valid JSON of the wrong shape, an empty reply, HTTP 500), so a run also
proves that the pipeline counts such replies and survives them. Whether a request is spoiled is a pure
function of (seed, request, how often that exact request was seen), so a retry of the same request is a
fresh draw and a whole run is reproducible.

    srv = start_loopback_teacher(malformed_rate=0.1)      # srv.base_url -> http://127.0.0.1:PORT/v1
    ...                                                   # point every teacher role at srv.base_url
    srv.loopback.counts                                   # requests per role and malformed replies per kind
    srv.stop()

CLI (serves until killed): `python -m data_synth.loopback_teacher --port=30001 --malformed_rate=0.1`.
"""
from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
from typing import Any, Optional, Sequence

from data_synth import loopback_roles as R
from data_synth import loopback_world as M
from data_synth.replay_server import ReplayServer

MALFORMED_KINDS = ("bad_json", "truncated", "wrong_schema", "empty", "http_500")
JSON_ROLES = ("blueprint", "expand", "backtranslate", "adversarial", "failure", "self_instruct", "persona",
              "mock_tool", "judge")
# kinds that make sense per role family (a free-text role has no schema to get wrong)
_KINDS_FOR = {True: ("bad_json", "truncated", "wrong_schema", "http_500"),
              False: ("truncated", "empty", "http_500")}


def _prompt_prefixes() -> list[tuple[str, str]]:
    """(role, distinctive start of its system prompt), read from the modules that write the prompts."""
    from agq_jax.envs import judge, tools, users
    from data_synth import agentic_prompts as P
    from data_synth import reasoning_flywheel as RF

    head = lambda s: s.strip()[:48]  # noqa: E731 - templates are formatted after this point
    return [("blueprint", head(P.BLUEPRINT_SYSTEM)), ("expand", head(P.EXPAND_SYSTEM)),
            ("backtranslate", head(P.BACKTRANSLATE_SYSTEM)), ("adversarial", head(P.ADVERSARIAL_SYSTEM)),
            ("failure", head(P.FAILURE_SYSTEM)), ("self_instruct", head(RF.SELF_INSTRUCT_SYSTEM)),
            ("persona", head(RF.PERSONA_SYSTEM)), ("solver", head(RF.SOLVER_SYSTEM)),
            ("mock_user", head(users.USER_SYSTEM)), ("mock_tool", head(tools.TOOL_SYSTEM)),
            ("judge", head(judge.JUDGE_SYSTEM))]


class LoopbackTeacher:
    """The `responder` of a ReplayServer: request body -> reply spec (see ReplayServer)."""

    def __init__(self, *, malformed_rate: float = 0.0, malformed_kinds: Sequence[str] = MALFORMED_KINDS,
                 seed: int = 0):
        bad = [k for k in malformed_kinds if k not in MALFORMED_KINDS]
        if bad or not 0.0 <= malformed_rate <= 1.0:
            raise ValueError(f"loopback teacher: malformed_rate must be in [0, 1] (got {malformed_rate}) and kinds "
                             f"in {MALFORMED_KINDS} (unknown: {bad})")
        self.malformed_rate, self.malformed_kinds, self.seed = float(malformed_rate), tuple(malformed_kinds), seed
        self.plans = R.Plans()
        self.counts: collections.Counter = collections.Counter()
        self._seen: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._prefixes = _prompt_prefixes()

    # ---- dispatch ---------------------------------------------------------------------------------
    def role_of(self, messages: list[dict]) -> str:
        system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
        first = next((m.get("content") or "" for m in messages if m.get("role") != "system"), "")
        for role, prefix in self._prefixes:
            if system.strip().startswith(prefix) or (not system and first.strip().startswith(prefix)):
                return role
        if "<tools>" in system:
            return "agent"
        return "unknown"

    def __call__(self, body: dict) -> dict:
        messages = list(body.get("messages") or [])
        role = self.role_of(messages)
        good = self._answer(role, messages)
        kind = self._spoil(role, body)
        with self._lock:
            self.counts[role] += 1
            if kind:
                self.counts[f"malformed/{kind}"] += 1
                self.counts[f"malformed/{role}/{kind}"] += 1
        return self._malformed(kind, good) if kind else {"content": good}

    def _answer(self, role: str, messages: list[dict]) -> str:
        system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
        user = next((m.get("content") or "" for m in messages if m.get("role") == "user"), "")
        out: Any
        if role == "blueprint":
            out = R.blueprint(user, self.plans)
        elif role == "expand":
            out = R.expand(user)
        elif role == "backtranslate":
            out = R.backtranslate(user, self.plans)
        elif role == "adversarial":
            out = R.adversary(user)
        elif role == "failure":
            out = R.failure(user, self.plans)
        elif role == "self_instruct":
            out = R.self_instruct(system, user, self.plans)
        elif role == "persona":
            out = R.persona_variant(user, self.plans)
        elif role == "solver":
            return R.solve(user, self.plans)
        elif role == "agent":
            return R.agent_solver(messages, self.plans)
        elif role == "mock_user":
            return M.user_reply(user)
        elif role == "mock_tool":
            return M.tool_reply(user)
        elif role == "judge":
            return M.judge_reply(user)
        else:
            return "I'm sorry, but I can't help with that."
        if out is None:  # a request this teacher cannot serve: a refusal the pipeline must count
            return "I'm sorry, but I can't help with that."
        return json.dumps(out, ensure_ascii=False)

    # ---- malformed replies ------------------------------------------------------------------------
    def _spoil(self, role: str, body: dict) -> Optional[str]:
        if self.malformed_rate <= 0.0:
            return None
        key = json.dumps({"m": body.get("messages"), "s": body.get("seed"), "t": body.get("temperature")},
                         sort_keys=True, default=str)
        with self._lock:
            occurrence = self._seen[key]
            self._seen[key] += 1
        h = int(hashlib.sha256(f"{self.seed}|{occurrence}|{key}".encode()).hexdigest()[:12], 16)
        if (h % 10_000) / 10_000 >= self.malformed_rate:
            return None
        kinds = [k for k in _KINDS_FOR[role in JSON_ROLES] if k in self.malformed_kinds]
        return kinds[(h // 10_000) % len(kinds)] if kinds else None

    @staticmethod
    def _malformed(kind: str, good: str) -> dict:
        if kind == "http_500":
            return {"status": 500, "content": "loopback teacher: injected server error"}
        if kind == "truncated":
            return {"content": good[: max(1, len(good) // 2)], "finish_reason": "length"}
        if kind == "bad_json":
            return {"content": "Sure, here it is: " + re.sub(r"[}\]]", "", good)[: max(8, len(good) // 2)]}
        if kind == "wrong_schema":
            return {"content": json.dumps({"message": "loopback teacher: a reply of the wrong shape"})}
        return {"content": ""}


def start_loopback_teacher(*, malformed_rate: float = 0.0, malformed_kinds: Sequence[str] = MALFORMED_KINDS,
                           seed: int = 0, port: int = 0, model: str = "loopback-teacher") -> ReplayServer:
    """A started ReplayServer answering every teacher role; `.loopback` holds the LoopbackTeacher (counts)."""
    teacher = LoopbackTeacher(malformed_rate=malformed_rate, malformed_kinds=malformed_kinds, seed=seed)
    srv = ReplayServer(model=model, responder=teacher, port=port)
    srv.loopback = teacher
    return srv.start()


def main(argv) -> None:
    import time

    from absl import flags

    del argv
    f = flags.FLAGS
    srv = start_loopback_teacher(malformed_rate=f.malformed_rate, seed=f.seed, port=f.port)
    print(json.dumps({"base_url": srv.base_url, "malformed_rate": f.malformed_rate}), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_integer("port", 0, "port to listen on (0 = any free port; printed at start)")
    flags.DEFINE_float("malformed_rate", 0.0, "share of requests answered with a malformed reply")
    flags.DEFINE_integer("seed", 0, "seed of the malformed-reply draws")
    app.run(main)
