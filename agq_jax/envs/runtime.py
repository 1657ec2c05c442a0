"""The step-based episode: agent reply text in, environment turns (tool results or a user turn) out.

    env = make_env(task)                       # one env per episode / thread
    messages = env.reset()                     # [system, user]; env.tool_schemas holds the OpenAI tools
    res = env.step(reply_text)                 # StepResult(new_messages, done, termination, info)

The rollout keeps its own token ids and only appends `res.new_messages`.  Parsing and tool failures are
observations plus counters, never exceptions; an unexpected exception inside a user simulator or tool
backend ends the episode with `Termination.ERROR`.
"""
from __future__ import annotations

import copy
import enum
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Union

from agq_jax.envs import reference
from agq_jax.envs.parsing import STOP_MARKER, ParsedReply, format_tool_call, parse_reply
from agq_jax.envs.schema import Task
from agq_jax.envs.teacher_io import ChatFn
from agq_jax.envs.tools import SharedToolCache, StateToolBackend, TeacherToolBackend, ToolBackend, ToolError
from agq_jax.envs.users import ScriptedUser, TeacherUser, UserSimulator, UserTurn


class Termination(str, enum.Enum):
    USER_STOP = "user_stop"
    TRANSFER = "transfer"
    ANSWER = "answer"            # protocol "reference": the agent's final <answer>
    MAX_AGENT_TURNS = "max_agent_turns"
    MAX_USER_TURNS = "max_user_turns"
    MAX_TOKENS = "max_tokens"
    MALFORMED = "malformed"
    ERROR = "error"


@dataclass(frozen=True)
class EpisodeLimits:
    max_agent_turns: int = 15          # agent replies per episode (reference: 15)
    max_user_turns: int = 15           # user replies after the opening (reference: 15)
    max_total_tokens: Optional[int] = None   # agent-generated tokens per episode (counted by `token_counter`)
    max_tool_calls_per_turn: int = 5
    max_consecutive_malformed: int = 3


@dataclass
class StepResult:
    new_messages: list[dict]
    done: bool
    termination: Optional[Termination] = None
    info: dict = field(default_factory=dict)


@dataclass
class EpisodeRecord:
    """Everything a reward, a metric or the flywheel's failure expansion needs; JSON-able via `to_dict`."""

    task_id: str
    domain: str = ""
    branch_type: str = ""
    messages: list[dict] = field(default_factory=list)       # canonical OpenAI-format transcript
    raw_replies: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)     # {seq, turn, name, arguments, result, error, kind}
    writes: list[dict] = field(default_factory=list)
    user_events: list[dict] = field(default_factory=list)    # {seq, turn, revealed, confirmed, escape_step, stop}
    termination: Optional[str] = None
    agent_turns: int = 0
    user_turns: int = 0
    agent_tokens: int = 0
    transferred: bool = False
    counters: dict = field(default_factory=dict)             # parse issues, tool errors, ...
    final_state: Optional[dict] = None
    final_state_hash: Optional[str] = None
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EpisodeRecord":
        return cls(**d)


def approx_token_count(text: str) -> int:
    """Rough count used when no tokenizer is given (words and punctuation)."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def render_tools_block(tools: list[dict]) -> str:
    """The '# Tools' system suffix exactly as the Qwen3 chat template writes it for `tools=`."""
    lines = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" + lines +
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")


def tools_block(task: Task) -> str:
    """The task's '# Tools' suffix: an imported task's own block verbatim, else the Qwen3 template's."""
    if not task.tools:
        return ""
    block = task.metadata.get("system_tools_block")
    if block is None:
        block = render_tools_block(task.openai_tools(include_outputs=task.metadata.get("render_outputs", True)))
    return block


def system_message(task: Task, embed_tools: bool = True) -> str:
    return task.system_prompt + (tools_block(task) if embed_tools else "")


UserSpec = Union[str, UserSimulator, Callable[[Task], UserSimulator]]
ToolSpec = Union[str, ToolBackend, Callable[[Task], ToolBackend]]


class Env:
    """One episode of one task. Not shared between threads; make one per rollout (they are cheap).
    Implements `agq_jax.envs.protocol.StepEnv`."""

    def __init__(self, task: Task, user: UserSimulator, tools: ToolBackend, limits: EpisodeLimits = EpisodeLimits(),
                 embed_tools: bool = True, token_counter: Callable[[str], int] = approx_token_count,
                 protocol: str = "plain", reward_config=None, judge=None):
        if protocol not in reference.PROTOCOLS:
            raise ValueError(f"unknown agent protocol {protocol!r}; use one of {reference.PROTOCOLS}")
        self.task, self.user, self.backend, self.limits = task, user, tools, limits
        self.embed_tools, self.token_counter, self.protocol = embed_tools, token_counter, protocol
        self.reward_config, self.judge = reward_config, judge
        self.tool_schemas: list[dict] = task.openai_tools(include_outputs=task.metadata.get("render_outputs", True))
        self.record: EpisodeRecord | None = None
        self.done = True

    @property
    def task_id(self) -> str:
        return self.task.id

    def reward(self):
        """The finished episode's reward (`envs.rewards.score` with this env's config and judge)."""
        from agq_jax.envs.rewards import RewardConfig, score

        if self.record is None or not self.done:
            raise RuntimeError("reward() before the episode finished")
        return score(self.task, self.record, self.reward_config or RewardConfig(), judge=self.judge)

    # ------------------------------------------------------------------------------------------------
    def reset(self) -> list[dict]:
        self.backend.reset()
        self.done = False
        self._seq = 0
        self._malformed_run = 0
        self._user_stopped = False
        self.counters: Counter = Counter()
        if self.protocol == "reference":
            system = reference.render_system(self.task, tools_block(self.task) if self.embed_tools else "")
            opening = reference.render_opening(self.task)
        else:
            system, opening = system_message(self.task, self.embed_tools), self.user.opening()
        messages = [{"role": "system", "content": system}, {"role": "user", "content": opening}]
        self.record = EpisodeRecord(task_id=self.task.id, domain=self.task.domain,
                                    branch_type=self.task.branch.branch_type, messages=copy.deepcopy(messages))
        return messages

    @property
    def messages(self) -> list[dict]:
        return self.record.messages if self.record else []

    def step(self, reply: str, *, num_tokens: Optional[int] = None, truncated: bool = False) -> StepResult:
        """Feed one agent reply. `truncated=True` (the sampler hit its length limit) ends the episode."""
        if self.record is None or self.done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        rec = self.record
        rec.raw_replies.append(reply)
        rec.agent_turns += 1
        rec.agent_tokens += num_tokens if num_tokens is not None else self.token_counter(reply)
        parsed = parse_reply(reply)
        rec.messages.append(self._assistant_message(parsed))
        if truncated or (self.limits.max_total_tokens and rec.agent_tokens > self.limits.max_total_tokens):
            return self._finish([], Termination.MAX_TOKENS)
        try:
            new, term = self._dispatch(parsed)
        except Exception as e:   # a bug or outage in a user simulator / backend: end this episode only
            rec.error = f"{type(e).__name__}: {e}"
            self.counters["episode_errors"] += 1
            return self._finish([], Termination.ERROR)
        if term is None and rec.agent_turns >= self.limits.max_agent_turns:
            term = Termination.MAX_AGENT_TURNS
        return self._finish(new, term)

    def finish(self, termination: Termination, error: Optional[str] = None) -> Optional[StepResult]:
        """End a running episode from outside (the sampler's budget ran out, the agent crashed); no-op if done."""
        if self.record is None or self.done:
            return None
        if error:
            self.record.error = error
        return self._finish([], Termination(termination))

    # ------------------------------------------------------------------------------------------------
    def _assistant_message(self, parsed: ParsedReply) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.thinking:
            msg["reasoning_content"] = parsed.thinking
        if parsed.tool_calls:
            msg["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in parsed.tool_calls]
        return msg

    def _dispatch(self, parsed: ParsedReply) -> tuple[list[dict], Optional[Termination]]:
        for issue in parsed.issues:
            self.counters[f"parse_{issue.kind}"] += 1
        fatal = [i for i in parsed.issues if i.fatal and i.kind != "empty_reply"]
        if self.protocol == "reference" and self._user_stopped:   # the agent owed its final answer
            return [], (Termination.ANSWER if parsed.answer is not None else Termination.USER_STOP)
        if parsed.tool_calls or fatal:
            return self._run_tools(parsed, fatal)
        if parsed.transfer:
            self.record.transferred = True
            return [], Termination.TRANSFER
        if self.protocol == "reference":
            if parsed.answer is not None:
                return [], Termination.ANSWER
            if parsed.question is None:   # the reference's agent loop ends a reply with no tag and no call
                self.counters["no_protocol_tag"] += 1
                return [], Termination.MALFORMED
        text = parsed.user_text()
        if not text:
            self.counters["empty_reply"] += 1
            self._malformed_run += 1
            if self._malformed_run >= self.limits.max_consecutive_malformed:
                return [], Termination.MALFORMED
            return [{"role": "user", "content": "(Your last reply was empty. Please answer or call a tool.)"}], None
        self._malformed_run = 0
        if self.record.user_turns >= self.limits.max_user_turns:
            return [], Termination.MAX_USER_TURNS
        turn: UserTurn = self.user.respond(text, self.record.messages)
        self.record.user_turns += 1
        self._seq += 1
        self.record.user_events.append({"seq": self._seq, "turn": self.record.agent_turns, "revealed": turn.revealed,
                                        "confirmed": turn.confirmed, "escape_step": turn.escape_step,
                                        "stop": turn.stop})
        msg = {"role": "user", "content": turn.text}
        stop = turn.stop or STOP_MARKER in turn.text
        if stop and self.protocol == "reference":   # the agent still gives its final <answer>
            self._user_stopped = True
            return [msg], None
        return [msg], (Termination.USER_STOP if stop else None)

    def _run_tools(self, parsed: ParsedReply, fatal: list) -> tuple[list[dict], Optional[Termination]]:
        out: list[dict] = []
        term = None
        for issue in fatal:
            out.append({"role": "tool", "name": "parse_error", "content": json.dumps(
                {"error": f"malformed tool call ({issue.kind}): {issue.detail}. Use <tool_call>{{\"name\": ..., "
                          f"\"arguments\": {{...}}}}</tool_call>."}, ensure_ascii=False)})
        self._malformed_run = self._malformed_run + 1 if fatal and not parsed.tool_calls else 0
        for k, call in enumerate(parsed.tool_calls):
            if k >= self.limits.max_tool_calls_per_turn:
                self.counters["tool_calls_over_limit"] += 1
                out.append({"role": "tool", "name": call.name, "content": json.dumps(
                    {"error": f"too many tool calls in one reply (limit {self.limits.max_tool_calls_per_turn})"})})
                continue
            self._seq += 1
            entry = {"seq": self._seq, "turn": self.record.agent_turns, "name": call.name,
                     "arguments": call.arguments, "result": None, "error": None, "kind": None}
            try:
                schema = next((s for s in self.backend.tool_schemas() if s.name == call.name), None)
                entry["kind"] = schema.kind if schema else None
                result = self.backend.call(call.name, call.arguments)
                entry["result"] = result
                content = json.dumps(result, ensure_ascii=False)
                if schema is not None and schema.kind == "transfer":
                    self.record.transferred = True
                    term = Termination.TRANSFER
            except ToolError as e:
                self.counters["tool_errors"] += 1
                entry["error"] = str(e)
                content = json.dumps({"error": str(e)}, ensure_ascii=False)
            self.counters["tool_calls"] += 1
            self.record.tool_calls.append(entry)
            out.append({"role": "tool", "name": call.name, "content": content})
            if term is not None:
                break
        if fatal:
            self.counters["malformed_turns"] += 1
            if self._malformed_run >= self.limits.max_consecutive_malformed:
                term = term or Termination.MALFORMED
        return out, term

    def _finish(self, new: list[dict], term: Optional[Termination]) -> StepResult:
        rec = self.record
        rec.messages.extend(copy.deepcopy(new))
        if term is not None:
            self.done = True
            rec.termination = term.value
            rec.writes = [w.to_dict() for w in self.backend.writes]
            rec.final_state = self.backend.snapshot()
            rec.final_state_hash = self.backend.state_hash()
            rec.counters = dict(self.counters + getattr(self.user, "counters", Counter())
                                + getattr(self.backend, "counters", Counter()))
        return StepResult(new, term is not None, term, {"counters": dict(self.counters)})


# ---------------------------------------------------------------------------------------------- makers
def _make_tools(task: Task, tools: ToolSpec, chat: Optional[ChatFn], cache: Optional[SharedToolCache]) -> ToolBackend:
    if isinstance(tools, ToolBackend):
        return tools
    if callable(tools) and not isinstance(tools, str):
        return tools(task)
    if tools == "auto":
        from agq_jax.envs.worlds import has_world
        tools = "state" if task.initial_state is not None and has_world(task.domain) else "teacher"
    if tools == "state":
        return StateToolBackend(task)
    if tools in ("teacher", "expected"):
        return TeacherToolBackend(task, chat=chat if tools == "teacher" else None, cache=cache)
    raise ValueError(f"unknown tools kind {tools!r}: use auto | state | teacher | expected, a ToolBackend or a factory")


def _make_user(task: Task, user: UserSpec, chat: Optional[ChatFn], corrects: bool = False) -> UserSimulator:
    if isinstance(user, UserSimulator):
        return user
    if callable(user) and not isinstance(user, str):
        return user(task)
    if user == "auto":
        user = "teacher" if (chat is not None and not task.user.hidden_facts) else "scripted"
    if user == "scripted":
        return ScriptedUser(task, corrects=corrects)
    if user == "teacher":
        if chat is None:
            raise ValueError("user='teacher' needs a chat callable (user_chat= or chat=)")
        return TeacherUser(task, chat)
    raise ValueError(f"unknown user kind {user!r}: use auto | scripted | teacher, a UserSimulator or a factory")


def make_env(task: Task, *, user: UserSpec = "auto", tools: ToolSpec = "auto", limits: Optional[EpisodeLimits] = None,
             chat: Optional[ChatFn] = None, user_chat: Optional[ChatFn] = None, tool_chat: Optional[ChatFn] = None,
             tool_cache: Optional[SharedToolCache] = None, embed_tools: bool = True,
             token_counter: Callable[[str], int] = approx_token_count, protocol: str = "plain",
             reward_config=None, judge=None, user_corrects: bool = False) -> Env:
    """Build an env. `tools`: auto (state-backed when the task has a registered world, else teacher-simulated),
    state, teacher, expected (pinned returns only, offline), a backend or a `task -> backend` factory.
    `user`: auto (scripted unless a teacher is given and the task has no structured hidden facts), scripted,
    teacher, a simulator or a factory (`user_corrects`: the scripted user corrects a restated wrong option,
    `ScriptedUser`). `chat` is the default teacher for both; `tool_cache` should be shared
    by all rollouts of one GRPO group. `protocol`: plain | reference (`envs.reference`). `reward_config` and
    `judge` (an `envs.judge.Judge`) are what `env.reward()` scores with. `embed_tools=True` renders the tools
    into the system message as the Qwen3 template does, so callers must NOT also pass `tools=` to the template."""
    backend = _make_tools(task, tools, tool_chat or chat, tool_cache)
    sim = _make_user(task, user, user_chat or chat, user_corrects)
    return Env(task, sim, backend, limits or EpisodeLimits(), embed_tools, token_counter, protocol=protocol,
               reward_config=reward_config, judge=judge)


def run_episode(task: Task, agent: Callable[[list[dict]], str], **env_kwargs) -> EpisodeRecord:
    """Run `agent` (messages -> reply text) to the end of an episode. The agent sees the canonical transcript."""
    env = make_env(task, **env_kwargs)
    env.reset()
    while True:
        try:
            reply = agent(copy.deepcopy(env.messages))
        except Exception as e:   # agent failure ends this episode only
            env.finish(Termination.ERROR, error=f"agent raised {type(e).__name__}: {e}")
            return env.record
        if env.step(reply).done:
            return env.record


def replay_agent(replies: list[str]) -> Callable[[list[dict]], str]:
    """An agent that emits `replies` in order (gold replay, tests); afterwards it says goodbye."""
    it = iter(replies)
    return lambda messages: next(it, "Goodbye.")


def to_text_mode(messages: list[dict]) -> list[dict]:
    """The transcript for a plain chat endpoint without native tools: tool calls rendered in the assistant
    text, tool results as user turns wrapped in <tool_response> (as the Qwen3 template shows them)."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "assistant":
            parts = [m.get("content") or ""] + [format_tool_call(c["function"]["name"], c["function"]["arguments"])
                                                for c in m.get("tool_calls", [])]
            out.append({"role": "assistant", "content": "\n".join(p for p in parts if p)})
        elif m["role"] == "tool":
            body = "<tool_response>\n" + m["content"] + "\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + body}
            else:
                out.append({"role": "user", "content": body})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out
