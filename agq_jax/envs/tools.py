"""Tool backends behind one interface: `ToolBackend.call(name, arguments) -> dict`.

Implementations: `StateToolBackend` (typed world state of a procedural domain, every write recorded),
`TeacherToolBackend` (a teacher LLM that sees the episode's earlier calls answers in the tool's output
schema, pinned to the task's expected returns where the trajectory agrees with them, with a cache keyed on
task, trajectory state and call shared by all rollouts of a GRPO group), and outside this package the
flywheel's Python sandbox and BM25 search.  A backend signals a failed call by raising `ToolError`; the
episode runtime turns it into an observation the agent sees, never an exception that kills a batch.
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

from agq_jax.envs.schema import Task, ToolSchema, canonical_json, state_hash
from agq_jax.envs.teacher_io import ChatFn


class ToolError(Exception):
    """A tool call the tool rejects (bad arguments, business rule, unknown record). Message goes to the agent."""


@dataclass
class WriteRecord:
    """One successful state-changing call."""

    name: str
    arguments: dict
    result: Any
    index: int = 0          # position among all tool calls of the episode

    def to_dict(self) -> dict:
        return {"name": self.name, "arguments": self.arguments, "result": self.result, "index": self.index}


class ToolBackend:
    """The tool interface. Subclasses implement `call`; the rest has safe defaults.

    One backend instance serves one episode (one thread); `reset()` restores its initial state.
    """

    def __init__(self, schemas: list[ToolSchema] | None = None):
        self.schemas: list[ToolSchema] = list(schemas or [])
        self.writes: list[WriteRecord] = []
        self.n_calls = 0
        self.counters: Counter = Counter()   # teacher calls, malformed replies, pinned answers (episode record)

    def call(self, name: str, arguments: dict) -> dict:
        raise NotImplementedError

    def tool_schemas(self) -> list[ToolSchema]:
        return self.schemas

    def reset(self) -> None:
        self.writes = []
        self.n_calls = 0
        self.counters = Counter()

    def snapshot(self) -> Optional[dict]:
        """The world state as JSON (None when the backend has no state)."""
        return None

    def state_hash(self) -> Optional[str]:
        snap = self.snapshot()
        return None if snap is None else state_hash(snap)

    # helpers for subclasses
    def _schema(self, name: str) -> ToolSchema:
        for s in self.schemas:
            if s.name == name:
                return s
        raise ToolError(f"unknown tool {name!r}; available: {[s.name for s in self.schemas]}")

    def _record_write(self, name: str, arguments: dict, result: Any) -> None:
        self.writes.append(WriteRecord(name, dict(arguments), result, self.n_calls - 1))


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
               "array": list, "object": dict, "null": type(None)}


def validate_arguments(schema: ToolSchema, arguments: Any) -> list[str]:
    """Errors of `arguments` against the tool's parameter schema (required, unknown keys, JSON types, enums)."""
    if not isinstance(arguments, dict):
        return [f"arguments must be a JSON object, got {type(arguments).__name__}"]
    props = schema.parameters.get("properties", {})
    errors = [f"missing required argument {r!r}" for r in schema.required if r not in arguments]
    for k, v in arguments.items():
        if k not in props:
            errors.append(f"unknown argument {k!r} (expected one of {list(props)})")
            continue
        spec = props[k] or {}
        types = spec.get("type")
        if types:
            allowed = tuple(t for name in ([types] if isinstance(types, str) else types)
                            for t in (_JSON_TYPES.get(name, object),))
            flat = tuple(x for t in allowed for x in (t if isinstance(t, tuple) else (t,)))
            bad_bool = isinstance(v, bool) and bool not in flat
            if not isinstance(v, flat) or bad_bool:
                errors.append(f"argument {k!r} must be {types}, got {type(v).__name__}")
                continue
        if "enum" in spec and v not in spec["enum"]:
            errors.append(f"argument {k!r} must be one of {spec['enum']}, got {v!r}")
    return errors


# ------------------------------------------------------------------------------------- state-backed
class StateToolBackend(ToolBackend):
    """Tools of a procedural world acting on its typed state (see `agq_jax.envs.worlds`)."""

    def __init__(self, task: Task, world: Any = None):
        from agq_jax.envs.worlds import get_world   # late import: worlds import this module

        self.task = task
        self.world = world or get_world(task.domain)
        if task.initial_state is None:
            raise ValueError(f"task {task.id}: a state-backed backend needs `initial_state`")
        super().__init__(task.tools or self.world.tool_schemas())
        self.state = self.world.load_state(task.initial_state)

    def reset(self) -> None:
        super().reset()
        self.state = self.world.load_state(self.task.initial_state)

    def call(self, name: str, arguments: dict) -> dict:
        self.n_calls += 1
        schema = self._schema(name)
        errors = validate_arguments(schema, arguments)
        if errors:
            raise ToolError(f"{name}: " + "; ".join(errors))
        result = self.world.call(self.state, name, dict(arguments))
        if schema.kind == "write":
            self._record_write(name, arguments, result)
        return result

    def snapshot(self) -> dict:
        return self.world.dump_state(self.state)


def replay_final_state(task: Task, calls: list) -> dict:
    """World state after replaying `calls` (ToolCall or {"name", "arguments"}) from the initial state."""
    backend = StateToolBackend(task)
    for c in calls:
        name, args = (c.name, c.arguments) if hasattr(c, "name") else (c["name"], c["arguments"])
        backend.call(name, args)
    return backend.snapshot()


# -------------------------------------------------------------------------------- teacher-simulated
_FAILED_STATUS = {"failure", "failed", "error", "denied", "rejected", "invalid", "not_found"}


def is_failure_output(out: Any) -> bool:
    """Whether a tool output reports that the call did nothing (an error object, status failed, success false,
    an "ERROR: ..." string). Such a write changes no state: the normal path of an imported task may probe
    the world with a write that the system refuses."""
    if isinstance(out, str):
        return out.strip().lower().startswith(("error", "failed", "failure"))
    if not isinstance(out, dict):
        return False
    if out.get("error"):
        return True
    status = out.get("status")
    if isinstance(status, str) and status.strip().lower() in _FAILED_STATUS:
        return True
    if any(out.get(k) is False for k in ("success", "ok")):
        return True
    return isinstance(out.get("result"), str) and is_failure_output(out["result"])


class SharedToolCache:
    """Consistency cache: the same task, trajectory state and call -> the same answer.

    Shared by every rollout of a GRPO group (pass the same instance to all their envs), so identical calls
    in identical world states agree across rollouts, while a call made after a state change is a different
    key. Thread-safe; a call in flight is computed once while concurrent identical calls wait for it; a
    failed computation is not cached."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str, str], Any] = {}
        self._inflight: dict[tuple[str, str, str], threading.Event] = {}
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, task_id: str, state_key: str, name: str, arguments: dict,
                       compute: Callable[[], Any]) -> Any:
        key = (task_id, state_key, canonical_json([name, arguments]))
        while True:
            with self._lock:
                if key in self._values:
                    self.hits += 1
                    return self._values[key]
                ev = self._inflight.get(key)
                if ev is None:
                    ev = self._inflight[key] = threading.Event()
                    self.misses += 1
                    break
            ev.wait()
            with self._lock:   # the computing thread failed: loop and try ourselves
                if key not in self._values and key not in self._inflight:
                    continue
        try:
            value = compute()
            with self._lock:
                self._values[key] = value
            return value
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            ev.set()

    def __len__(self) -> int:
        return len(self._values)


_DEFAULT_CACHE = SharedToolCache()


def default_tool_cache() -> SharedToolCache:
    """The process-wide cache used when an env is made without one."""
    return _DEFAULT_CACHE


def _wrap(result: Any) -> dict:
    return result if isinstance(result, dict) else {"result": result}


NO_RETURN = "no_return"   # the reference's expected_output of a write whose return was not specified

TOOL_SYSTEM = (
    "You simulate the tools of a virtual system and know everything about its world. Answer ONE tool call.\n"
    "1. Return what this tool returns for these arguments, following its description and output schema.\n"
    "2. Stay consistent with the world state and with every earlier call of this episode. Earlier calls may have "
    "changed the world: later calls must show the changed values and never an older one.\n"
    "3. The known returns describe a normal path (a compliant agent) and a hack path (an agent that broke the "
    "policy); when they conflict, follow the normal path.\n"
    "4. If the call asks for something this world does not contain, return an object whose \"error\" says so.\n"
    "5. Add no explanation outside the tool output.\n"
    "First write the state changes you infer from the earlier calls inside <state_changes></state_changes>, then "
    "the tool output as ONE JSON object inside <tool_response></tool_response>.")
TOOL_SECTIONS = ("### Tool", "### World state", "### Known returns", "### Earlier calls in this episode",
                 "### Call")


class TeacherToolBackend(ToolBackend):
    """Tools simulated by a teacher LLM that sees the episode so far, pinned to the task's expected returns.

    A call equal to a step of the normal path (then the hack path) whose earlier state-changing steps are
    exactly the episode's state changes so far returns that step's `expected_output`: the pinned world holds
    only where the trajectory agrees with it, so a read after an unexpected write is not answered with a
    stale value. Any other call goes to `chat` with the tool schema, the task's world state (synthesized tasks),
    the known returns and this episode's earlier calls and results; the answer is cached under (task, state
    of the trajectory, call) in `cache`. Without `chat` (tools="expected") an unpinned call is a ToolError.
    """

    def __init__(self, task: Task, chat: Optional[ChatFn] = None, cache: Optional[SharedToolCache] = None,
                 attempts: int = 3):
        super().__init__(task.tools)
        self.task = task
        self.chat = chat
        self.cache = cache if cache is not None else default_tool_cache()
        self.attempts = attempts
        self.history: list[dict] = []
        kinds = {t.name: t.kind for t in task.tools}
        self._paths: list[list[tuple[str, str, Any]]] = []   # per path: (call key, state before it, output)
        for path in (task.expected_returns.normal_path, task.expected_returns.hack_path):
            changes: list[str] = []
            steps = []
            for s in path:
                key = canonical_json([s.tool_name, s.input])
                steps.append((key, canonical_json(sorted(changes)), s.expected_output))
                if kinds.get(s.tool_name) != "read" and not is_failure_output(s.expected_output):
                    changes.append(key)
            self._paths.append(steps)

    def reset(self) -> None:
        super().reset()
        self.history = []

    def _changes(self) -> list[str]:
        return [canonical_json([h["name"], h["arguments"]]) for h in self.history
                if h["kind"] != "read" and not is_failure_output(h["result"])]

    def state_key(self) -> str:
        """The trajectory's world state: every state-changing call so far with its result, in order."""
        return state_hash([[h["name"], h["arguments"], h["result"]] for h in self.history
                           if h["kind"] != "read" and not is_failure_output(h["result"])])

    def _pinned(self, name: str, arguments: dict) -> tuple[bool, Any]:
        key, before = canonical_json([name, arguments]), canonical_json(sorted(self._changes()))
        for steps in self._paths:
            for k, state, out in steps:
                if k == key and state == before:
                    return True, out
        return False, None

    def call(self, name: str, arguments: dict) -> dict:
        self.n_calls += 1
        schema = self._schema(name)
        errors = validate_arguments(schema, arguments)
        if errors:
            raise ToolError(f"{name}: " + "; ".join(errors))
        hit, out = self._pinned(name, arguments)
        if hit and out != NO_RETURN:
            result = _wrap(out)
            self.counters["mock_tool/pinned"] += 1
        elif self.chat is None and hit:   # offline: a write the reference left unspecified went through
            result = {}
        elif self.chat is None:
            raise ToolError(f"{name}: no simulated return for these arguments in this state (offline tool backend)")
        else:
            result = self.cache.get_or_compute(self.task.id, self.state_key(), name, arguments,
                                               lambda: self._simulate(schema, arguments))
        self.history.append({"name": name, "arguments": dict(arguments), "result": result, "kind": schema.kind})
        if schema.kind == "write":
            self._record_write(name, arguments, result)
        return result

    def _simulate(self, schema: ToolSchema, arguments: dict) -> dict:
        from agq_jax.envs.teacher_io import TeacherReplyError, ask

        def parse(text: str) -> dict:
            return parse_tool_reply(text, schema, self.counters)

        try:
            return ask(self.chat, self.prompt(schema, arguments), parse, what="mock_tool", counters=self.counters,
                       attempts=self.attempts)
        except TeacherReplyError as e:
            raise ToolError(f"{schema.name}: the tool did not answer ({e}); please try the call again") from None

    def prompt(self, schema: ToolSchema, arguments: dict) -> list[dict]:
        er = self.task.expected_returns
        world = self.task.metadata.get("world_state") or self.task.initial_state
        earlier = "\n".join(f"[Call {i + 1}] {json.dumps({'name': h['name'], 'arguments': h['arguments']}, ensure_ascii=False)}"
                            f"\n[Result {i + 1}] {json.dumps(h['result'], ensure_ascii=False)}"
                            for i, h in enumerate(self.history)) or "(none)"
        parts = [json.dumps(schema.to_openai(), ensure_ascii=False),
                 json.dumps(world, ensure_ascii=False) if world else "(not given; infer it from the known returns)",
                 json.dumps({"normal_path": [s.model_dump() for s in er.normal_path],
                             "hack_path": [s.model_dump() for s in er.hack_path]}, ensure_ascii=False),
                 earlier, json.dumps({"name": schema.name, "arguments": arguments}, ensure_ascii=False)]
        user = "\n\n".join(f"{head}\n{body}" for head, body in zip(TOOL_SECTIONS, parts))
        return [{"role": "system", "content": TOOL_SYSTEM}, {"role": "user", "content": user}]


def parse_tool_reply(text: str, schema: ToolSchema, counters: Optional[Counter] = None) -> dict:
    """The tool output of a mock-tool reply: the JSON inside the last <tool_response> (a bare JSON object is
    accepted and counted); restricted to the tool's output fields (plus "error"); none of them = malformed."""
    from agq_jax.envs.teacher_io import MalformedReply, extract_json_object, last_tag

    body = last_tag(text, "tool_response")
    if body is None and counters is not None:
        counters["mock_tool/unwrapped"] += 1
    src = text if body is None else body
    if "no useful information found" in src.lower() and "{" not in src:
        return {"error": "No useful information found"}
    obj = extract_json_object(src)
    if not isinstance(obj, dict):
        raise MalformedReply("the tool output must be a JSON object")
    props = schema.outputs.get("properties") or {}
    if props:
        kept = {k: v for k, v in obj.items() if k in props or k == "error"}
        if not kept:
            raise MalformedReply(f"the JSON has none of the tool's output fields {sorted(props)}")
        return kept
    return obj
