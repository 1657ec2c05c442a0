"""Mock worlds: the task schema, the step-based episode runtime, tools, users, rewards and procedural worlds.

Public API (see docs/ARCHITECTURE.md, "Environment contract"):
    Task, make_env, Env, StepResult, Termination, EpisodeLimits, EpisodeRecord, run_episode,
    score, Reward, RewardConfig, ToolBackend, ToolError, SharedToolCache
"""
from agq_jax.envs.schema import Task, ToolSchema, canonical_json, state_hash
from agq_jax.envs.tools import SharedToolCache, ToolBackend, ToolError
from agq_jax.envs.runtime import (Env, EpisodeLimits, EpisodeRecord, StepResult, Termination, make_env,
                                  replay_agent, run_episode)
from agq_jax.envs.rewards import Reward, RewardConfig, score

__all__ = ["Task", "ToolSchema", "canonical_json", "state_hash", "SharedToolCache", "ToolBackend", "ToolError",
           "Env", "EpisodeLimits", "EpisodeRecord", "StepResult", "Termination", "make_env", "replay_agent",
           "run_episode", "Reward", "RewardConfig", "score"]
