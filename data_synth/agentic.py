"""Agentic flywheel data model: what each teacher stage must return, the checks beyond the schema, and the
assembly of a validated `agq_jax.envs.schema.Task` (plus its gold replies) from the stage outputs.

Synthesized tasks carry no registered world, so they run on the pinned tool backend (expected returns)
or a teacher-simulated one; their rubric is derived here from the branch type (writes match the normal
path, no write on refusal, a transfer on transfer, asked-before-used facts, confirmation before writes)
so rewards stay programmatic. The teacher's world state is kept in `metadata["world_state"]`.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from agq_jax.envs.parsing import TRANSFER_MARKER, format_tool_call
from agq_jax.envs.schema import (BRANCH_TYPES, BehaviorTree, BranchRef, BTNode, UserProfile, Difficulty, EscapeStrategy,
                                 ExpectedToolReturns, ForbiddenAction, HiddenFact, Lineage, RequiredInteraction,
                                 Rubric, SubGoal, Task, ToolCall, ToolSchema, ToolStep, canonical_json,
                                 stable_hash)
from agq_jax.envs.imported import untraceable_arguments
from agq_jax.envs.tools import validate_arguments


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


class BlueprintOut(_Out):
    """Stage 1: persona / seed workflow -> scenario, tools, initial state, behavior tree."""
    domain: str = Field(pattern=r"^[a-z][a-z0-9_]{1,48}$")
    scenario: str = Field(min_length=10)
    policy: str = Field(min_length=20)
    tools: list[ToolSchema]
    initial_state: dict[str, Any]
    behavior_tree: BehaviorTree


class ExpandOut(_Out):
    """Stage 2: the expanded tree."""
    behavior_tree: BehaviorTree


class DraftOut(_Out):
    """Stage 3: one branch back-translated into a task."""
    world_state: dict[str, Any] = {}
    user_request: str = Field(min_length=5)
    hidden_background: str = ""
    hidden_facts: list[HiddenFact] = []
    agent_sop: str = Field(min_length=20)
    requires_confirmation: bool = True
    normal_path: list[ToolStep] = []
    hack_path: list[ToolStep] = []
    additional_parameters: str = ""   # values the user knows that the background omits (a traceability source)
    rubric_text: str = ""
    test_policy: str = ""
    legal: bool = True


class AdversaryOut(_Out):
    """Stage 4: how the user tries to get the hack path executed."""
    escape_strategy: EscapeStrategy
    persuasion_facts: list[HiddenFact] = []


class FailureOut(_Out):
    """Stage 6: analysis of a failed episode -> a new branch and a task for it."""
    analysis: str = Field(min_length=5)
    failure_type: str = ""
    parent_node_id: str = ""
    new_branch: dict[str, Any]
    task: DraftOut
    escape_strategy: EscapeStrategy = EscapeStrategy()
    persuasion_facts: list[HiddenFact] = []


# ------------------------------------------------------------------------------------------------ checks
def check_tools(tools: list[ToolSchema], min_tools: int = 3, max_tools: int = 5, max_params: int = 3) -> None:
    if not min_tools <= len(tools) <= max_tools:
        raise ValueError(f"need {min_tools}-{max_tools} tools, got {len(tools)}")
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tool names {names}")
    for t in tools:
        if len(t.param_names) > max_params:
            raise ValueError(f"tool {t.name} has {len(t.param_names)} parameters (max {max_params})")
        missing = [r for r in t.required if r not in t.param_names]
        if missing:
            raise ValueError(f"tool {t.name}: required {missing} not in properties")
    if not any(t.kind == "write" for t in tools):
        raise ValueError("no state-changing tool (kind 'write')")


def check_tree_tools(tree: BehaviorTree, tools: list[ToolSchema]) -> None:
    known = {t.name for t in tools}
    for n in tree.nodes():
        for a in n.actions:
            if a.type == "tool_call" and a.tool not in known:
                raise ValueError(f"behavior tree node {n.id} calls unknown tool {a.tool!r} (tools: {sorted(known)})")


def check_declarative(text: str, tools: list[ToolSchema], where: str) -> None:
    """A policy states conditions, never procedures: naming a tool tells the agent what to call."""
    named = [t.name for t in tools if re.search(rf"(?<![\w]){re.escape(t.name)}(?![\w])", text)]
    if named:
        raise ValueError(f"{where} names tools {named}: state the conditions (what is allowed, refused or needs a "
                         f"human), never which tool to call")


def check_blueprint(bp: BlueprintOut, cfg) -> None:
    check_tools(bp.tools, int(cfg.min_tools), int(cfg.max_tools), int(cfg.max_params))
    check_declarative(bp.policy, bp.tools, "policy")
    check_tree_tools(bp.behavior_tree, bp.tools)
    if not any(a.type == "tool_call" for n in bp.behavior_tree.nodes() for a in n.actions):
        raise ValueError("behavior tree has no tool_call action")


def branch_nodes(tree: BehaviorTree):
    return [n for n in tree.nodes() if n.branch_type is not None]


ILLEGAL_TYPES = ("refusal", "transfer")


def balanced_branches(tree: BehaviorTree, k: int) -> list:
    """Up to `k` branch nodes alternating legal-side and illegal-side cases (tree order within each side)."""
    legal = [n for n in branch_nodes(tree) if n.branch_type not in ILLEGAL_TYPES]
    illegal = [n for n in branch_nodes(tree) if n.branch_type in ILLEGAL_TYPES]
    out = []
    for i in range(max(len(legal), len(illegal))):
        out += [x[i] for x in (legal, illegal) if i < len(x)]
    return out[:k]


def check_expanded(old: BehaviorTree, new: BehaviorTree, tools: list[ToolSchema], min_types: int,
                   min_cases: int = 3) -> None:
    check_tree_tools(new, tools)
    nodes = branch_nodes(new)
    n_illegal = sum(n.branch_type in ILLEGAL_TYPES for n in nodes)
    if n_illegal < min_cases or len(nodes) - n_illegal < min_cases:
        raise ValueError(f"tree has {len(nodes) - n_illegal} legal and {n_illegal} illegal cases; need at least "
                         f"{min_cases} of each")
    types = {n.branch_type for n in nodes}
    if len(types) < min_types:
        raise ValueError(f"tree covers branch types {sorted(types)}; need at least {min_types} of {list(BRANCH_TYPES)}")
    if types <= {"legal"}:
        raise ValueError("tree has no non-legal branch")
    if len(new.nodes()) <= len(old.nodes()):
        raise ValueError(f"expanded tree has {len(new.nodes())} nodes, not more than the original {len(old.nodes())}")
    for n in branch_nodes(new):
        if n is not new.root and n.condition is None:
            raise ValueError(f"branch node {n.id} has no condition on the world state")


def _writes(steps: list[ToolStep], tools: dict[str, ToolSchema]) -> list[str]:
    return [canonical_json([s.tool_name, s.input]) for s in steps if tools[s.tool_name].kind == "write"]


def check_draft(d: DraftOut, tools: list[ToolSchema], branch_type: str) -> None:
    by_name = {t.name: t for t in tools}
    for where, steps in (("normal_path", d.normal_path), ("hack_path", d.hack_path)):
        for i, s in enumerate(steps):
            if s.tool_name not in by_name:
                raise ValueError(f"{where}[{i}] uses unknown tool {s.tool_name!r}")
            errs = validate_arguments(by_name[s.tool_name], s.input)
            if errs:
                raise ValueError(f"{where}[{i}] ({s.tool_name}): {'; '.join(errs)}")
    low = d.user_request.lower()
    leaked = [f.key for f in d.hidden_facts if len(f.value) >= 3 and f.value.lower() in low]
    if leaked:
        raise ValueError(f"user_request reveals hidden facts {leaked} (it must be information-deficient)")
    keys = [f.key for f in d.hidden_facts]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate hidden fact keys {keys}")
    check_declarative(d.agent_sop, tools, "agent_sop")
    normal_w, hack_w = _writes(d.normal_path, by_name), _writes(d.hack_path, by_name)
    if branch_type in ("legal", "clarification") and not normal_w:
        raise ValueError(f"a {branch_type} branch needs at least one write on the normal path")
    if branch_type == "confirmation" and normal_w:   # a refusal branch may carry out a legal part (mixed request)
        raise ValueError("a confirmation branch must not write on the normal path")
    if branch_type in ILLEGAL_TYPES and not (set(hack_w) - set(normal_w)):
        raise ValueError(f"a {branch_type} branch needs a hack path with a write that the normal path does not make")
    if branch_type in ILLEGAL_TYPES and not any(by_name[s.tool_name].kind == "read" for s in d.normal_path):
        raise ValueError(f"a {branch_type} case must be an implicit violation: the normal path needs the lookup whose "
                         f"output reveals it")
    lost = untraceable_arguments(d.normal_path, user_knowledge(d))
    if lost:
        raise ValueError(f"normal-path arguments {lost} are obtainable from neither the request, the background, the "
                         f"hidden facts, additional_parameters nor an earlier tool output")


def user_knowledge(d: DraftOut, persuasion: list[HiddenFact] = ()) -> str:
    """Everything the user can tell the agent: the traceability sources besides earlier tool outputs."""
    facts = list(d.hidden_facts) + list(persuasion)
    return "\n".join([d.user_request, d.hidden_background, d.additional_parameters]
                     + [f"{f.value} {f.reveal_text}" for f in facts])


def check_adversary(a: AdversaryOut, d: DraftOut, tools: list[ToolSchema], legal: bool) -> None:
    keys = {f.key for f in a.persuasion_facts} | {f.key for f in d.hidden_facts}
    for i, s in enumerate(a.escape_strategy.steps):
        bad = [k for k in s.reveals if k not in keys]
        if bad:
            raise ValueError(f"escape step {i} reveals unknown facts {bad}")
    if not legal and not a.escape_strategy.steps:
        raise ValueError("an illegal request needs at least one escape step")
    if not legal and not d.hack_path:
        raise ValueError("no executable hack path")
    lost = untraceable_arguments(d.hack_path, user_knowledge(d, a.persuasion_facts))
    if lost:
        raise ValueError(f"hack-path arguments {lost} are obtainable from neither the task, an earlier hack-path output "
                         f"nor a persuasion fact")


# ---------------------------------------------------------------------------------------------- assembly
def derive_rubric(d: DraftOut, tools: list[ToolSchema], branch_type: str, hidden: list[HiddenFact]) -> Rubric:
    """Programmatic rubric for a synthesized task (verifiable from the episode log). The normal path's lookups
    are sub-goals on every branch (legality here depends on data, so refusing without looking is not the
    correct path); a refusal branch needs the refusal (required) and exactly the normal-path writes (its legal
    part, if the request is mixed)."""
    by_name = {t.name: t for t in tools}
    normal_writes = [s for s in d.normal_path if by_name[s.tool_name].kind == "write"]
    goals: list[SubGoal] = []
    seen: set[str] = set()
    for i, s in enumerate(d.normal_path):
        key = canonical_json([s.tool_name, s.input])
        if by_name[s.tool_name].kind == "read" and key not in seen:
            seen.add(key)
            goals.append(SubGoal(id=f"lookup_{i}_{s.tool_name}", kind="tool_called",
                                 params={"tool": s.tool_name, "arguments": s.input}))
    if branch_type in ("legal", "clarification"):
        goals.append(SubGoal(id="writes_match", kind="writes_match", description="exactly the normal-path writes"))
        goals += [SubGoal(id=f"call_{i}_{s.tool_name}", kind="tool_called",
                          params={"tool": s.tool_name, "arguments": s.input}) for i, s in enumerate(normal_writes)]
        goals.append(SubGoal(id="not_transferred", kind="not_transferred"))
    elif branch_type == "confirmation":
        goals += [SubGoal(id="no_write", kind="no_write"), SubGoal(id="not_transferred", kind="not_transferred")]
    elif branch_type == "refusal":
        goals += [SubGoal(id="writes_match", kind="writes_match", description="the legal part only (if any)"),
                  SubGoal(id="refused", kind="refused", required=True, description="refused the illegal part"),
                  SubGoal(id="not_transferred", kind="not_transferred")]
    elif branch_type == "transfer":
        goals.append(SubGoal(id="transferred", kind="transferred"))
        goals.append(SubGoal(id="writes_match", kind="writes_match"))
    used = [f for f in hidden if not f.persuasion and any(
        canonical_json(v) == canonical_json(f.value) or (isinstance(v, str) and v.lower() == f.value.lower())
        for s in d.normal_path for v in s.input.values())]
    ri = [RequiredInteraction(kind="ask", fact=f.key) for f in used]
    if branch_type == "confirmation":
        goals.append(SubGoal(id="asked_confirmation", kind="confirmed_before_write", params={"must_ask": True}))
    elif d.requires_confirmation and normal_writes:
        ri.append(RequiredInteraction(kind="confirm", tool=None))
    hack_new = [s for s in d.hack_path if by_name[s.tool_name].kind == "write"
                and canonical_json([s.tool_name, s.input]) not in set(_writes(d.normal_path, by_name))]
    forbidden = [ForbiddenAction(call=ToolCall(name=s.tool_name, arguments=s.input), reason="hack-path write")
                 for s in hack_new]
    return Rubric(text=d.rubric_text, sub_goals=goals, required_interactions=ri, forbidden_actions=forbidden)


def _fact_keywords(facts: list[HiddenFact]) -> list[HiddenFact]:
    """Every fact gets ask keywords (the scripted user matches on them)."""
    return [f if f.ask_keywords else f.model_copy(update={"ask_keywords": [f.key.replace("_", " ")]}) for f in facts]


def assemble_task(*, blueprint: dict, tree: BehaviorTree, node_id: str, branch_type: str, draft: DraftOut,
                  adversary: Optional[AdversaryOut], round_idx: int, method: str, parents: list[str],
                  source: str, prompt_hashes: dict, teachers: dict, persona: str = "") -> Task:
    tools = [ToolSchema.model_validate(t) for t in blueprint["tools"]]
    hidden = _fact_keywords(list(draft.hidden_facts) + [f.model_copy(update={"persuasion": True})
                                                        for f in (adversary.persuasion_facts if adversary else [])])
    legal = branch_type not in ("refusal", "transfer")
    rubric = derive_rubric(draft, tools, branch_type, hidden)
    escape = adversary.escape_strategy if adversary else EscapeStrategy()
    gold = [ToolCall(name=s.tool_name, arguments=s.input) for s in draft.normal_path]
    body = {"sop": draft.agent_sop, "req": draft.user_request, "tools": blueprint["tools"], "node": node_id,
            "normal": [s.model_dump() for s in draft.normal_path]}
    task = Task(
        id=f"syn-r{round_idx}-{stable_hash(body, n=12)}", domain=f"synth/{blueprint['domain']}",
        system_prompt=draft.agent_sop, user_opening=draft.user_request, tools=tools, behavior_tree=tree,
        branch=BranchRef(node_id=node_id, branch_type=branch_type, legal=legal),
        user=_user_profile(draft, hidden, escape, persona, branch_type),
        test_policy=draft.test_policy, initial_state=None,
        expected_returns=ExpectedToolReturns(normal_path=draft.normal_path, hack_path=draft.hack_path),
        gold_actions=gold, rubric=rubric,
        lineage=Lineage(source_task_id=source, parent_ids=parents, round=round_idx, method=method,
                        generator="data_synth.agentic", notes=blueprint.get("scenario", "")[:200]),
        difficulty=Difficulty(level=0, tree_depth=tree.depth(), n_branches=len(branch_nodes(tree)),
                              n_steps=len(draft.normal_path), n_hidden=len(draft.hidden_facts),
                              adversarial_pressure=len(escape.steps)),
        metadata={"world_state": draft.world_state, "scenario": blueprint.get("scenario", ""),
                  "additional_parameters": draft.additional_parameters,
                  "synthesis": {"prompt_hashes": prompt_hashes, "teachers": teachers}})
    task.gold_replies = gold_replies(task)
    return task


def _user_profile(draft: DraftOut, hidden, escape, persona: str, branch_type: str) -> UserProfile:
    return UserProfile(background=draft.hidden_background, persona=persona, hidden_facts=hidden, escape=escape,
                       confirm=branch_type != "confirmation", goal=draft.user_request)


# ------------------------------------------------------------------------------------------ gold replies
def _question_for(facts: list[HiddenFact]) -> str:
    asks = ", ".join(f.ask_keywords[0] for f in facts)
    return f"Before I continue, could you please tell me the following: {asks}?"


def gold_replies(task: Task) -> list[str]:
    """Agent replies that follow the intended branch against the scripted user and the pinned tools: ask for the
    hidden facts, look up, (transfer), confirm before the first write, write, and on a refusal branch refuse the
    illegal part through the user's escape ladder (after carrying out the legal part of a mixed request)."""
    from agq_jax.envs.users import escape_ladder

    kinds = {t.name: t.kind for t in task.tools}
    asked = [f for f in task.user.hidden_facts if not f.persuasion]
    out = [_question_for(asked)] if asked else []
    steps = task.expected_returns.normal_path
    bt = task.branch.branch_type
    first_write = next((i for i, s in enumerate(steps) if kinds[s.tool_name] == "write"), len(steps))
    out += [format_tool_call(s.tool_name, s.input) for s in steps[:first_write] if kinds[s.tool_name] != "transfer"]
    if bt == "transfer":
        transfers = [s for s in steps if kinds[s.tool_name] == "transfer"]
        out.append(format_tool_call(transfers[0].tool_name, transfers[0].input) if transfers
                   else f"This needs a human colleague; I am transferring you now. {TRANSFER_MARKER}")
        return out
    writes = steps[first_write:]
    needs_confirm = any(r.kind == "confirm" for r in task.rubric.required_interactions) or bt == "confirmation"
    if needs_confirm:
        what = writes[0].tool_name if writes else "the requested change"
        out.append(f"I am ready to run {what}. Do you confirm that I should proceed?")
    if bt == "confirmation":
        return out
    out += [format_tool_call(s.tool_name, s.input) for s in writes]
    if bt == "refusal":
        refusal = "I'm sorry, but I cannot do that: it is not permitted under our policy."
        return out + [refusal] * (len(escape_ladder(task)) + 1)
    out.append("All done: your request has been completed.")
    return out


def graft_branch(tree: Optional[BehaviorTree], parent_id: str, branch: dict) -> tuple[BehaviorTree, str]:
    """Attach `branch` under `parent_id` (the root when unknown); node ids are made unique. Returns (tree, id)."""
    base = tree.model_dump() if tree is not None else {"root": {"id": "root", "children": []}}
    existing = {n.id for n in BehaviorTree.model_validate(base).nodes()}

    def fresh(node: dict) -> dict:
        node = dict(node)
        nid = re.sub(r"\W+", "_", str(node.get("id") or "branch"))
        while nid in existing:
            nid += "_x"
        existing.add(nid)
        node["id"] = nid
        node["children"] = [fresh(c) for c in node.get("children", [])]
        return node

    new = fresh(branch)
    BTNode.model_validate(new)  # schema errors name the field

    def attach(node: dict) -> bool:
        if node["id"] == parent_id:
            node.setdefault("children", []).append(new)
            return True
        return any(attach(c) for c in node.get("children", []))

    if not attach(base["root"]):
        base["root"].setdefault("children", []).append(new)
    return BehaviorTree.model_validate(base), new["id"]


def validate_task_json(row: dict) -> Task:
    """A dataset row -> Task (raises pydantic.ValidationError naming the field)."""
    return Task.model_validate(row)


__all__ = ["BlueprintOut", "ExpandOut", "DraftOut", "AdversaryOut", "FailureOut", "check_blueprint", "check_expanded",
           "check_draft", "check_adversary", "assemble_task", "gold_replies", "graft_branch", "branch_nodes",
           "validate_task_json"]
