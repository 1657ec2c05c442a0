"""Teacher endpoints and the data flywheels' knobs: the part of the run config `python -m data_synth.run`
reads too, in the same way as the trainer.

Every role (synthesizer, mock_user, mock_tool, judge, solver) inherits `teachers.default` field by field;
a role sets only what differs (`None` = inherit). `base_url = "loopback"` starts the scripted loopback
teacher in-process (data_synth.loopback_teacher: the cpu-smoke layouts and offline tests;
`loopback?malformed_rate=0.2` for a share of malformed replies); an empty
`default.base_url` with no role URL means offline (procedural data, scripted world).
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Optional

from agq_jax.run_config.tracking import Section

ROLES = ("synthesizer", "mock_user", "mock_tool", "judge", "solver")


@dataclasses.dataclass(frozen=True)
class EndpointSection(Section):
    """One OpenAI-compatible endpoint (SGLang / sglang-jax) and how requests to it are sampled."""
    base_url: str = ""
    model: str = ""
    api_key_env: str = ""                # the *name* of the env var holding the key ("" = none needed)
    concurrency: int = 8                 # requests in flight to this endpoint
    timeout_s: float = 120.0
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 2048
    max_retries: int = 3
    backoff_s: float = 1.0
    seed: int = 0                        # request seed (with the response cache: reproducible rounds)
    enable_thinking: bool = False        # chat_template_kwargs.enable_thinking for Qwen3 teachers


@dataclasses.dataclass(frozen=True)
class RoleSection(Section):
    """A role's differences from `teachers.default`; None inherits."""
    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: Optional[str] = None
    concurrency: Optional[int] = None
    timeout_s: Optional[float] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_tokens: Optional[int] = None
    max_retries: Optional[int] = None
    backoff_s: Optional[float] = None
    seed: Optional[int] = None
    enable_thinking: Optional[bool] = None


ENDPOINT_FIELDS = tuple(f.name for f in dataclasses.fields(EndpointSection))


@dataclasses.dataclass(frozen=True)
class TeachersSection(Section):
    default: EndpointSection = field(default_factory=EndpointSection)
    synthesizer: RoleSection = field(default_factory=RoleSection)   # behaviour trees, tasks, harder variants
    mock_user: RoleSection = field(default_factory=RoleSection)     # the simulated user of an episode
    mock_tool: RoleSection = field(default_factory=RoleSection)     # tool results consistent with the world
    judge: RoleSection = field(default_factory=RoleSection)         # rubric judging of finished episodes
    solver: RoleSection = field(default_factory=RoleSection)        # solutions that validate synthesized items
    solver_models: tuple = ()            # more solver models at the solver's URL (k solutions cycle over all)
    cache_dir: str = ""                  # response cache; "" = <run_dir>/data/teacher_cache
    check_health: bool = True            # wait for every endpoint's /models before a round
    health_timeout_s: float = 60.0

    def endpoint(self, role: str) -> dict:
        """The role's endpoint as a plain dict of every field (role value, else the default's)."""
        spec = getattr(self, role)
        base = self.default
        out = {}
        for name in ENDPOINT_FIELDS:
            v = getattr(spec, name)
            out[name] = getattr(base, name) if v is None else v
        return out

    def endpoints(self) -> dict[str, dict]:
        """{role: endpoint dict} of every role with a URL and a model; extra solvers as solver/1, solver/2...
        Empty when offline. A role with a URL but no model (or the reverse) is an error naming it."""
        out = {}
        for role in ROLES:
            ep = self.endpoint(role)
            if bool(ep["base_url"]) != bool(ep["model"]):
                missing = "model" if ep["base_url"] else "base_url"
                raise ValueError(f"config teachers.{role}: no {missing} (set teachers.{role}.{missing} or "
                                 f"teachers.default.{missing})")
            if ep["base_url"]:
                out[role] = ep
        if self.solver_models:
            if "solver" not in out:
                raise ValueError("config teachers.solver_models needs a solver endpoint (teachers.solver.base_url "
                                 "or teachers.default.base_url)")
            for i, model in enumerate(self.solver_models, start=1):
                out[f"solver/{i}"] = dict(out["solver"], model=str(model))
        return out

    def solver_roles(self) -> list[str]:
        return ["solver"] + [f"solver/{i}" for i in range(1, len(self.solver_models) + 1)]


@dataclasses.dataclass(frozen=True)
class DifficultySection(Section):
    """Procedural reasoning difficulty (agq_jax.envs.reasoning_problems.Difficulty)."""
    num_ops: int = 2
    max_operand: int = 20
    algebra_level: int = 1
    hops: int = 2
    distractors: int = 4


@dataclasses.dataclass(frozen=True)
class AgenticSynthSection(Section):
    """The agentic flywheel (data_synth.agentic_flywheel); enabled when data.agentic_weight > 0."""
    num_procedural: int = 12             # round 0: procedural tasks (also mixed in with teacher tasks)
    procedural_per_round: int = 4        # later rounds: fresh procedural tasks
    level: int = 0                       # procedural difficulty (worlds.generator.Knobs)
    expansion: str = "harder"            # offline flywheel: harder (variants of the failed tasks) | fresh (as many
                                         # fresh tasks of the same difficulty, random domain / branch: the control)
    persona_path: str = ""               # JSONL {id, persona} seeding teacher blueprints; "" = the built-in set
    num_personas: int = 0                # personas per round (0 = no persona-seeded synthesis)
    workflow_path: str = ""              # JSONL {id, workflow}: teacher behaviour trees from workflows
    min_tools: int = 3
    max_tools: int = 5
    max_params: int = 3
    min_branch_types: int = 3
    max_branches_per_tree: int = 6
    min_cases_per_side: int = 3          # an expanded tree holds >= this many legal and illegal cases (reference: 3)
    validate_with_teacher: bool = True   # a teacher solver must solve a task before it is kept
    validation_user: str = "scripted"    # scripted | teacher (mock_user role)
    validation_tools: str = "expected"   # expected (pinned returns) | teacher (mock_tool role)
    concurrency: int = 8
    validate_concurrency: int = 4
    max_attempts: int = 3                # teacher retries per item and stage (malformed replies)

    def __post_init__(self):
        if self.expansion not in ("harder", "fresh"):
            raise ValueError(f"config synth.agentic.expansion={self.expansion!r}: expected 'harder' or 'fresh'")


@dataclasses.dataclass(frozen=True)
class ReasoningSynthSection(Section):
    """The reasoning flywheel (data_synth.reasoning_flywheel); enabled when data.reasoning_weight > 0."""
    seed_path: str = ""                  # JSONL {question, answer, source}
    num_procedural: int = 12
    fresh_procedural_per_round: int = 4
    kinds: tuple = ("arithmetic", "algebra", "multihop")
    difficulty: DifficultySection = field(default_factory=DifficultySection)
    harder_per_failure: int = 1
    variants_per_failure: int = 2
    personas_per_failure: int = 1
    persona_path: str = ""               # JSONL {id, persona} for persona rewrites; "" = the built-in set
    k_solutions: int = 3                 # a made-harder problem is kept only when these agree
    concurrency: int = 8
    max_attempts: int = 3


@dataclasses.dataclass(frozen=True)
class SynthSection(Section):
    agentic: AgenticSynthSection = field(default_factory=AgenticSynthSection)
    reasoning: ReasoningSynthSection = field(default_factory=ReasoningSynthSection)


__all__ = ["ROLES", "EndpointSection", "RoleSection", "TeachersSection", "DifficultySection",
           "AgenticSynthSection", "ReasoningSynthSection", "SynthSection"]
