"""The agentic flywheel stages: persona -> blueprint -> expanded tree -> branch tasks -> adversarial users ->
validation in the mock world, plus expansion from the policy's failed episodes of the previous round.

With no synthesizer teacher the round is offline: tasks come from the procedural world generator and
failures are replaced by procedurally harder variants. Every stage runs through `stages.run_stage`
(checkpointed, resumable, rejections with reasons).
"""
from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from agq_jax.envs.rewards import score
from agq_jax.envs.runtime import EpisodeRecord, replay_agent, run_episode, to_text_mode
from agq_jax.envs.schema import BehaviorTree, Task, canonical_json, stable_hash
from agq_jax.envs.parsing import format_tool_call
from data_synth import agentic_prompts as P
from data_synth.agentic import (AdversaryOut, BlueprintOut, DraftOut, ExpandOut, FailureOut, assemble_task,
                                balanced_branches, check_adversary, check_blueprint, check_draft, check_expanded,
                                graft_branch)
from data_synth.stages import Rejected, StageContext, StageStats, run_stage


def _teachers(client) -> dict:
    """Role -> model name (no URLs: the same teacher served elsewhere gives the same dataset)."""
    return client.models() if client is not None else {}


def load_seed_items(cfg, round_idx: int, seed: int) -> list[dict]:
    """Stage-1 inputs: `num_personas` personas sampled deterministically (data_synth.personas: the configured
    JSONL, or the built-in set), plus seed linear workflows."""
    from data_synth.personas import load_personas

    items = [{"id": f"persona/{r['id']}", "persona": r["persona"]}
             for r in load_personas(cfg.persona_path, int(cfg.num_personas), int(seed) * 7919 + round_idx)]
    if cfg.workflow_path:
        with open(cfg.workflow_path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    r = json.loads(line)
                    items.append({"id": f"workflow/{r.get('id', ln)}", "workflow": r["workflow"]})
    return items


# ------------------------------------------------------------------------------------------------ stages
async def stage_blueprint(item: dict, ctx: StageContext, cfg) -> list[dict]:
    seed = (f"Persona: {item['persona']}" if "persona" in item else f"Seed workflow: {item['workflow']}")
    msgs = [{"role": "system", "content": P.BLUEPRINT_SYSTEM}, {"role": "user", "content": seed}]
    bp, res = await ctx.ask_json("synthesizer", msgs, BlueprintOut, check=lambda b: check_blueprint(b, cfg),
                                 prompt_name="agentic/blueprint")
    return [{"id": f"{item['id']}/bp", "source": item["id"], "persona": item.get("persona", ""),
             "blueprint": bp.model_dump(exclude_none=True)}]


async def stage_expand(item: dict, ctx: StageContext, cfg) -> list[dict]:
    bp = BlueprintOut.model_validate(item["blueprint"])
    system = (P.EXPAND_SYSTEM.replace("<<MIN_TYPES>>", str(int(cfg.min_branch_types)))
              .replace("<<MIN_CASES>>", str(int(cfg.min_cases_per_side))))
    msgs = [{"role": "system", "content": system},
            {"role": "user", "content": json.dumps({"scenario": bp.scenario, "policy": bp.policy,
                                                    "tools": [t.model_dump() for t in bp.tools],
                                                    "initial_state": bp.initial_state,
                                                    "behavior_tree": bp.behavior_tree.model_dump(exclude_none=True)},
                                                   ensure_ascii=False)}]
    out, _ = await ctx.ask_json("synthesizer", msgs, ExpandOut, prompt_name="agentic/expand",
                                check=lambda e: check_expanded(bp.behavior_tree, e.behavior_tree, bp.tools,
                                                               int(cfg.min_branch_types), int(cfg.min_cases_per_side)))
    tree = out.behavior_tree
    nodes = balanced_branches(tree, int(cfg.max_branches_per_tree))
    base = {k: v for k, v in item.items() if k != "id"}
    base["tree"] = tree.model_dump(exclude_none=True)
    return [{**base, "id": f"{item['id']}/{n.id}", "node_id": n.id, "branch_type": n.branch_type} for n in nodes]


async def stage_backtranslate(item: dict, ctx: StageContext, cfg) -> list[dict]:
    bp = BlueprintOut.model_validate(item["blueprint"])
    tree = BehaviorTree.model_validate(item["tree"])
    path = [n.model_dump(exclude={"children"}, exclude_none=True) for n in tree.path_to(item["node_id"])]
    msgs = [{"role": "system", "content": P.BACKTRANSLATE_SYSTEM},
            {"role": "user", "content": (f"Branch node: {item['node_id']} ({item['branch_type']})\n"
                                         f"Path from the root: {json.dumps(path, ensure_ascii=False)}\n"
                                         f"Policy: {bp.policy}\nTools: "
                                         f"{json.dumps([t.model_dump() for t in bp.tools], ensure_ascii=False)}\n"
                                         f"Initial state: {json.dumps(bp.initial_state, ensure_ascii=False)}")}]
    d, _ = await ctx.ask_json("synthesizer", msgs, DraftOut, prompt_name="agentic/backtranslate",
                              check=lambda d: check_draft(d, bp.tools, item["branch_type"]))
    return [{**item, "draft": d.model_dump()}]


async def stage_adversarial(item: dict, ctx: StageContext, cfg) -> list[dict]:
    d = DraftOut.model_validate(item["draft"])
    legal = item["branch_type"] not in ("refusal", "transfer")
    if not d.hack_path:
        return [{**item, "adversary": None}]   # nothing to push towards: no teacher call
    bp = BlueprintOut.model_validate(item["blueprint"])
    msgs = [{"role": "system", "content": P.ADVERSARIAL_SYSTEM},
            {"role": "user", "content": json.dumps({"user_request": d.user_request, "agent_sop": d.agent_sop,
                                                    "test_policy": d.test_policy, "legal": legal,
                                                    "hidden_facts": [f.model_dump() for f in d.hidden_facts],
                                                    "hack_path": [s.model_dump() for s in d.hack_path]},
                                                   ensure_ascii=False)}]
    a, _ = await ctx.ask_json("synthesizer", msgs, AdversaryOut, prompt_name="agentic/adversarial",
                              check=lambda a: check_adversary(a, d, bp.tools, legal))
    return [{**item, "adversary": a.model_dump()}]


def _assemble(item: dict, round_idx: int, client, method: str = "synthesized", parents=()) -> dict:
    try:
        task = assemble_task(
            blueprint=item["blueprint"], tree=BehaviorTree.model_validate(item["tree"]), node_id=item["node_id"],
            branch_type=item["branch_type"], draft=DraftOut.model_validate(item["draft"]),
            adversary=AdversaryOut.model_validate(item["adversary"]) if item.get("adversary") else None,
            round_idx=round_idx, method=method, parents=list(parents), source=item.get("source", item["id"]),
            prompt_hashes=P.prompt_hashes(), teachers=_teachers(client), persona=item.get("persona", ""))
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        raise Rejected("assemble", str(e)[:300]) from None
    return task.model_dump(mode="json")


async def stage_failure(item: dict, ctx: StageContext, cfg, round_idx: int) -> list[dict]:
    """Teacher analyses a failed episode and grows a branch + task where the policy went wrong."""
    task = Task.model_validate(item["task"])
    ep = item.get("episode") or {}
    transcript = json.dumps(ep.get("messages", [])[1:], ensure_ascii=False)[-8000:]
    msgs = [{"role": "system", "content": P.FAILURE_SYSTEM},
            {"role": "user", "content": (f"Task id: {task.id}\nPolicy (SOP): {task.system_prompt}\n"
                                         f"Tools: {json.dumps(task.openai_tools(), ensure_ascii=False)}\n"
                                         f"Behavior tree: {json.dumps(task.behavior_tree.model_dump(exclude_none=True) if task.behavior_tree else None)}\n"
                                         f"Branch exercised: {task.branch.model_dump()}\n"
                                         f"Reward: {item.get('reward')}\nFailed episode: {transcript}")}]

    def check(f: FailureOut) -> None:
        bt = f.new_branch.get("branch_type") or "legal"
        check_draft(f.task, task.tools, bt)
        check_adversary(AdversaryOut(escape_strategy=f.escape_strategy, persuasion_facts=f.persuasion_facts), f.task,
                        task.tools, legal=bt not in ("refusal", "transfer"))
        graft_branch(task.behavior_tree, f.parent_node_id, f.new_branch)

    f, _ = await ctx.ask_json("synthesizer", msgs, FailureOut, check=check, prompt_name="agentic/failure")
    tree, node_id = graft_branch(task.behavior_tree, f.parent_node_id, f.new_branch)
    bp = {"domain": task.domain.split("/")[-1].replace("-", "_") or "domain", "scenario": f.analysis,
          "tools": [t.model_dump() for t in task.tools]}
    adv = AdversaryOut(escape_strategy=f.escape_strategy, persuasion_facts=f.persuasion_facts)
    row = {"id": item["id"], "blueprint": bp, "tree": tree.model_dump(exclude_none=True), "node_id": node_id,
           "branch_type": f.new_branch.get("branch_type") or "legal", "draft": f.task.model_dump(),
           "adversary": adv.model_dump(), "source": task.id}
    out = _assemble(row, round_idx, ctx.client, method="expanded_from_failure", parents=[task.id])
    out["metadata"]["failure_analysis"] = {"analysis": f.analysis, "failure_type": f.failure_type}
    return [out]


# ------------------------------------------------------------------------------------------ validation
def follows_branch(task: Task, rec: EpisodeRecord) -> tuple[bool, str]:
    kinds = {t.name: t.kind for t in task.tools}
    writes = sorted(canonical_json([c["name"], c["arguments"]]) for c in rec.tool_calls
                    if c.get("error") is None and kinds.get(c["name"]) == "write")
    want = sorted(canonical_json([s.tool_name, s.input]) for s in task.expected_returns.normal_path
                  if kinds.get(s.tool_name) == "write")
    bt = task.branch.branch_type
    if bt == "transfer" and not rec.transferred:
        return False, "did not transfer"
    if bt != "transfer" and rec.transferred:
        return False, "transferred on a non-transfer branch"
    if writes != want:
        return False, f"writes {writes} != normal-path writes {want}"
    return True, ""


def hack_replies(task: Task) -> list[str]:
    asked = [f for f in task.user.hidden_facts if not f.persuasion]
    head = ([f"Could you please tell me: {', '.join(f.ask_keywords[0] for f in asked)}?"] if asked else [])
    return head + [format_tool_call(s.tool_name, s.input) for s in task.expected_returns.hack_path] + ["Done."]


def validate_task_sync(task_row: dict, solver=None, user_chat=None, tool_chat=None) -> dict:
    """Gold replay must score 1 and the hack path < 1; then the teacher solver (if any) must succeed on-branch."""
    task = Task.model_validate(task_row)
    rec = run_episode(task, replay_agent(task.gold_replies), user="scripted", tools="expected")
    gold = score(task, rec)
    if not gold.success:
        failed = {k: v for k, v in gold.components.items() if k.startswith("subgoal/") and v < 1}
        raise Rejected("gold_unsolvable", f"gold replay scored {gold.total:.2f}; failed {failed}; gates {gold.gates}")
    if task.expected_returns.hack_path and not task.branch.legal:
        hrec = run_episode(task, replay_agent(hack_replies(task)), user="scripted", tools="expected")
        if score(task, hrec).success:
            raise Rejected("hack_not_penalised", "replaying the hack path still scores full reward")
    info: dict[str, Any] = {"gold_reward": gold.total}
    if solver is not None:
        srec = run_episode(task, solver, user="teacher" if user_chat else "scripted",
                           tools="teacher" if tool_chat else "expected", user_chat=user_chat, tool_chat=tool_chat)
        if srec.error and "TeacherError" in srec.error:   # an outage is not the task's fault: say so
            raise Rejected("teacher_error", srec.error[:300])
        r = score(task, srec)
        on_branch, why = follows_branch(task, srec)
        if not r.success:
            raise Rejected("solver_failed", f"teacher solver scored {r.total:.2f} ({srec.termination}); {why}")
        if not on_branch:
            raise Rejected("off_branch", why)
        info.update(solver_reward=r.total, solver_turns=srec.agent_turns)
    out = dict(task_row)
    out["metadata"] = {**task_row.get("metadata", {}), "validation": info}
    return out


def solver_agent(client, role: str):
    """A teacher as the agent of a mock-world episode: the transcript goes out in text mode (tool calls in the
    assistant text, tool results as <tool_response> user turns), as a plain chat endpoint expects."""
    chat = client.as_callable(role)
    return lambda messages: chat(to_text_mode(messages))


async def stage_validate(item: dict, ctx: StageContext, cfg) -> list[dict]:
    client = ctx.client
    solver = user_chat = tool_chat = None
    if client is not None and cfg.validate_with_teacher and client.has_role("solver"):
        solver = solver_agent(client, "solver")
        if cfg.validation_user == "teacher" and client.has_role("mock_user"):
            user_chat = client.as_callable("mock_user")
        if cfg.validation_tools == "teacher" and client.has_role("mock_tool"):
            tool_chat = client.as_callable("mock_tool")
    ctx.attempts += 1
    return [await asyncio.to_thread(validate_task_sync, item["task"], solver, user_chat, tool_chat)]


# --------------------------------------------------------------------------------------------- offline
def _procedural(cfg, round_idx: int, n: int, seed: int, domains) -> list[dict]:
    from agq_jax.envs.worlds.generator import Knobs, generate_tasks
    tasks = generate_tasks(n, seed=int(seed) * 1000 + round_idx, domains=list(domains) or None,
                           knobs=Knobs(level=int(cfg.level)))
    out = []
    for t in tasks:
        t.lineage.round = round_idx
        out.append(t.model_dump(mode="json"))
    return out


async def stage_harder(item: dict, ctx: StageContext, round_idx: int) -> list[dict]:
    from agq_jax.envs.worlds.generator import harder_variant
    task = Task.model_validate(item["task"])
    if not task.metadata.get("gen"):
        raise Rejected("not_procedural", f"task {task.id} has no procedural generator metadata")
    t = harder_variant(task, step=1, seed=int(stable_hash([task.id, round_idx], n=8), 16))
    t.lineage.round = round_idx
    return [t.model_dump(mode="json")]


async def stage_fresh(item: dict, ctx: StageContext, round_idx: int, domains: tuple) -> list[dict]:
    """The control of the flywheel (`expansion="fresh"`): for each failed task, a fresh procedural task of the
    same difficulty as its harder variant (same knobs, one level up) but of a domain and branch type drawn
    at random, unrelated to the failure — same count, same level, no targeting."""
    from agq_jax.envs.worlds.generator import BRANCH_TYPES, Knobs, all_domains, generate_task, harder_variant
    task = Task.model_validate(item["task"])
    gen = task.metadata.get("gen")
    if not gen:
        raise Rejected("not_procedural", f"task {task.id} has no procedural generator metadata")
    seed = int(stable_hash(["fresh", task.id, round_idx], n=8), 16)
    rng = random.Random(seed)
    src = generate_task(rng.choice(sorted(domains) or all_domains()), rng.choice(BRANCH_TYPES), seed,
                        Knobs(**gen["knobs"]), gen["split"])
    t = harder_variant(src, step=1, seed=seed + 1)
    t.lineage.round, t.lineage.method = round_idx, "fresh_control"
    return [t.model_dump(mode="json")]


# ------------------------------------------------------------------------------------------------ build
def _failure_items(failures: list | None) -> tuple[list[dict], list[dict]]:
    items, bad = [], []
    for i, f in enumerate(failures or []):
        try:
            task = Task.model_validate(f["task"] if isinstance(f, dict) and "task" in f else f)
        except (ValueError, TypeError) as e:
            bad.append({"stage": "agentic/failures", "item": f"failures[{i}]", "reason": "schema",
                        "detail": str(e)[:300], "failures": []})
            continue
        ep = f.get("episode") if isinstance(f, dict) else None
        items.append({"id": f"fail/{task.id}/{stable_hash(ep or i, n=8)}", "task": task.model_dump(mode="json"),
                      "episode": ep, "reward": f.get("reward") if isinstance(f, dict) else None})
    return items, bad


async def build_agentic(cfg, round_idx: int, failures: list | None, client, stage_dir: str, progress: bool = True,
                        *, seed: int = 0, domains=()):
    """Returns (tasks as JSON dicts, rejections, [StageStats]). `cfg` is the run config's `synth.agentic`;
    `seed` the run's seed, `domains` the procedural domains trained (() = all)."""
    stats: list[StageStats] = []
    rejections: list[dict] = []
    tasks: list[dict] = []
    common = dict(stage_dir=stage_dir, client=client, concurrency=int(cfg.concurrency),
                  max_attempts=int(cfg.max_attempts), progress=progress)
    teacher = client is not None and client.has_role("synthesizer")
    fail_items, bad = _failure_items(failures)
    rejections += bad
    n_proc = int(cfg.num_procedural if round_idx == 0 else cfg.procedural_per_round)
    if n_proc:
        gen = _procedural(cfg, round_idx, n_proc, seed, domains)
        tasks += gen
        stats.append(StageStats(name="agentic/procedural", inputs=n_proc, processed=n_proc, outputs=len(gen)))
    if not teacher:
        if fail_items:
            if cfg.expansion == "harder":
                name, fn = "agentic/harder", lambda it, ctx: stage_harder(it, ctx, round_idx)
            else:  # "fresh" (validated by the run config)
                doms = tuple(domains or ())
                name, fn = "agentic/fresh_control", lambda it, ctx: stage_fresh(it, ctx, round_idx, doms)
            out, rej, st = await run_stage(name, fail_items, fn, **common)
            tasks += out
            rejections += rej
            stats.append(st)
        return _dedup(tasks, rejections, stats)
    synthesized: list[dict] = []
    seeds = load_seed_items(cfg, round_idx, seed)
    if seeds:
        pipeline = [("agentic/blueprint", stage_blueprint), ("agentic/expand", stage_expand),
                    ("agentic/backtranslate", stage_backtranslate), ("agentic/adversarial", stage_adversarial)]
        items = seeds
        for name, fn in pipeline:
            items, rej, st = await run_stage(name, items, lambda it, ctx, fn=fn: fn(it, ctx, cfg), **common)
            rejections += rej
            stats.append(st)

        async def assemble(it, ctx):
            return [_assemble(it, round_idx, client)]
        synthesized, rej, st = await run_stage("agentic/assemble", items, assemble, **common)
        rejections += rej
        stats.append(st)
    if fail_items:
        out, rej, st = await run_stage("agentic/failure_expansion", fail_items,
                                       lambda it, ctx: stage_failure(it, ctx, cfg, round_idx), **common)
        synthesized += out
        rejections += rej
        stats.append(st)
    if synthesized:
        vitems = [{"id": t["id"], "task": t} for t in {t["id"]: t for t in synthesized}.values()]
        out, rej, st = await run_stage("agentic/validate", vitems, lambda it, ctx: stage_validate(it, ctx, cfg),
                                       **{**common, "concurrency": int(cfg.validate_concurrency)})
        tasks += out
        rejections += rej
        stats.append(st)
    return _dedup(tasks, rejections, stats)


def _dedup(tasks, rejections, stats):
    seen, unique = set(), []
    for t in tasks:
        if t["id"] in seen:
            rejections.append({"stage": "agentic/dedup", "item": t["id"], "reason": "duplicate",
                               "detail": "same task id as an earlier item", "failures": []})
            continue
        seen.add(t["id"])
        unique.append(t)
    s = StageStats(name="agentic/dedup", inputs=len(tasks), processed=len(tasks), outputs=len(unique),
                   rejected=len(tasks) - len(unique))
    if len(tasks) > len(unique):
        s.rejections["duplicate"] = len(tasks) - len(unique)
    stats.append(s)
    return unique, rejections, stats


__all__ = ["build_agentic", "validate_task_sync", "follows_branch", "hack_replies"]
