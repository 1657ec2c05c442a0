"""The one interface every step environment implements (mock-world `Env`, `ReasoningEnv`); the rollouts,
the evaluator and SFT data drive envs only through it."""
from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable


@runtime_checkable
class StepEnv(Protocol):
    tool_schemas: list[dict]     # OpenAI tool schemas (pass to the chat template only when not embed_tools)
    embed_tools: bool            # the system message already holds the '# Tools' block
    done: bool
    record: Any                  # the episode record (transcript, tool calls, outcome)

    @property
    def task_id(self) -> str: ...

    def reset(self) -> list[dict]:
        """Start the episode: [system, user] messages."""

    def step(self, reply: str, *, num_tokens: Optional[int] = None, truncated: bool = False) -> Any:
        """Feed one agent reply; a StepResult (new env turns, done, termination)."""

    def finish(self, termination: Any, error: Optional[str] = None) -> Any:
        """End a running episode from outside (budget ran out); no-op when done."""

    def reward(self) -> Any:
        """The finished episode's `envs.rewards.Reward`."""
