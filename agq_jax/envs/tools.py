"""Tool backends behind one interface: `ToolBackend.call(name, arguments) -> dict`.

Implementations: `StateToolBackend` (typed world state of a procedural domain, every write recorded),
`TeacherToolBackend` (a teacher LLM answers in the tool's output schema, pinned to the task's expected
returns, with a task-level cache shared by all rollouts of a GRPO group), and outside this package the
flywheel's Python sandbox and BM25 search.  A backend signals a failed call by raising `ToolError`; the
episode runtime turns it into an observation the agent sees, never an exception that kills a batch.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from agq_jax.envs.schema import Task, ToolSchema, canonical_json, state_hash

ChatFn = Callable[[list[dict]], str]   # messages -> assistant text (any OpenAI-compatible teacher)


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

    def call(self, name: str, arguments: dict) -> dict:
        raise NotImplementedError

    def tool_schemas(self) -> list[ToolSchema]:
        return self.schemas

    def reset(self) -> None:
        self.writes = []
        self.n_calls = 0

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
class SharedToolCache:
    """Task-level consistency cache: same task + same tool + same arguments -> the same answer.

    Shared by every rollout of a GRPO group (pass the same instance to all their envs); thread-safe, and a
    call in flight is computed once while concurrent identical calls wait for it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], Any] = {}
        self._inflight: dict[tuple[str, str], threading.Event] = {}
        self._history: dict[str, list[tuple[str, dict, Any]]] = {}
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, task_id: str, name: str, arguments: dict, compute: Callable[[], Any]) -> Any:
        key = (task_id, canonical_json([name, arguments]))
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
                self._history.setdefault(task_id, []).append((name, arguments, value))
            return value
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            ev.set()

    def history(self, task_id: str) -> list[tuple[str, dict, Any]]:
        with self._lock:
            return list(self._history.get(task_id, []))

    def __len__(self) -> int:
        return len(self._values)


_DEFAULT_CACHE = SharedToolCache()


def default_tool_cache() -> SharedToolCache:
    """The process-wide cache used when an env is made without one."""
    return _DEFAULT_CACHE


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
    raise ValueError(f"no JSON object in teacher reply: {text[:200]!r}")


def _wrap(result: Any) -> dict:
    return result if isinstance(result, dict) else {"result": result}


class TeacherToolBackend(ToolBackend):
    """Tools simulated by a teacher LLM, pinned to the task's expected returns.

    A call equal to a step of the normal or hack path returns that step's `expected_output` verbatim; any
    other call goes to `chat` with the output schema, the expected returns and this task's earlier answers,
    and the parsed JSON is cached in `cache` under (task id, name, arguments).  Without `chat`, unmatched
    calls raise `ToolError` (useful offline).
    """

    def __init__(self, task: Task, chat: Optional[ChatFn] = None, cache: Optional[SharedToolCache] = None,
                 max_retries: int = 1):
        super().__init__(task.tools)
        self.task = task
        self.chat = chat
        self.cache = cache if cache is not None else default_tool_cache()
        self.max_retries = max_retries
        self._pinned: dict[str, Any] = {}
        for step in task.expected_returns.normal_path + task.expected_returns.hack_path:
            self._pinned.setdefault(canonical_json([step.tool_name, step.input]), step.expected_output)

    def call(self, name: str, arguments: dict) -> dict:
        self.n_calls += 1
        schema = self._schema(name)
        errors = validate_arguments(schema, arguments)
        if errors:
            raise ToolError(f"{name}: " + "; ".join(errors))
        pinned_key = canonical_json([name, arguments])
        if pinned_key in self._pinned:
            result = _wrap(self._pinned[pinned_key])
        else:
            result = self.cache.get_or_compute(self.task.id, name, arguments, lambda: self._simulate(schema, arguments))
        if schema.kind == "write":
            self._record_write(name, arguments, result)
        return result

    def _simulate(self, schema: ToolSchema, arguments: dict) -> dict:
        if self.chat is None:
            raise ToolError(f"{schema.name}: no simulated return for these arguments (offline tool backend)")
        messages = self._prompt(schema, arguments)
        last_err = None
        for _ in range(self.max_retries + 1):
            reply = self.chat(messages)
            try:
                obj = extract_json_object(reply)
            except ValueError as e:
                last_err = e
                continue
            props = schema.outputs.get("properties")
            if props and isinstance(obj, dict):
                obj = {k: v for k, v in obj.items() if k in props or k == "error"}
            return _wrap(obj)
        raise ToolError(f"{schema.name}: the tool simulator returned no valid JSON ({last_err})")

    def _prompt(self, schema: ToolSchema, arguments: dict) -> list[dict]:
        er = self.task.expected_returns
        known = [s.model_dump() for s in er.normal_path + er.hack_path]
        earlier = [{"tool_name": n, "input": a, "output": o} for n, a, o in self.cache.history(self.task.id)]
        system = (
            "You simulate a tool of a software system. Reply with ONE JSON object that follows the tool's output "
            "schema and nothing else. Stay consistent with the known returns and the earlier answers of this "
            "task; if the input refers to something that does not exist, return an object with an \"error\" field.")
        user = (f"Tool: {json.dumps(schema.to_openai(), ensure_ascii=False)}\n"
                f"Task background (the world the tool lives in): {self.task.test_policy}\n"
                f"Known returns: {json.dumps(known, ensure_ascii=False)}\n"
                f"Earlier answers: {json.dumps(earlier, ensure_ascii=False)}\n"
                f"Call: {json.dumps({'name': schema.name, 'arguments': arguments}, ensure_ascii=False)}")
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
