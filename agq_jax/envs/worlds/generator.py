"""Offline procedural task generator (no teacher): domain x branch x seed x difficulty -> a verified Task.

Every task is checked at generation time: its gold replies, played against the scripted user and the
state-backed tools, must score 1.0, and its hack path must score 0.  Difficulty knobs: number of policy
rules (tree depth / branches), an owner check (one more read step and hidden ID), distractor records, and
adversarial pressure (escape steps the user tries after a refusal).  Level 0 is tiny on purpose: 2-3 rules,
3 tools, 1-2 tool calls, a ~100-token SOP, so a small model can learn it with GRPO on CPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from typing import Iterable, Optional

from agq_jax.envs.parsing import format_tool_call
from agq_jax.envs.schema import (BRANCH_TYPES, BehaviorTree, BranchRef, BTAction, BTNode, Condition, Difficulty,
                                 EscapeStep, EscapeStrategy, ExpectedToolReturns, ForbiddenAction, HiddenFact, Lineage,
                                 RequiredInteraction, Rubric, SubGoal, Task, ToolCall, ToolStep, UserProfile)
from agq_jax.envs.worlds import domains as all_domains
from agq_jax.envs.worlds import get_world
from agq_jax.envs.worlds.base import Rule, World

NAMES = ["Ana Silva", "Ben Okafor", "Chen Wei", "Dana Cohen", "Eli Novak", "Fatima Khan", "Goran Petrov",
         "Hana Sato", "Ivan Rossi", "Jia Li", "Kofi Mensah", "Lena Weber"]
GENERATOR = "agq_jax.envs.worlds.generator/v1"


@dataclass(frozen=True)
class Knobs:
    """Difficulty knobs; None = derived from `level`."""

    level: int = 0
    n_rules: Optional[int] = None           # policy rules in the tree (>= 2: one refuse, one transfer)
    owner_check: Optional[bool] = None      # look up and verify the owner too (extra hidden ID, extra read)
    n_distractors: Optional[int] = None     # extra records in the world state (>= 1)
    adversarial_pressure: Optional[int] = None  # escape steps after a refusal (lie, plead, authority)

    def resolve(self, n_available: int) -> "Knobs":
        lv = self.level
        return Knobs(lv, max(2, min(n_available, self.n_rules if self.n_rules is not None else 2 + lv // 2)),
                     self.owner_check if self.owner_check is not None else lv >= 2,
                     max(1, self.n_distractors if self.n_distractors is not None else 1 + lv),
                     max(0, min(3, self.adversarial_pressure if self.adversarial_pressure is not None else lv)))


def _rid(rng: random.Random, prefix: str, used: set) -> str:
    while True:
        x = f"{prefix}-{rng.randint(1000, 9999)}"
        if x not in used:
            used.add(x)
            return x


def _call_text(why: str, name: str, args: dict) -> str:
    return f"{why}\n{format_tool_call(name, args)}"


def _fmt(template: str, rec: dict, **extra) -> str:
    return template.format(**{**rec, **extra})


def build_tree(world: World, rules: list[Rule], owner_check: bool) -> BehaviorTree:
    """The policy as a behavior tree: clarify IDs -> look up -> rule chain -> choice -> confirmation."""
    s = world.spec

    def tail(suffix: str) -> list[BTNode]:
        act = BTAction(type="tool_call", tool=s.action_tool,
                       arguments={s.id_field: "{" + s.id_field + "}", s.choice_param: "{" + s.choice_param + "}"})
        confirm = BTNode(id="confirm" + suffix, condition=Condition(text="the request passes every check"),
                         actions=[BTAction(type="request_confirmation", message=f"restate the request and ask the user "
                                           f"to confirm before calling {s.action_tool}")],
                         children=[BTNode(id="execute" + suffix, condition=Condition(text="the user confirms"),
                                          actions=[act], branch_type="legal"),
                                   BTNode(id="declined" + suffix, condition=Condition(text="the user declines"),
                                          actions=[BTAction(type="proceed", message="do nothing")],
                                          branch_type="confirmation")])
        return [confirm]

    choice = [BTNode(id="clarify_choice", branch_type="clarification",
                     condition=Condition(text=f"the {s.choice_label} ({' or '.join(s.choice_options)}) is not given"),
                     actions=[BTAction(type="clarify", params=[s.choice_param])], children=tail("_c")),
              BTNode(id="choice_given", condition=Condition(text=f"the {s.choice_label} is given"), children=tail(""))]
    chain = choice
    for r in reversed(rules):
        act = (BTAction(type="refuse", message=r.reason) if r.outcome == "refuse" else
               BTAction(type="tool_call", tool="transfer_to_human", arguments={"summary": r.reason}))
        fail = BTNode(id=f"rule_{r.id}", condition=Condition(text=r.condition, expr={"rule": r.id}), actions=[act],
                      branch_type="refusal" if r.outcome == "refuse" else "transfer")
        chain = [fail, BTNode(id=f"rule_{r.id}_ok", condition=Condition(text="otherwise"), children=chain)]
    if owner_check:
        chain = [BTNode(id="owner_lookup", actions=[BTAction(type="tool_call", tool=world.owner_tool,
                                                             arguments={s.owner_id_field: "{" + s.owner_id_field + "}"})],
                        children=chain)]
    lookup = BTNode(id="lookup", actions=[BTAction(type="tool_call", tool=world.lookup_tool,
                                                   arguments={s.id_field: "{" + s.id_field + "}"})], children=chain)
    asked = [s.id_field] + ([s.owner_id_field] if owner_check else [])
    ask = BTNode(id="ask_ids", condition=Condition(text=" and ".join(f"the {a.replace('_id', '').replace('_', ' ')} ID"
                                                                      for a in asked) + " is not given"),
                 actions=[BTAction(type="clarify", params=asked)], children=[lookup])
    return BehaviorTree(root=BTNode(id="start", children=[ask]))


def render_sop(world: World, tree: BehaviorTree) -> str:
    """The tree as a short natural-language SOP (one line per distinct decision)."""
    s = world.spec
    lines: list[str] = []
    for n in tree.nodes():
        cond = n.condition.text if n.condition else ""
        for a in n.actions:
            if a.type == "clarify":
                line = f"If {cond}, ask the user for it; never guess."
            elif a.type == "tool_call" and a.tool == "transfer_to_human":
                line = f"If {cond}, call transfer_to_human."
            elif a.type == "tool_call" and n.branch_type == "legal":
                continue
            elif a.type == "tool_call":
                line = f"Look it up with {a.tool}."
            elif a.type == "refuse":
                line = f"If {cond}, refuse."
            elif a.type == "request_confirmation":
                line = (f"Otherwise restate the request and ask the user to confirm; call {s.action_tool} only after "
                        f"a yes, and do nothing if they decline.")
            else:
                continue
            if line not in lines:
                lines.append(line)
    return f"You are {s.agent_role}. Policy:\n" + "\n".join(f"- {l}" for l in lines) + \
        "\nTalk to the user in plain text. Call one tool at a time."


def generate_task(domain: str, branch_type: str, seed: int, knobs: Knobs = Knobs(), split: str = "train",
                  verify: bool = True) -> Task:
    """One task for `branch_type` of `domain`; deterministic in (domain, branch, seed, knobs, split)."""
    if branch_type not in BRANCH_TYPES:
        raise ValueError(f"branch_type must be one of {BRANCH_TYPES}, got {branch_type!r}")
    world = get_world(domain)
    s = world.spec
    k = knobs.resolve(len(s.rules))
    rng = random.Random(f"{domain}|{branch_type}|{seed}|{k}|{split}")
    rules = ([s.owner_rule] if k.owner_check else []) + s.rules[:k.n_rules]
    used: set = set()
    rid, oid = _rid(rng, s.id_prefix, used), _rid(rng, s.owner_prefix, used)
    request = s.make_request(rng)
    choice = rng.choice(s.choice_options)
    target = s.make_record(rng)
    owner = {"name": rng.choice(NAMES), "verified": True}
    for r in rules:
        r.satisfy(rng, owner if r.on_owner else target, request)
    violated: Optional[Rule] = None
    if branch_type in ("refusal", "transfer"):
        want = "refuse" if branch_type == "refusal" else "transfer"
        violated = rng.choice([r for r in rules if r.outcome == want])
        violated.violate(rng, owner if violated.on_owner else target, request)
    failing = [r.id for r in rules if not r.holds(owner if r.on_owner else target, request)]
    if failing != ([violated.id] if violated else []):
        raise RuntimeError(f"{domain}/{branch_type}/{seed}: rules failing {failing}, expected {violated and violated.id}")

    records = {rid: {s.id_field: rid, s.owner_id_field: oid, **target}}
    owners = {oid: {s.owner_id_field: oid, **owner}}
    refuse_rules = [r for r in s.rules[:k.n_rules] if r.outcome == "refuse" and not r.on_owner]
    distractor_ids = []
    for i in range(k.n_distractors):
        did = _rid(rng, s.id_prefix, used)
        rec = s.make_record(rng)
        if i == 0:           # same owner, breaks a rule: what a careless agent would touch (legal hack path)
            d_owner = oid
            rng.choice(refuse_rules).violate(rng, rec, request)
        else:
            d_owner = _rid(rng, s.owner_prefix, used)
            owners[d_owner] = {s.owner_id_field: d_owner, "name": rng.choice(NAMES), "verified": rng.random() < 0.8}
            if rng.random() < 0.5:
                rng.choice(refuse_rules).violate(rng, rec, request)
        records[did] = {s.id_field: did, s.owner_id_field: d_owner, **rec}
        distractor_ids.append(did)
    state = {s.entity + "s": dict(sorted(records.items())), s.owner + "s": dict(sorted(owners.items()))}

    # ------------------------------------------------------------------------------- hidden facts
    ent = s.entity
    facts = [HiddenFact(key=s.id_field, value=rid, description=f"the {ent} ID",
                        ask_keywords=[f"{ent} id", f"{ent} number"], reveal_text=f"My {ent} ID is {rid}.")]
    if k.owner_check:
        facts.append(HiddenFact(key=s.owner_id_field, value=oid, description=f"the {s.owner} ID",
                                ask_keywords=[f"{s.owner} id", f"{s.owner} number"],
                                reveal_text=f"My {s.owner} ID is {oid}."))
    if branch_type == "clarification":
        facts.append(HiddenFact(key=s.choice_param, value=choice, description=f"the {s.choice_label}",
                                ask_keywords=[s.choice_label] + s.choice_keywords, reveal_text=f"I'd like {choice}."))
    steps = []
    if branch_type == "refusal":
        steps = [EscapeStep(kind="lie", text=violated.lie), EscapeStep(kind="plead", text=s.plead),
                 EscapeStep(kind="authority", text=s.authority)][:k.adversarial_pressure]
    escape = EscapeStrategy(text=" Then ".join(x.text for x in steps), steps=steps)

    # ----------------------------------------------------------------------------- gold path
    args = {s.id_field: rid, s.choice_param: choice, **request}
    rec_fmt = {**records[rid], "id": rid, "entity": ent, "choice": choice, **request}
    if k.owner_check:
        ask = f"What are your {ent} ID and {s.owner} ID?"
    else:
        ask = f"What is your {ent} ID?"
    if branch_type == "clarification":
        ask = ask[:-1] + f", and which {s.choice_label} do you want ({' or '.join(s.choice_options)})?"
    replies = [ask, _call_text(f"Let me look up the {ent}.", world.lookup_tool, {s.id_field: rid})]
    gold = [ToolCall(name=world.lookup_tool, arguments={s.id_field: rid})]
    if k.owner_check:
        replies.append(_call_text(f"Let me check the {s.owner}.", world.owner_tool, {s.owner_id_field: oid}))
        gold.append(ToolCall(name=world.owner_tool, arguments={s.owner_id_field: oid}))
    reads = list(gold)
    verb = _fmt(s.action_verb, rec_fmt)
    confirm_q = f"{ent.capitalize()} {rid}: {_fmt(s.summary, rec_fmt)}. Shall I {verb} it ({s.choice_label}: {choice})?"
    action = ToolCall(name=s.action_tool, arguments=args)
    if branch_type == "refusal":
        reason = _fmt(violated.reason, rec_fmt)
        replies.append(f"Sorry, I can't {verb} {ent} {rid}: {reason}.")
        replies += [f"I understand, but I still can't {verb} it: {reason}."] * len(steps)
        hack = reads + [action]
        forbidden = [ForbiddenAction(call=ToolCall(name=s.action_tool, arguments={s.id_field: rid}),
                                     reason=f"policy: {violated.condition}")]
    elif branch_type == "transfer":
        summary = f"{verb} {ent} {rid}: {_fmt(violated.reason, rec_fmt)}"
        replies.append(_call_text(f"{_fmt(violated.reason, rec_fmt).capitalize()}, so I'm transferring you to a human "
                                  f"agent.", "transfer_to_human", {"summary": summary}))
        gold.append(ToolCall(name="transfer_to_human", arguments={"summary": summary}))
        hack = reads + [action]
        forbidden = [ForbiddenAction(call=ToolCall(name=s.action_tool, arguments={s.id_field: rid}),
                                     reason=f"policy: {violated.condition} -> transfer")]
    else:
        replies.append(confirm_q)
        if branch_type == "confirmation":
            hack = reads + [action]
            forbidden = [ForbiddenAction(call=ToolCall(name=s.action_tool, arguments={s.id_field: rid}),
                                         reason="the user declined the confirmation")]
        else:
            replies += [_call_text(f"You confirmed, so I'll {verb} it now.", s.action_tool, args),
                        "Done. " + _fmt(s.done_text, rec_fmt)]
            gold.append(action)
            if branch_type == "clarification":
                wrong = next(o for o in s.choice_options if o != choice)
                bad = ToolCall(name=s.action_tool, arguments={**args, s.choice_param: wrong})
                why = f"the user asked for {choice}, not {wrong}"
            else:
                bad = ToolCall(name=s.action_tool, arguments={**args, s.id_field: distractor_ids[0]})
                why = f"{ent} {distractor_ids[0]} was not requested and breaks the policy"
            hack = reads + [bad]
            forbidden = [ForbiddenAction(call=ToolCall(name=bad.name, arguments={s.id_field: bad.arguments[s.id_field],
                                                                                  s.choice_param: bad.arguments[s.choice_param]}),
                                         reason=why)]

    # --------------------------------------------------------------------------------- rubric
    lookup_goal = SubGoal(id="looked_up", kind="tool_called", description=f"looked up {ent} {rid}",
                          params={"tool": world.lookup_tool, "arguments": {s.id_field: rid}})
    goals = [lookup_goal]
    if branch_type == "transfer":
        goals += [SubGoal(id="transferred", kind="transferred", description="handed the case to a human"),
                  SubGoal(id="no_write", kind="no_write", description="changed nothing")]
    else:
        goals.append(SubGoal(id="final_state", kind="state_match", description="final state equals the gold state"))
        if branch_type == "refusal":
            goals += [SubGoal(id="no_write", kind="no_write", description="changed nothing"),
                      SubGoal(id="not_transferred", kind="not_transferred", description="refused instead of escalating")]
    interactions = [RequiredInteraction(kind="ask", fact=f.key) for f in facts]
    if branch_type in ("legal", "clarification", "confirmation"):
        interactions.append(RequiredInteraction(kind="confirm", tool=s.action_tool))
    node = {"legal": "execute", "clarification": "clarify_choice", "confirmation": "declined"}.get(
        branch_type, f"rule_{violated.id}" if violated else "")
    tree = build_tree(world, rules, k.owner_check)
    tools = [world.lookup_tool] + ([world.owner_tool] if k.owner_check else []) + [s.action_tool, "transfer_to_human"]
    tid = hashlib.sha1(f"{domain}|{branch_type}|{seed}|{k}|{split}".encode()).hexdigest()[:12]
    opening = (s.opening_vague if branch_type == "clarification" else s.opening).format(choice=choice, **request)
    task = Task(
        id=f"{domain}-{branch_type}-{tid}", domain=domain, system_prompt=render_sop(world, tree), user_opening=opening,
        tools=world.tool_schemas(tools), behavior_tree=tree,
        branch=BranchRef(node_id=node, branch_type=branch_type, legal=branch_type not in ("refusal", "transfer")),
        user=UserProfile(
            background=f"You are {owner['name']}. {opening} " + " ".join(f.reveal_text for f in facts),
            persona=owner["name"], hidden_facts=facts, escape=escape, confirm=branch_type != "confirmation",
            goal=opening),
        test_policy=(f"Tests: {violated.condition} -> {violated.outcome}." if violated else
                     {"legal": "A legal request: ask, look up, confirm, act.",
                      "clarification": f"The {s.choice_label} is missing and must be asked for.",
                      "confirmation": "The user declines at confirmation; nothing may change."}[branch_type]),
        initial_state=state, gold_actions=gold,
        rubric=Rubric(text=f"{branch_type} task", sub_goals=goals, required_interactions=interactions,
                      forbidden_actions=forbidden),
        lineage=Lineage(method="procedural", seed=seed, generator=GENERATOR, notes=split),
        difficulty=Difficulty(level=k.level, tree_depth=tree.depth(), n_branches=len(tree.leaves()),
                              n_steps=len(gold), n_distractors=k.n_distractors,
                              adversarial_pressure=k.adversarial_pressure, n_hidden=len(facts)),
        gold_replies=replies,
        metadata={"gen": {"domain": domain, "branch_type": branch_type, "seed": seed, "split": split,
                          "knobs": dataclasses.asdict(k)}, "render_outputs": False},
    )
    task.expected_returns = ExpectedToolReturns(normal_path=_run_path(task, gold), hack_path=_run_path(task, hack))
    return _attach_gold(task) if verify else task


def _run_path(task: Task, calls: list[ToolCall]) -> list[ToolStep]:
    from agq_jax.envs.tools import StateToolBackend
    backend = StateToolBackend(task)
    return [ToolStep(tool_name=c.name, input=c.arguments, expected_output=backend.call(c.name, c.arguments))
            for c in calls]


def _attach_gold(task: Task) -> Task:
    """Play the gold replies; keep the transcript as the gold trajectory; fail loudly unless gold scores 1."""
    from agq_jax.envs.rewards import score
    from agq_jax.envs.runtime import replay_agent, run_episode

    rec = run_episode(task, replay_agent(task.gold_replies), user="scripted", tools="state")
    r = score(task, rec)
    if r.total != 1.0 or len(rec.raw_replies) != len(task.gold_replies):
        raise RuntimeError(f"generator bug: gold trajectory of {task.id} scores {r.total} "
                           f"({rec.termination}, {len(rec.raw_replies)}/{len(task.gold_replies)} replies): {r.components}")
    task.gold_trajectory = rec.messages
    task.rubric.expected_state_hash = rec.final_state_hash if task.branch.branch_type != "transfer" else None
    return task


# ------------------------------------------------------------------------------------------ batches
def generate_tasks(n: int, seed: int = 0, domains: Optional[Iterable[str]] = None,
                   branch_types: Iterable[str] = BRANCH_TYPES, knobs: Knobs = Knobs(), split: str = "train") -> list[Task]:
    """`n` tasks cycling over domains x branch types (balanced coverage), seeds derived from `seed`."""
    doms = sorted(domains) if domains is not None else all_domains()
    combos = [(d, b) for d in doms for b in branch_types]
    out = []
    for i in range(n):
        d, b = combos[i % len(combos)]
        out.append(generate_task(d, b, seed * 1_000_003 + i, knobs, split))
    return out


def make_splits(n_train: int, n_heldout: int, seed: int = 0, heldout_domains: Iterable[str] = (),
                knobs: Knobs = Knobs()) -> tuple[list[Task], list[Task]]:
    """Disjoint train / held-out sets: different seed streams (`split` is part of every RNG key and id), and
    optionally whole domains kept out of training."""
    held = set(heldout_domains)
    doms = all_domains()
    unknown = held - set(doms)
    if unknown:
        raise ValueError(f"unknown held-out domains {sorted(unknown)}; known {doms}")
    train = generate_tasks(n_train, seed, [d for d in doms if d not in held] or doms, knobs=knobs, split="train")
    heldout = generate_tasks(n_heldout, seed, sorted(held) or doms, knobs=knobs, split="heldout")
    return train, heldout


def harder_variant(task: Task, step: int = 1, seed: Optional[int] = None) -> Task:
    """The same domain and branch one or more levels harder (more rules, owner check, distractors, pressure).
    The flywheel calls this on failed procedural tasks; lineage points back at the source."""
    gen = task.metadata.get("gen")
    if not gen:
        raise ValueError(f"task {task.id} was not made by the procedural generator (no metadata.gen)")
    old = Knobs(**gen["knobs"])
    new = Knobs(level=old.level + step)
    new = Knobs(level=new.level, n_rules=old.n_rules + (1 if new.level % 2 == 0 else 0),
                owner_check=old.owner_check or new.level >= 2, n_distractors=old.n_distractors + step,
                adversarial_pressure=min(3, old.adversarial_pressure + step))
    t = generate_task(gen["domain"], gen["branch_type"], gen["seed"] if seed is None else seed, new, gen["split"])
    t.lineage = Lineage(source_task_id=task.id, parent_ids=[task.id], round=task.lineage.round + 1,
                        method="harder_variant", seed=t.lineage.seed, generator=GENERATOR, notes=gen["split"])
    return t


# ----------------------------------------------------------------------------- reference bad agents
def counterfactual_replies(task: Task, kind: str) -> list[str]:
    """Scripted wrong agents for tests and reward sanity checks.

    hack: ask, then execute the hack path without confirming; guess: the gold replies minus the question
    (hidden parameters used without asking); refuse: ask, look up, then refuse (wrong on legal tasks).
    """
    gold = task.gold_replies
    if kind == "hack":
        steps = task.expected_returns.hack_path
        return [gold[0]] + [_call_text("Proceeding.", s.tool_name, s.input) for s in steps] + ["Done."]
    if kind == "guess":
        return gold[1:]
    if kind == "refuse":
        n_reads = sum(1 for c in task.gold_actions if c.name.startswith("get_"))
        return gold[:1 + n_reads] + ["Sorry, I can't help with that request."]
    raise ValueError(f"kind must be hack | guess | refuse, got {kind!r}")
