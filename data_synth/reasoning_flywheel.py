"""The reasoning flywheel: seeds -> (failures of round r) -> variants -> consistency-filtered labels.

With a teacher: self-instruct variants (changed values, added constraints, multi-step or functional
forms) and persona-injected variants (the same mathematics in a physics / chemistry / finance ...
context) of every failed problem; each candidate is solved k times by the solver role(s) and kept only
when all k final answers agree (symbolically), the agreed answer becoming the label. Without a teacher:
failures are made harder procedurally. Seeds: a JSONL file and/or the procedural generator.
"""
from __future__ import annotations

import json
from typing import Any

import pydantic

from agq_jax.envs.answers import answers_equivalent, extract_final_answer, normalize_text
from agq_jax.envs.schema import stable_hash
from agq_jax.envs.reasoning_problems import (Difficulty, Lineage, ReasoningProblem, generate_seed_set, harder_variant,
                                           load_seed_problems, problem_id)
from data_synth.stages import Rejected, StageContext, StageStats, run_stage

SELF_INSTRUCT_SYSTEM = """You write new math/reasoning problems with verifiable answers, derived from a problem a \
student model failed. Make {n} variants that exercise the same skill: change the values, add a constraint, make it \
multi-step, or pose it in functional form. Each variant must have one exact final answer (a number, fraction or \
simple expression). Reply with JSON only: {{"variants": [{{"question": "...", "answer": "...", "change": "values|constraint|multi_step|functional"}}]}}"""

PERSONA_SYSTEM = """You rewrite a math/reasoning problem into the world of a persona, keeping the mathematics \
identical in structure but free to change the numbers: e.g. the same computation framed in physics, chemistry, \
finance or the persona's own work. The problem must be self-contained and have one exact final answer. Reply with \
JSON only: {"question": "...", "answer": "...", "context": "<the field you used>"}"""

SOLVER_SYSTEM = """Solve the problem. Reason step by step, then give only the final answer as \\boxed{...}."""

PROMPTS = {"reasoning/self_instruct": SELF_INSTRUCT_SYSTEM, "reasoning/persona": PERSONA_SYSTEM,
           "reasoning/solver": SOLVER_SYSTEM}


class _Variant(pydantic.BaseModel):
    question: str = pydantic.Field(min_length=15, max_length=4000)
    answer: str = pydantic.Field(min_length=1, max_length=200)
    change: str = ""


class _VariantList(pydantic.BaseModel):
    variants: list[_Variant] = pydantic.Field(min_length=1)


class _PersonaVariant(pydantic.BaseModel):
    question: str = pydantic.Field(min_length=15, max_length=4000)
    answer: str = pydantic.Field(min_length=1, max_length=200)
    context: str = ""


def _as_failed_problem(f: Any) -> ReasoningProblem:
    """A failure may be a problem dict, {"problem": {...}, ...}, or a ReasoningProblem."""
    if isinstance(f, ReasoningProblem):
        return f
    if isinstance(f, dict) and isinstance(f.get("problem"), dict):
        f = f["problem"]
    return ReasoningProblem.model_validate(f)


def _candidate(question: str, proposed: str, parent: ReasoningProblem, round_idx: int, stage: str, derivation: str,
               teacher: str | None, prompt_name: str, extra: dict | None = None) -> dict:
    return {"id": problem_id(question, "", [parent.id, derivation]), "question": question, "proposed_answer": proposed,
            "parent": parent.model_dump(), "round": round_idx, "stage": stage, "derivation": derivation,
            "teacher": teacher, "prompt_hash": stable_hash(PROMPTS[prompt_name]), "extra": extra or {}}


async def _self_instruct(item: dict, ctx: StageContext, *, n_variants: int, round_idx: int) -> list[dict]:
    p = ReasoningProblem.model_validate(item["problem"])
    msgs = [{"role": "system", "content": SELF_INSTRUCT_SYSTEM.format(n=n_variants)},
            {"role": "user", "content": f"Failed problem:\n{p.question}\n\nIts answer: {p.answer}"}]
    obj, res = await ctx.ask_json("synthesizer", msgs, _VariantList, prompt_name="reasoning/self_instruct")
    return [_candidate(v.question, v.answer, p, round_idx, "self_instruct", f"self_instruct:{v.change or 'values'}",
                       res.model, "reasoning/self_instruct") for v in obj.variants[:n_variants]]


async def _persona(item: dict, ctx: StageContext, *, round_idx: int) -> list[dict]:
    p = ReasoningProblem.model_validate(item["problem"])
    msgs = [{"role": "system", "content": PERSONA_SYSTEM},
            {"role": "user", "content": f"Persona: {item['persona']}\n\nProblem:\n{p.question}\n\nIts answer: {p.answer}"}]
    obj, res = await ctx.ask_json("synthesizer", msgs, _PersonaVariant, prompt_name="reasoning/persona")
    return [_candidate(obj.question, obj.answer, p, round_idx, "persona", "persona", res.model, "reasoning/persona",
                       {"persona": item["persona"], "context": obj.context})]


async def _consistency(item: dict, ctx: StageContext, *, k: int, solver_roles: list[str], round_idx: int) -> list[dict]:
    """k solutions (cycling over solver roles, distinct samples); keep only when all final answers agree."""
    if ctx.client is None:
        raise Rejected("no_teacher", "consistency filter needs solver teachers")
    answers, models = [], []
    msgs = [{"role": "system", "content": SOLVER_SYSTEM}, {"role": "user", "content": item["question"]}]
    for s in range(k):
        role = solver_roles[s % len(solver_roles)]
        ctx.attempts += 1
        try:
            res = await ctx.client.chat(role, msgs, sample=s)
        except Exception as e:  # noqa: BLE001 - TeacherError; one missing solution means no consensus
            ctx.failures["teacher_error"] += 1
            raise Rejected("teacher_error", f"solver {role}: {e}") from None
        ans = None if res.truncated else extract_final_answer(res.text)
        if not ans:
            ctx.failures["no_answer"] += 1
            raise Rejected("no_answer", f"solution {s} ({role}) has no final answer"
                           + (" (truncated)" if res.truncated else ""))
        answers.append(ans)
        models.append(res.model)
    if not all(answers_equivalent(a, answers[0]) for a in answers[1:]):
        raise Rejected("disagree", f"solutions disagree: {answers}")
    label = answers[0]
    parent = ReasoningProblem.model_validate(item["parent"])
    prob = ReasoningProblem(
        id=item["id"], question=item["question"], answer=label, source=f"synth/{item['stage']}", kind=parent.kind,
        difficulty=parent.difficulty, tools=["python"],
        lineage=Lineage(parents=[parent.id], round=round_idx, stage=item["stage"], derivation=item["derivation"],
                        teacher=item.get("teacher"), prompt_hash=item.get("prompt_hash")),
        consistency={"k": k, "answers": answers, "solvers": models, "proposed_answer": item.get("proposed_answer"),
                     "proposed_agrees": answers_equivalent(item.get("proposed_answer"), label)})
    return [prob.model_dump()]


async def _harder(item: dict, ctx: StageContext, *, round_idx: int, n: int) -> list[dict]:
    p = ReasoningProblem.model_validate(item["problem"])
    if p.kind not in ("arithmetic", "algebra", "multihop"):
        raise Rejected("not_procedural", f"problem {p.id} of kind {p.kind!r} has no procedural generator")
    return [harder_variant(p, round_idx=round_idx, salt=i).model_dump() for i in range(n)]


async def build_reasoning(cfg, round_idx: int, failures: list | None, client, stage_dir: str, progress: bool = True,
                          *, seed: int = 0, solver_roles=("solver",)):
    """Returns (problems, rejections, [StageStats]). `cfg` is the run config's `synth.reasoning`; `seed` the
    run's seed; `solver_roles` the teacher roles whose solutions must agree (teachers.solver_roles())."""
    stats: list[StageStats] = []
    rejections: list[dict] = []
    problems: list[dict] = []
    seed = int(seed) * 1000 + round_idx
    # ---- seeds (every round gets fresh procedural problems; file seeds only in round 0) --------------
    if round_idx == 0 and cfg.seed_path:
        seeds, bad = load_seed_problems(cfg.seed_path, round_idx=round_idx)
        problems += [p.model_dump() for p in seeds]
        rejections += [{"stage": "seed_file", "item": b["where"], "reason": b["reason"], "detail": b["detail"],
                        "failures": []} for b in bad]
        s = StageStats(name="reasoning/seed_file", inputs=len(seeds) + len(bad), processed=len(seeds) + len(bad),
                       outputs=len(seeds), rejected=len(bad))
        s.rejections.update(b["reason"] for b in bad)
        stats.append(s)
    n_proc = int(cfg.num_procedural if round_idx == 0 else cfg.fresh_procedural_per_round)
    if n_proc:
        dc = cfg.difficulty
        d = Difficulty(num_ops=dc.num_ops, max_operand=dc.max_operand, algebra_level=dc.algebra_level, hops=dc.hops,
                       distractors=dc.distractors)
        gen = [p.model_dump() for p in generate_seed_set(n_proc, seed, kinds=tuple(cfg.kinds), difficulty=d,
                                                         round_idx=round_idx)]
        problems += gen
        stats.append(StageStats(name="reasoning/procedural", inputs=n_proc, processed=n_proc, outputs=len(gen)))
    # ---- expansion from failures --------------------------------------------------------------------
    failed = []
    for i, f in enumerate(failures or []):
        try:
            failed.append(_as_failed_problem(f))
        except pydantic.ValidationError as e:
            rejections.append({"stage": "reasoning/failures", "item": f"failures[{i}]", "reason": "schema",
                               "detail": str(e.errors()[0]), "failures": []})
    failed = list({p.id: p for p in failed}.values())
    use_teacher = client is not None and client.has_role("synthesizer") and all(
        client.has_role(r) for r in solver_roles)
    procedural_failed = [p for p in failed if not use_teacher or p.kind == "multihop"]
    teacher_failed = [p for p in failed if use_teacher and p.kind != "multihop"]
    common = dict(stage_dir=stage_dir, client=client, concurrency=cfg.concurrency,
                  max_attempts=cfg.max_attempts, progress=progress)
    harder_n = cfg.harder_per_failure  # bound before the branches: whether a round has such failures is chance
    if procedural_failed:
        out, rej, st = await run_stage(
            "reasoning/harder", [{"id": p.id, "problem": p.model_dump()} for p in procedural_failed],
            lambda it, ctx: _harder(it, ctx, round_idx=round_idx, n=harder_n), **common)
        problems += out
        rejections += rej
        stats.append(st)
    if teacher_failed:
        items = [{"id": p.id, "problem": p.model_dump()} for p in teacher_failed]
        cands, rej, st = await run_stage(
            "reasoning/self_instruct", items,
            lambda it, ctx: _self_instruct(it, ctx, n_variants=int(cfg.variants_per_failure), round_idx=round_idx),
            **common)
        rejections += rej
        stats.append(st)
        from data_synth.personas import load_personas

        personas = [r["persona"] for r in load_personas(
            cfg.persona_path, len(teacher_failed) * int(cfg.personas_per_failure), seed)]
        pitems = []
        for i, p in enumerate(teacher_failed):
            for j in range(int(cfg.personas_per_failure)):
                persona = personas[(i * int(cfg.personas_per_failure) + j) % len(personas)]
                pitems.append({"id": f"{p.id}/persona{j}", "problem": p.model_dump(), "persona": persona})
        if pitems:
            pc, rej, st = await run_stage("reasoning/persona", pitems, lambda it, ctx: _persona(it, ctx,
                                                                                               round_idx=round_idx),
                                          **common)
            cands += pc
            rejections += rej
            stats.append(st)
        cands = list({c["id"]: c for c in cands}.values())
        out, rej, st = await run_stage(
            "reasoning/consistency", cands,
            lambda it, ctx: _consistency(it, ctx, k=int(cfg.k_solutions), solver_roles=list(solver_roles),
                                         round_idx=round_idx), **common)
        problems += out
        rejections += rej
        stats.append(st)
    # ---- de-duplicate by normalised question ---------------------------------------------------------
    seen, unique = set(), []
    dups = 0
    for p in problems:
        key = normalize_text(p["question"])
        if key in seen:
            dups += 1
            rejections.append({"stage": "reasoning/dedup", "item": p["id"], "reason": "duplicate",
                               "detail": "same question as an earlier item", "failures": []})
            continue
        seen.add(key)
        unique.append(p)
    s = StageStats(name="reasoning/dedup", inputs=len(problems), processed=len(problems), outputs=len(unique),
                   rejected=dups)
    if dups:
        s.rejections["duplicate"] = dups
    stats.append(s)
    return unique, rejections, stats
