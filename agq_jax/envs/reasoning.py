"""Reasoning episodes: a verifiable problem, optional tools (Python sandbox, BM25 search), reward on correctness.

Same step interface as the mock-world `Env` so the rollout code drives both alike:

    env = make_reasoning_env(problem)          # a ReasoningProblem or its dict (a reasoning.jsonl row)
    messages = env.reset()                     # [system (+ Qwen3 tools block), user question]
    res = env.step(reply_text)                 # tool results as role "tool"; done once a final answer is given
    env.reward()                               # Reward(total=1.0 if the answer is equivalent to the label)

The final answer is the last `\\boxed{...}` or `<answer>...</answer>` of a reply without tool calls; it is
checked by symbolic equivalence (`agq_jax.envs.answers`), never by string match.
"""
from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Union

from agq_jax.envs.rewards import Reward
from agq_jax.envs.runtime import Env, StepResult, Termination, approx_token_count, render_tools_block
from agq_jax.envs.sandbox import PythonSandboxBackend, SandboxLimits
from agq_jax.envs.search import CompositeBackend, SearchBackend
from agq_jax.envs.tools import ToolBackend, ToolError
from agq_jax.envs.answers import answers_equivalent, extract_final_answer
from agq_jax.envs.reasoning_problems import ReasoningProblem

SYSTEM_PROMPT = ("You are a careful problem solver. Think step by step. When you are done, give the final answer "
                 "as \\boxed{...} (or inside <answer>...</answer>) in a reply that makes no tool call.")
NUDGE = "Please finish: state the final answer as \\boxed{...}."


@dataclass(frozen=True)
class ReasoningLimits:
    max_agent_turns: int = 8
    max_tool_calls_per_turn: int = 3
    max_consecutive_malformed: int = 2
    max_total_tokens: Optional[int] = None


@dataclass
class ReasoningRecord:
    """The transcript and outcome of one reasoning episode (JSON-able via to_dict)."""
    problem_id: str
    messages: list[dict] = field(default_factory=list)
    raw_replies: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    answer: Optional[str] = None
    correct: bool = False
    termination: Optional[str] = None
    finish: str = ""                # final_answer / no_answer / max_turns / max_tokens / malformed
    agent_turns: int = 0
    agent_tokens: int = 0
    counters: dict = field(default_factory=dict)
    error: Optional[str] = None     # an exception that ended the episode (tool backend, agent)

    def to_dict(self) -> dict:
        return asdict(self)


def _as_problem(problem: Union[ReasoningProblem, dict]) -> ReasoningProblem:
    return problem if isinstance(problem, ReasoningProblem) else ReasoningProblem.model_validate(problem)


def default_tools(problem: ReasoningProblem, sandbox_limits: SandboxLimits = SandboxLimits()) -> Optional[ToolBackend]:
    """The problem's tools: `python` -> sandbox, `search` -> BM25 over the problem's documents."""
    backends: list[ToolBackend] = []
    if "python" in problem.tools:
        backends.append(PythonSandboxBackend(sandbox_limits))
    if "search" in problem.tools:
        if not problem.documents:
            raise ValueError(f"problem {problem.id}: tool 'search' needs `documents`")
        backends.append(SearchBackend.from_documents(problem.documents))
    if not backends:
        return None
    return backends[0] if len(backends) == 1 else CompositeBackend(backends)


class ReasoningEnv(Env):
    """One reasoning episode. Not thread-safe; make one per rollout.

    Reuses `runtime.Env`'s step bookkeeping (raw replies, turn and token counts, the assistant message, the
    token-budget check, the agent-turn cap, `finish`, an exception in a tool backend ending the episode with
    `error`); only what happens after a parsed reply differs (`_dispatch`) and what a finish records."""

    _WHY = {Termination.MAX_TOKENS: "max_tokens", Termination.MAX_AGENT_TURNS: "max_turns",
            Termination.USER_STOP: "final_answer", Termination.MALFORMED: "no_answer"}

    def __init__(self, problem: Union[ReasoningProblem, dict], tools: Optional[ToolBackend] = None,
                 limits: ReasoningLimits = ReasoningLimits(), embed_tools: bool = True,
                 token_counter: Callable[[str], int] = approx_token_count):
        # Env.__init__ is not called: there is no Task, user simulator or state-backed tool set here.
        self.problem = _as_problem(problem)
        self.backend, self.limits, self.embed_tools, self.token_counter = tools, limits, embed_tools, token_counter
        self.tool_schemas: list[dict] = [s.to_openai(include_outputs=False) for s in tools.tool_schemas()] if tools else []
        self.record: Optional[ReasoningRecord] = None
        self.done = True

    @property
    def task_id(self) -> str:
        return self.problem.id

    def reset(self) -> list[dict]:
        if self.backend is not None:
            self.backend.reset()
        self.done, self._malformed_run, self._why = False, 0, None
        self.counters: Counter = Counter()
        system = SYSTEM_PROMPT + (render_tools_block(self.tool_schemas) if self.embed_tools and self.tool_schemas else "")
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": self.problem.question}]
        self.record = ReasoningRecord(problem_id=self.problem.id, messages=copy.deepcopy(msgs))
        return msgs

    def _assistant_message(self, parsed) -> dict:
        msg = super()._assistant_message(parsed)
        msg["content"] = parsed.content.strip()
        return msg

    def _dispatch(self, parsed) -> tuple[list[dict], Optional[Termination]]:
        """After `Env.step`'s bookkeeping: run tools, or take the final answer, or nudge (Env.step then ends
        a tool turn at the agent-turn cap)."""
        rec = self.record
        fatal = [i for i in parsed.issues if i.fatal and i.kind != "empty_reply"]
        if parsed.tool_calls or fatal:
            return self._run_tools(parsed, fatal), None
        answer = extract_final_answer(parsed.content) or (extract_final_answer(parsed.answer) if parsed.answer else None)
        if parsed.answer and not answer:
            answer = parsed.answer.strip()
        if answer:
            rec.answer = answer
            rec.correct = answers_equivalent(answer, self.problem.answer)
            return [], Termination.USER_STOP
        self._count("no_answer_turns")
        self._malformed_run += 1
        if self._malformed_run >= self.limits.max_consecutive_malformed:
            return [], Termination.MALFORMED
        if rec.agent_turns >= self.limits.max_agent_turns:
            return [], Termination.MAX_AGENT_TURNS
        return [{"role": "user", "content": NUDGE}], None

    def reward(self) -> Reward:
        """1.0 for a correct final answer, else 0.0; components kept for diagnostics."""
        rec = self.record
        if rec is None or not self.done:
            raise RuntimeError("reward() before the episode finished")
        return score_reasoning(self.problem, rec)

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n
        self.record.counters = dict(self.counters)

    def _run_tools(self, parsed, fatal) -> list[dict]:
        out = [{"role": "tool", "name": "parse_error", "content": json.dumps(
            {"error": f"malformed tool call ({i.kind}): {i.detail}"})} for i in fatal]
        for i in fatal:
            self._count(f"parse_{i.kind}")
        for k, call in enumerate(parsed.tool_calls):
            if self.backend is None or k >= self.limits.max_tool_calls_per_turn:
                err = "no tools are available" if self.backend is None else "too many tool calls in one reply"
                self._count("tool_errors")
                out.append({"role": "tool", "name": call.name, "content": json.dumps({"error": err})})
                continue
            entry = {"name": call.name, "arguments": call.arguments, "result": None, "error": None}
            try:
                entry["result"] = self.backend.call(call.name, call.arguments)
                content = json.dumps(entry["result"], ensure_ascii=False)
            except ToolError as e:
                self._count("tool_errors")
                entry["error"] = str(e)
                content = json.dumps({"error": str(e)}, ensure_ascii=False)
            self._count("tool_calls")
            self.record.tool_calls.append(entry)
            out.append({"role": "tool", "name": call.name, "content": content})
        return out

    def finish(self, termination: Termination, error: Optional[str] = None) -> Optional[StepResult]:
        """End a running episode from outside (the sampler's budget ran out); no-op if done. `record.finish`
        becomes `error` when given, else the termination's value."""
        if self.record is None or self.done:
            return None
        self._why = error or Termination(termination).value
        if error:
            self.record.error = error
        return self._finish([], Termination(termination))

    def _finish(self, new: list[dict], term: Optional[Termination]) -> StepResult:
        rec = self.record
        rec.messages.extend(copy.deepcopy(new))
        rec.counters = dict(self.counters)
        finish = ""
        if term is not None:
            finish = self._why or (rec.error if term == Termination.ERROR and rec.error else self._WHY.get(term, term.value))
            self.done = True
            rec.termination, rec.finish = term.value, finish
        return StepResult(new, term is not None, term, {"finish": finish, "counters": dict(rec.counters)})


def score_reasoning(problem: Union[ReasoningProblem, dict], record: ReasoningRecord) -> Reward:
    p = _as_problem(problem)
    if record.problem_id != p.id:
        raise ValueError(f"episode record is for problem {record.problem_id!r}, not {p.id!r}")
    correct = bool(record.answer) and answers_equivalent(record.answer, p.answer)
    return Reward(total=1.0 if correct else 0.0,
                  components={"subgoal/correct": float(correct), "diag/answered": float(record.answer is not None),
                              "diag/tool_calls": float(len(record.tool_calls)),
                              "diag/agent_turns": float(record.agent_turns)},
                  gates={"answered": record.answer is not None})


def make_reasoning_env(problem: Union[ReasoningProblem, dict], *, tools: Union[str, ToolBackend, None] = "auto",
                       limits: Optional[ReasoningLimits] = None, sandbox_limits: SandboxLimits = SandboxLimits(),
                       **kw) -> ReasoningEnv:
    p = _as_problem(problem)
    backend = default_tools(p, sandbox_limits) if tools == "auto" else (None if tools in (None, "none") else tools)
    if isinstance(backend, str):
        raise ValueError(f"unknown tools spec {tools!r}: use 'auto', 'none', None or a ToolBackend")
    return ReasoningEnv(p, backend, limits or ReasoningLimits(), **kw)


def run_reasoning_episode(problem: Union[ReasoningProblem, dict], agent: Callable[[list[dict]], str],
                          **env_kwargs) -> ReasoningRecord:
    """Drive `agent` (messages -> reply) to a final answer or a limit; an agent exception ends the episode."""
    env = make_reasoning_env(problem, **env_kwargs)
    env.reset()
    while True:
        try:
            reply = agent(copy.deepcopy(env.messages))
        except Exception as e:  # noqa: BLE001 - agent failure ends this episode only
            env._count("agent_error")
            env.finish(Termination.ERROR, error=f"agent raised {type(e).__name__}: {e}")
            return env.record
        if env.step(reply).done:
            return env.record
