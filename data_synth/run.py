"""One synthesis round: `python -m data_synth.run --config=configs/synth_tiny.py --round=R [--failures=F.jsonl]`.

Reads the same run config as the trainer (any configs/*.py: its `teachers`, `synth` and `data` sections)
and writes `<run_dir>/data/round_<r>/{agentic,reasoning}.jsonl` (the agentic tasks also as `agentic.parquet`
and `agentic_reference.json`, the release formats) and `manifest.json` (counts per stage,
rejection reasons, teacher models + prompt hashes, lineage of every item), atomically — exactly where the
trainer looks for round r. Stage checkpoints live in `round_<r>/stages/`, so a killed round resumes where it
stopped; with the teacher response cache the same inputs give the same dataset. The trainer calls
`run_round(rc, round_idx, failures, client)` with its own teacher client.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from data_synth import agentic_prompts
from data_synth.agentic_flywheel import build_agentic
from agq_jax.envs.schema import stable_hash
from data_synth.io_utils import atomic_write_json, atomic_write_jsonl, read_jsonl
from data_synth.reasoning_flywheel import PROMPTS as REASONING_PROMPTS, build_reasoning
from data_synth.teachers import TeacherClient, client_from_config


@dataclasses.dataclass
class RoundResult:
    round_dir: str
    agentic_path: str
    reasoning_path: str
    manifest_path: str
    n_agentic: int
    n_reasoning: int
    mode: str                      # "teacher" or "offline"
    stages: list[dict]
    top_rejections: list[tuple[str, int]]
    teacher_stats: dict
    wall_s: float

    def summary(self) -> str:
        return summary_table(self.stages, self.top_rejections, self)


def data_dir(rc) -> str:
    """Where a run's synthesized rounds and the teacher cache live: <run_dir>/data."""
    return os.path.join(rc.resolved_run_dir, "data")


def round_dir(rc, round_idx: int) -> str:
    return os.path.join(data_dir(rc), f"round_{round_idx}")


def _split_failures(failures) -> dict[str, list]:
    """failures: {"agentic": [...], "reasoning": [...]} or a flat list of rows tagged with "type"."""
    if failures is None:
        return {"agentic": [], "reasoning": []}
    if isinstance(failures, dict):
        return {"agentic": list(failures.get("agentic", [])), "reasoning": list(failures.get("reasoning", []))}
    out = {"agentic": [], "reasoning": []}
    for i, f in enumerate(failures):
        kind = f.get("type") if isinstance(f, dict) else None
        if kind not in out:
            raise ValueError(f"failures[{i}]: field 'type' must be 'agentic' or 'reasoning', got {kind!r}")
        out[kind].append(f)
    return out


def _lineage(agentic: list[dict], reasoning: list[dict]) -> dict:
    lin = {t["id"]: {"kind": "agentic", **{k: t["lineage"].get(k) for k in ("source_task_id", "parent_ids", "round",
                                                                              "method", "generator")},
                     "branch": t.get("branch", {}).get("branch_type")} for t in agentic}
    lin.update({p["id"]: {"kind": "reasoning", **p["lineage"]} for p in reasoning})
    return lin


async def _run(rc, round_idx: int, failures, client) -> tuple[list, list, list, list]:
    rdir = round_dir(rc, round_idx)
    stage_dir = os.path.join(rdir, "stages")
    fails = _split_failures(failures)
    agentic, a_rej, a_stats = ([], [], [])
    reasoning, r_rej, r_stats = ([], [], [])
    if rc.data.agentic_weight > 0:
        agentic, a_rej, a_stats = await build_agentic(rc.synth.agentic, round_idx, fails["agentic"], client, stage_dir,
                                                      progress=rc.verbose, seed=rc.seed, domains=rc.data.domains)
    if rc.data.reasoning_weight > 0:
        reasoning, r_rej, r_stats = await build_reasoning(rc.synth.reasoning, round_idx, fails["reasoning"], client,
                                                          stage_dir, progress=rc.verbose, seed=rc.seed,
                                                          solver_roles=rc.teachers.solver_roles())
    return agentic, reasoning, a_rej + r_rej, a_stats + r_stats


def teacher_client(rc) -> TeacherClient | None:
    """The run's teacher client (None offline), health-checked when teachers.check_health is on."""
    client = client_from_config(rc.teachers, cache_dir=os.path.join(data_dir(rc), "teacher_cache"))
    if client is not None and rc.teachers.check_health:
        try:
            client.check_health(timeout_s=rc.teachers.health_timeout_s)
        except BaseException:
            client.close()
            raise
    return client


def run_round(rc, round_idx: int, failures=None, client: TeacherClient | None = None) -> RoundResult:
    """Synthesize round `round_idx` of run config `rc`; `failures` are the policy's failed items of the
    previous round; `client` the caller's teacher client (default: one built from rc.teachers)."""
    t0 = time.perf_counter()
    rdir = round_dir(rc, round_idx)
    os.makedirs(rdir, exist_ok=True)
    own_client = client is None
    if own_client:
        client = teacher_client(rc)
    try:
        agentic, reasoning, rejections, stats = asyncio.run(_run(rc, round_idx, failures, client))
        teacher_stats = client.stats_dict() if client is not None else {}
        models = client.models() if client is not None else {}
        endpoints = client.endpoints_public() if client is not None else {}
    finally:
        if own_client and client is not None:
            client.close()
    ap, rp = os.path.join(rdir, "agentic.jsonl"), os.path.join(rdir, "reasoning.jsonl")
    atomic_write_jsonl(ap, agentic)
    export_release_formats(agentic, rdir)
    atomic_write_jsonl(rp, reasoning)
    atomic_write_jsonl(os.path.join(rdir, "rejections.jsonl"), rejections)
    reasons = collections.Counter(f"{r['stage']}:{r['reason']}" for r in rejections)
    stage_dicts = [s.as_dict() for s in stats]
    mode = "teacher" if client is not None else "offline"
    manifest = {
        "name": rc.name, "round": round_idx, "mode": mode,
        "counts": {"agentic": len(agentic), "reasoning": len(reasoning), "rejected": len(rejections)},
        "stages": stage_dicts, "rejection_reasons": dict(reasons.most_common()),
        "teachers": {"models": models, "endpoints": endpoints, "usage": teacher_stats},
        "prompt_hashes": {**agentic_prompts.prompt_hashes(),
                          **{k: stable_hash(v) for k, v in REASONING_PROMPTS.items()}},
        "config_hash": stable_hash({"synth": rc.synth.to_dict(), "seed": rc.seed, "data": rc.data.to_dict()}),
        "dataset_hashes": {"agentic": stable_hash(agentic), "reasoning": stable_hash(reasoning)},
        "n_failures_in": {k: len(v) for k, v in _split_failures(failures).items()},
        "lineage": _lineage(agentic, reasoning),
    }
    mp = os.path.join(rdir, "manifest.json")
    atomic_write_json(mp, manifest)
    res = RoundResult(round_dir=rdir, agentic_path=ap, reasoning_path=rp, manifest_path=mp, n_agentic=len(agentic),
                      n_reasoning=len(reasoning), mode=mode, stages=stage_dicts, top_rejections=reasons.most_common(8),
                      teacher_stats=teacher_stats, wall_s=round(time.perf_counter() - t0, 2))
    if rc.verbose:
        print(res.summary(), file=sys.stderr)
    return res


def export_release_formats(agentic: list[dict], rdir: str) -> None:
    """The round's agentic tasks also in the AgenticQwen release formats: the nine-column parquet (plus the full
    task column) and the reference's JSON layout, which its own converter reads."""
    from agq_jax.envs.importers import export_parquet, export_reference_json
    from agq_jax.envs.schema import Task

    tasks = [Task.model_validate(t) for t in agentic]
    export_parquet(tasks, os.path.join(rdir, "agentic.parquet"))
    export_reference_json(tasks, os.path.join(rdir, "agentic_reference.json"))


def summary_table(stages: list[dict], top: list[tuple[str, int]], res: RoundResult | None = None) -> str:
    rows = [f"{'stage':<28}{'in':>6}{'out':>6}{'rej':>6}{'resumed':>9}{'yield':>8}  top rejection"]
    for s in stages:
        top_r = max(s["rejections"].items(), key=lambda kv: kv[1]) if s["rejections"] else ("", 0)
        y = "-" if s["yield"] is None else f"{s['yield']:.2f}"
        rows.append(f"{s['name']:<28}{s['inputs']:>6}{s['outputs']:>6}{s['rejected']:>6}{s['resumed']:>9}{y:>8}  "
                    + (f"{top_r[0]} ({top_r[1]})" if top_r[1] else ""))
    if top:
        rows.append("top rejection reasons: " + ", ".join(f"{k} x{v}" for k, v in top))
    if res is not None:
        rows.append(f"round {os.path.basename(res.round_dir)} [{res.mode}]: {res.n_agentic} agentic tasks, "
                    f"{res.n_reasoning} reasoning problems survived -> {res.round_dir} ({res.wall_s}s)")
        for role, st in sorted(res.teacher_stats.items()):
            rows.append(f"  teacher {role}: {st['calls']} calls, {st['cache_hits']} cached, {st['requests']} sent, "
                        f"{st['prompt_tokens']}+{st['completion_tokens']} tokens, errors {st['errors'] or 0}")
    return "\n".join(rows)


def load_failures(path: str) -> list[dict]:
    return read_jsonl(path)


def main(argv):
    """CLI entry (flags are defined only when run as a script, so importing run_round defines none)."""
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/synth_tiny.py")
    from agq_jax.run_config import RunConfig

    failures = load_failures(FLAGS.failures) if FLAGS.failures else None
    res = run_round(RunConfig.from_configdict(FLAGS.config), FLAGS.round, failures)
    print(json.dumps({"round_dir": res.round_dir, "agentic": res.n_agentic, "reasoning": res.n_reasoning,
                      "mode": res.mode, "wall_s": res.wall_s}))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "a run config (configs/*.py[:LAYOUT])", lock_config=False)
    flags.DEFINE_integer("round", 0, "round index r")
    flags.DEFINE_string("failures", "", "JSONL of failed items of round r-1, each tagged type=agentic|reasoning")
    app.run(main)
