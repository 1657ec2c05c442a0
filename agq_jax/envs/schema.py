"""One validated task record shared by importers, the procedural generator, the flywheel and the trainer.

A `Task` is plain JSON (``Task.model_validate_json`` / ``Task.model_dump_json``); every part is a pydantic
model so a malformed record fails with the field path in the error.  Terminology (AgenticQwen / tau-bench):

- the *normal path* is what a policy-compliant agent does; the *hack path* is what an agent talked into
  breaking policy does.  Writes on the hack path that are not on the normal path are forbidden actions.
- the *behavior tree* is the policy as conditions -> actions; a task exercises one branch of it.
- *hidden facts* are parameters the user holds back until the agent asks for them.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1

ToolKind = Literal["read", "write", "transfer"]
ActionType = Literal["proceed", "clarify", "refuse", "transfer", "request_confirmation", "tool_call"]
# What the decisive behaviour of a branch is.  `legal`: carry the request out (after confirmation);
# `refusal` / `transfer`: the request breaks policy / needs a human; `clarification`: a choice the user
# must make is missing from the request; `confirmation`: the user declines when asked to confirm.
BranchType = Literal["legal", "refusal", "transfer", "clarification", "confirmation"]
BRANCH_TYPES: tuple[str, ...] = ("legal", "refusal", "transfer", "clarification", "confirmation")
EscapeKind = Literal["lie", "plead", "pressure", "authority", "other"]
SubGoalKind = Literal[
    "state_match",          # final world state == state after replaying the gold actions
    "tool_called",          # a call to params.tool with arguments ⊇ params.arguments happened
    "asked",                # hidden fact params.fact was revealed before any tool call used its value
    "confirmed_before_write",  # every write came after the user confirmed
    "transferred",          # the episode ended in a transfer to a human
    "not_transferred",      # it did not
    "no_write",             # no write tool call succeeded
    "writes_match",         # the successful writes equal the normal-path writes (name + arguments)
    "judge",                # a teacher rubric judge accepted the episode (tasks without world state)
    "refused",              # the agent told the user it will not do (part of) the request
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


def canonical_json(obj: Any) -> str:
    """Key-sorted compact JSON: the form hashed and compared everywhere (tool caches, state hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def state_hash(state: Any) -> str:
    """tau^2-bench style hash of a world state (sha256 of canonical JSON)."""
    return hashlib.sha256(canonical_json(state).encode()).hexdigest()


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest (first n chars) of the canonical JSON of obj: deterministic ids and cache keys across runs."""
    return state_hash(obj)[:n]


# ----------------------------------------------------------------------------------------------- tools
class ToolSchema(_Model):
    """An OpenAI function tool plus the `outputs` JSON schema and the read / write / transfer kind."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}, "required": []})
    outputs: dict[str, Any] = Field(default_factory=dict)
    kind: ToolKind = "read"

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict) -> dict:
        if v.get("type", "object") != "object" or not isinstance(v.get("properties", {}), dict):
            raise ValueError("parameters must be a JSON schema of type 'object' with a 'properties' mapping")
        return v

    @property
    def param_names(self) -> list[str]:
        return list(self.parameters.get("properties", {}))

    @property
    def required(self) -> list[str]:
        return list(self.parameters.get("required", []))

    def to_openai(self, include_outputs: bool = True) -> dict:
        """`{"type": "function", "function": {...}}` as the chat template / OpenAI API take it."""
        fn: dict[str, Any] = {"name": self.name, "description": self.description, "parameters": self.parameters}
        if include_outputs and self.outputs:
            fn["outputs"] = self.outputs
        return {"type": "function", "function": fn}

    @classmethod
    def from_openai(cls, d: dict, kind: Optional[ToolKind] = None) -> "ToolSchema":
        fn = d.get("function", d)
        name = fn["name"]
        return cls(name=name, description=fn.get("description", ""),
                   parameters=fn.get("parameters") or {"type": "object", "properties": {}},
                   outputs=fn.get("outputs") or {}, kind=kind or infer_tool_kind(name, fn.get("description", "")))


_READ_PREFIXES = ("get", "check", "search", "list", "lookup", "find", "query", "fetch", "retrieve", "read",
                  "view", "verify", "validate", "calculate", "compute", "estimate", "show", "count", "is", "has")


def infer_tool_kind(name: str, description: str = "") -> ToolKind:
    """Heuristic kind for imported tools, which carry none: transfer_* -> transfer, get_/check_/... -> read."""
    n = name.lower()
    if "transfer_to_human" in n or n.startswith(("transfer_to", "escalate", "handoff")):
        return "transfer"
    head = n.split("_", 1)[0]
    return "read" if head in _READ_PREFIXES else "write"


class ToolCall(_Model):
    """A concrete call: the unit of gold actions, forbidden actions and episode logs."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)

    def key(self) -> str:
        return canonical_json([self.name, self.arguments])

    def matches(self, name: str, arguments: dict) -> bool:
        """Same tool and `arguments` ⊇ self.arguments (an empty pattern matches any call of the tool)."""
        return name == self.name and all(
            k in arguments and canonical_json(arguments[k]) == canonical_json(v) for k, v in self.arguments.items())


class ToolStep(_Model):
    """One step of an expected path, in the AgenticQwen `tool_return_expected` layout."""

    tool_name: str
    input: dict[str, Any] = Field(default_factory=dict)
    expected_output: Any = None


class ExpectedToolReturns(_Model):
    normal_path: list[ToolStep] = Field(default_factory=list)
    hack_path: list[ToolStep] = Field(default_factory=list)


# -------------------------------------------------------------------------------------- behavior tree
class Condition(_Model):
    """A branch condition: `text` for the SOP, optional machine form `{"var": "order.status", "op": "==", "value": x}`."""

    text: str
    expr: Optional[dict[str, Any]] = None


class BTAction(_Model):
    type: ActionType
    tool: Optional[str] = None                 # for tool_call
    arguments: dict[str, Any] = Field(default_factory=dict)  # argument templates, e.g. {"order_id": "{order_id}"}
    params: list[str] = Field(default_factory=list)          # for clarify: which parameters to ask for
    message: str = ""                           # what to tell the user (refusal reason, confirmation text)

    @model_validator(mode="after")
    def _tool_needed(self) -> "BTAction":
        if self.type == "tool_call" and not self.tool:
            raise ValueError("a tool_call action needs `tool`")
        return self


class BTNode(_Model):
    """A node: if `condition` holds, do `actions`, then descend into the first child whose condition holds."""

    id: str
    condition: Optional[Condition] = None
    actions: list[BTAction] = Field(default_factory=list)
    children: list["BTNode"] = Field(default_factory=list)
    branch_type: Optional[BranchType] = None   # set on the node that decides a branch


class BehaviorTree(_Model):
    root: BTNode

    def nodes(self) -> list[BTNode]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(reversed(n.children))
        return out

    def find(self, node_id: str) -> Optional[BTNode]:
        return next((n for n in self.nodes() if n.id == node_id), None)

    def depth(self) -> int:
        def d(n: BTNode) -> int:
            return 1 + max((d(c) for c in n.children), default=0)
        return d(self.root)

    def branching(self) -> list[int]:
        """Number of children of each internal node."""
        return [len(n.children) for n in self.nodes() if n.children]

    def leaves(self) -> list[BTNode]:
        return [n for n in self.nodes() if not n.children]

    def path_to(self, node_id: str) -> list[BTNode]:
        def walk(n: BTNode, acc: list[BTNode]) -> Optional[list[BTNode]]:
            acc = acc + [n]
            if n.id == node_id:
                return acc
            for c in n.children:
                r = walk(c, acc)
                if r:
                    return r
            return None
        path = walk(self.root, [])
        if path is None:
            raise KeyError(f"behavior tree has no node {node_id!r}")
        return path

    @model_validator(mode="after")
    def _unique_ids(self) -> "BehaviorTree":
        ids = [n.id for n in self.nodes()]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"behavior tree node ids must be unique; duplicated: {sorted(dup)}")
        return self


class BranchRef(_Model):
    """Which branch of the tree this task exercises."""

    node_id: str = ""
    branch_type: BranchType = "legal"
    legal: bool = True          # whether the user's request may be carried out under the policy


# ------------------------------------------------------------------------------------------- the user
class HiddenFact(_Model):
    """A parameter the user reveals only when asked (or, with `persuasion=True`, only inside an escape step)."""

    key: str
    value: str
    description: str = ""
    ask_keywords: list[str] = Field(default_factory=list)  # words in the agent's question that ask for it
    reveal_text: str = ""       # what the user says when revealing it; defaults to the value
    persuasion: bool = False


class EscapeStep(_Model):
    kind: EscapeKind = "other"
    text: str
    reveals: list[str] = Field(default_factory=list)   # hidden-fact keys (persuasion facts) this step discloses


class EscapeStrategy(_Model):
    """How an adversarial user pushes after a refusal: `steps` in order (lie, then plead), then gives up."""

    text: str = ""
    steps: list[EscapeStep] = Field(default_factory=list)


class UserProfile(_Model):
    background: str = ""        # free text the (teacher) user plays from; imported task_background
    persona: str = ""
    hidden_facts: list[HiddenFact] = Field(default_factory=list)
    escape: EscapeStrategy = Field(default_factory=EscapeStrategy)
    confirm: bool = True        # how the user answers a confirmation request
    goal: str = ""

    def fact(self, key: str) -> HiddenFact:
        for f in self.hidden_facts:
            if f.key == key:
                return f
        raise KeyError(f"user profile has no hidden fact {key!r}")


# ------------------------------------------------------------------------------------------- rubric
class SubGoal(_Model):
    id: str
    kind: SubGoalKind
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    weight: float = 1.0
    required: bool = False      # unmet -> the whole reward is 0 (a gate owned by the task, not the config)


class RequiredInteraction(_Model):
    """`ask`: the hidden fact must be revealed before its value is used in a tool call.
    `confirm`: the user must confirm before the write `tool` happens."""

    kind: Literal["ask", "confirm"]
    fact: Optional[str] = None
    tool: Optional[str] = None


class ForbiddenAction(_Model):
    call: ToolCall               # subset match on arguments
    reason: str = ""
    # "any": the call itself is forbidden; "succeeded": only a call the system carried out (the normal path shows
    # the same call failing, e.g. a locked record, and the hack path shows it going through)
    when: Literal["any", "succeeded"] = "any"


class Rubric(_Model):
    text: str = ""               # free-text rubric (imported tasks; the judge reads it)
    sub_goals: list[SubGoal] = Field(default_factory=list)
    required_interactions: list[RequiredInteraction] = Field(default_factory=list)
    forbidden_actions: list[ForbiddenAction] = Field(default_factory=list)
    expected_final_state: Optional[dict[str, Any]] = None
    expected_state_hash: Optional[str] = None


# ------------------------------------------------------------------------------- lineage / difficulty
class Lineage(_Model):
    source_task_id: Optional[str] = None
    parent_ids: list[str] = Field(default_factory=list)
    round: int = 0
    method: str = "procedural"   # procedural | imported | synthesized | expanded_from_failure | harder_variant
    seed: Optional[int] = None
    generator: str = ""
    notes: str = ""


class Difficulty(_Model):
    """The knobs the flywheel turns; `level` is a coarse summary (0 = easiest)."""

    level: int = 0
    tree_depth: int = 1
    n_branches: int = 1
    n_steps: int = 1             # tool calls on the gold path
    n_distractors: int = 0
    adversarial_pressure: int = 0  # escape steps the user tries after a refusal
    n_hidden: int = 1


# ---------------------------------------------------------------------------------------------- task
class Task(_Model):
    schema_version: int = SCHEMA_VERSION
    id: str
    domain: str = "imported"     # a registered procedural world, or "imported" (no world state)
    system_prompt: str           # the agent's policy / SOP (without the rendered tools block)
    user_opening: str            # the user's first turn
    tools: list[ToolSchema] = Field(default_factory=list)
    behavior_tree: Optional[BehaviorTree] = None
    branch: BranchRef = Field(default_factory=BranchRef)
    user: UserProfile = Field(default_factory=UserProfile)
    test_policy: str = ""
    initial_state: Optional[dict[str, Any]] = None
    expected_returns: ExpectedToolReturns = Field(default_factory=ExpectedToolReturns)
    gold_actions: list[ToolCall] = Field(default_factory=list)
    rubric: Rubric = Field(default_factory=Rubric)
    lineage: Lineage = Field(default_factory=Lineage)
    difficulty: Difficulty = Field(default_factory=Difficulty)
    gold_trajectory: list[dict[str, Any]] = Field(default_factory=list)  # OpenAI chat messages
    gold_replies: list[str] = Field(default_factory=list)   # raw agent replies that, replayed, score 1.0
    metadata: dict[str, Any] = Field(default_factory=dict)  # importer extras (e.g. original system text)

    @model_validator(mode="after")
    def _consistent(self) -> "Task":
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"task {self.id}: duplicate tool names {names}")
        known = set(names)
        for where, calls in (("gold_actions", [c.name for c in self.gold_actions]),
                             ("forbidden_actions", [f.call.name for f in self.rubric.forbidden_actions])):
            bad = [c for c in calls if c not in known]
            if bad and known:
                raise ValueError(f"task {self.id}: {where} use unknown tools {bad}")
        if self.behavior_tree is not None and self.branch.node_id and self.behavior_tree.find(self.branch.node_id) is None:
            raise ValueError(f"task {self.id}: branch.node_id {self.branch.node_id!r} is not in the behavior tree")
        return self

    def tool(self, name: str) -> ToolSchema:
        for t in self.tools:
            if t.name == name:
                return t
        raise KeyError(f"task {self.id} has no tool {name!r}")

    def openai_tools(self, include_outputs: bool = True) -> list[dict]:
        return [t.to_openai(include_outputs) for t in self.tools]

    @property
    def has_world_state(self) -> bool:
        return self.initial_state is not None

    @property
    def write_tools(self) -> set[str]:
        return {t.name for t in self.tools if t.kind == "write"}


BTNode.model_rebuild()
