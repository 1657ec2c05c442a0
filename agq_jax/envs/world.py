"""The simulated world an episode runs in, chosen per config and shared by training and evaluation.

user: scripted (rules over the task's hidden facts and background) | teacher (the reference's LLM mock user)
| auto; user_corrects: the scripted user says no to a restated wrong option instead of confirming it; tools:
auto (the task's own world when it has one, else teacher) | state | expected (pinned returns, offline) |
teacher (the state-aware LLM mock tool); judge: none | teacher (the rubric text judged); protocol: plain |
reference (`envs.reference`); gates: the reward gates (`envs.rewards.GATES`). The paper's world is teacher /
teacher / teacher under the reference protocol; the offline default is the scripted world.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from agq_jax.envs import reference
from agq_jax.envs.judge import Judge, JudgeCache
from agq_jax.envs.rewards import GATES, RewardConfig
from agq_jax.envs.runtime import Env, EpisodeLimits, make_env
from agq_jax.envs.schema import Task
from agq_jax.envs.teacher_io import ChatFn
from agq_jax.envs.tools import SharedToolCache

USERS, TOOLS, JUDGES = ("scripted", "teacher", "auto"), ("auto", "state", "expected", "teacher"), ("none", "teacher")


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    user: str = "scripted"
    tools: str = "auto"
    judge: str = "none"
    protocol: str = "plain"
    gates: tuple[str, ...] = ("no_forbidden",)
    max_agent_turns: int = 15
    max_user_turns: int = 15
    user_corrects: bool = False

    def __post_init__(self):
        if self.user_corrects and self.user == "teacher":
            raise ValueError("world user_corrects: only the scripted user follows this rule (a teacher user "
                             "answers a restatement as its prompt says)")
        for name, value, allowed in (("user", self.user, USERS), ("tools", self.tools, TOOLS),
                                     ("judge", self.judge, JUDGES), ("protocol", self.protocol, reference.PROTOCOLS)):
            if value not in allowed:
                raise ValueError(f"world {name}={value!r}: expected one of {allowed}")
        bad = [g for g in self.gates if g not in GATES]
        if bad:
            raise ValueError(f"world gates {bad}: known gates are {GATES}")


@dataclasses.dataclass(frozen=True)
class TeacherChats:
    """The teacher callables of the mock world (`TeacherClient.as_callable(role)`); None = no such teacher."""
    mock_user: Optional[ChatFn] = None
    mock_tool: Optional[ChatFn] = None
    judge: Optional[ChatFn] = None


class World:
    """Builds the envs of a run: `world.make_env(task, tool_cache=group_cache)`; `world.gold_replies(task)`."""

    def __init__(self, spec: WorldSpec, chats: TeacherChats = TeacherChats(), judge_cache: Optional[JudgeCache] = None):
        for role, needed in (("mock_user", spec.user == "teacher"), ("mock_tool", spec.tools == "teacher"),
                             ("judge", spec.judge == "teacher")):
            if needed and getattr(chats, role) is None:
                raise ValueError(f"the world needs a {role} teacher (env {role.split('_')[-1]} = teacher) but none "
                                 f"is configured: set teachers.{role} (or teachers.default)")
        self.spec, self.chats = spec, chats
        self.judge = Judge(chats.judge, judge_cache) if spec.judge == "teacher" else None
        self.reward_config = RewardConfig(gates=tuple(spec.gates))
        self.limits = EpisodeLimits(max_agent_turns=spec.max_agent_turns, max_user_turns=spec.max_user_turns)

    def make_env(self, task: Task, tool_cache: Optional[SharedToolCache] = None) -> Env:
        return make_env(task, user=self.spec.user, tools=self.spec.tools, limits=self.limits,
                        user_chat=self.chats.mock_user, tool_chat=self.chats.mock_tool, tool_cache=tool_cache,
                        protocol=self.spec.protocol, reward_config=self.reward_config, judge=self.judge,
                        user_corrects=self.spec.user_corrects)

    def gold_replies(self, task: Task) -> list[str]:
        """The task's gold replies in this world's protocol (candidates: verify them by replaying)."""
        return reference.gold_for(task, self.spec.protocol)
