"""The teacher rubric judge: does the episode complete the task as its rubric text describes?

It reads what the reference's completion judge reads (the task, the rubric, and a summary of the episode:
user turns, the agent's questions, tool calls with their results, the final answer, a transfer) plus the
expected normal path, and must end with <final_judgment>{"judgment": "Task completed" | "Task not
completed"}</final_judgment>. Verdicts are cached per (task, episode summary), so identical episodes of a
GRPO group cost one request; a malformed verdict is counted and asked again; after the last attempt the
verdict is "unknown" (scored as not completed, counted), never an exception.
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Optional

from agq_jax.envs.parsing import TRANSFER_MARKER, parse_reply
from agq_jax.envs.schema import Task, canonical_json, infer_tool_kind, state_hash
from agq_jax.envs.teacher_io import ChatFn, MalformedReply, TeacherReplyError, ask, last_tag

JUDGE_SYSTEM = ("You are a strict task-completion judge: you approve only an episode that meets every "
                "requirement of its rubric.")
JUDGE_SECTIONS = ("### Task", "### Policy under test", "### Rubric", "### Expected tool calls of a compliant agent",
                  "### Episode")
JUDGE_INSTRUCTIONS = (
    "Decide from the rubric alone whether the task was completed. Reason step by step: the relevant state before "
    "the tool calls, what each call changed or failed to change, and whether the final state and the agent's "
    "replies meet the rubric. Then end with exactly\n<final_judgment>\n{\"judgment\": \"Task completed\"} or "
    "{\"judgment\": \"Task not completed\"}\n</final_judgment>")


def episode_summary(messages: list[dict]) -> str:
    """The episode as the judge sees it: user turns, agent questions / answers / text, tool calls and results."""
    parts = []
    for m in messages[1:]:
        if m["role"] == "user":
            parts.append(f"[User]: {m['content']}")
        elif m["role"] == "tool":
            parts.append(f"[Tool Response]: {m['content']}")
        elif m["role"] == "assistant":
            p = parse_reply(m.get("content") or "")
            if p.question:
                parts.append(f"[Agent Question]: {p.question}")
            if p.answer:
                parts.append(f"[Agent Answer]: {p.answer}")
            if not (p.question or p.answer) and p.content:
                parts.append(f"[Agent]: {p.content}")
            for c in m.get("tool_calls", []):
                fn = c["function"]
                parts.append("[Tool Call - Agent]: " + json.dumps({"name": fn["name"], "arguments": fn["arguments"]},
                                                                   ensure_ascii=False))
            if TRANSFER_MARKER in (m.get("content") or "") or any(
                    infer_tool_kind(c["function"]["name"]) == "transfer" for c in m.get("tool_calls", [])):
                parts.append(f"[Agent Escalated to Human]: {TRANSFER_MARKER}")
    return "\n".join(parts)


def parse_judgment(text: str) -> bool:
    body = last_tag(text, "final_judgment")
    if body is None:
        raise MalformedReply("no <final_judgment> tag")
    low = body.lower()
    if "task not completed" in low or "not completed" in low:
        return False
    if "task completed" in low:
        return True
    raise MalformedReply('the judgment must be "Task completed" or "Task not completed"')


class JudgeCache:
    """Verdicts by (task id, episode summary hash); thread-safe; shared by the envs of a run."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], bool] = {}
        self.hits = 0

    def get(self, key: tuple[str, str]) -> Optional[bool]:
        with self._lock:
            v = self._values.get(key)
            self.hits += v is not None
            return v

    def put(self, key: tuple[str, str], value: bool) -> None:
        with self._lock:
            self._values[key] = value


class Judge:
    """`judge(task, messages) -> True | False | None` (None: no usable verdict after every attempt)."""

    def __init__(self, chat: ChatFn, cache: Optional[JudgeCache] = None, attempts: int = 3):
        self.chat, self.attempts = chat, attempts
        self.cache = cache if cache is not None else JudgeCache()
        self.counters: Counter = Counter()
        self._lock = threading.Lock()

    def prompt(self, task: Task, summary: str) -> list[dict]:
        normal = [s.model_dump() for s in task.expected_returns.normal_path]
        parts = [task.user_opening, task.test_policy or "(not given)", task.rubric.text or "(not given)",
                 json.dumps(normal, ensure_ascii=False) if normal else "(not given)", summary]
        user = "\n\n".join(f"{h}\n{b}" for h, b in zip(JUDGE_SECTIONS, parts)) + "\n\n" + JUDGE_INSTRUCTIONS
        return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]

    def __call__(self, task: Task, messages: list[dict]) -> Optional[bool]:
        summary = episode_summary(messages)
        key = (task.id, state_hash(canonical_json([task.rubric.text, summary])))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        counters: Counter = Counter()
        try:
            verdict = ask(self.chat, self.prompt(task, summary), parse_judgment, what="judge", counters=counters,
                          attempts=self.attempts)
        except TeacherReplyError:
            verdict = None
        with self._lock:
            self.counters.update(counters)
        if verdict is not None:
            self.cache.put(key, verdict)
        return verdict
