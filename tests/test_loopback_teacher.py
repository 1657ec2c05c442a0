"""The loopback scripted teacher: every role answered from the request, malformed replies counted and survived."""
import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from agq_jax.envs import Task, replay_agent, run_episode, score
from agq_jax.envs.importers import load_demo_json, load_parquet
from data_synth.io_utils import read_jsonl
from data_synth.loopback_teacher import MALFORMED_KINDS, LoopbackTeacher, start_loopback_teacher
from data_synth.reasoning_problems import generate_seed_set
from data_synth.run import run_round

ROOT = Path(__file__).resolve().parents[1]
PERSONAS = "/work/shared/data/agenticqwen/persona_5K.jsonl"


def _config(tmp: Path, url: str, name: str):
    spec = importlib.util.spec_from_file_location("synth_tiny", ROOT / "configs" / "synth_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.name, c.runs_dir, c.progress = name, str(tmp / "runs"), False
    c.teachers = {"default": {"base_url": url, "model": "loopback", "backoff_s": 0.01, "timeout_s": 10,
                              "max_retries": 2}, "synthesizer": {}, "solver": {}}
    c.agentic.persona_path, c.agentic.num_personas, c.agentic.num_procedural = PERSONAS, 3, 0
    c.reasoning.num_procedural = 3
    return c


def _failures():
    return {"agentic": [], "reasoning": [p.model_dump() for p in generate_seed_set(3, 5, kinds=("arithmetic",))]}


def test_a_teacher_round_with_every_synthesis_role(tmp_path):
    with start_loopback_teacher() as srv:
        res = run_round(_config(tmp_path, srv.base_url, "clean"), 0, _failures())
        counts = dict(srv.loopback.counts)
    for role in ("blueprint", "expand", "backtranslate", "adversarial", "agent", "self_instruct", "persona", "solver"):
        assert counts.get(role, 0) > 0, (role, counts)
    assert not any(k.startswith("malformed") for k in counts)
    stages = {s["name"]: s for s in res.stages}
    assert stages["agentic/validate"]["rejected"] == 0 and res.n_agentic == stages["agentic/validate"]["inputs"] >= 10
    assert stages["reasoning/consistency"]["outputs"] == stages["reasoning/consistency"]["inputs"] > 0
    for row in read_jsonl(res.agentic_path):     # every synthesized task runs and its gold scores 1
        task = Task.model_validate(row)
        assert score(task, run_episode(task, replay_agent(task.gold_replies), user="scripted",
                                       tools="expected")).total == 1.0
        assert not any(t.name in task.system_prompt for t in task.tools)   # declarative policy
    # the round is also written in the release formats, and those rows import back
    back, issues = load_demo_json(os.path.join(res.round_dir, "agentic_reference.json"))
    assert len(back) == res.n_agentic and [i for i in issues if not i.kept] == []
    assert len(load_parquet(os.path.join(res.round_dir, "agentic.parquet"))[0]) == res.n_agentic


def test_malformed_replies_are_counted_and_the_round_survives(tmp_path):
    with start_loopback_teacher(malformed_rate=0.3, seed=1) as srv:
        res = run_round(_config(tmp_path, srv.base_url, "noisy"), 0, _failures())
        counts = dict(srv.loopback.counts)
    assert {k.split("/")[1] for k in counts if k.count("/") == 1} == set(MALFORMED_KINDS)
    stages = {s["name"]: s for s in res.stages}
    failures = {k for s in res.stages for k in s["failures"]}
    assert {"truncated", "schema", "non_json"} <= failures | {k.split(":")[-1] for k in failures}
    assert any("server_error" in (st["errors"] or {}) for st in res.teacher_stats.values())
    assert res.n_agentic > 0 and res.n_reasoning > 0 and stages["agentic/validate"]["outputs"] > 0
    manifest = json.loads(Path(res.manifest_path).read_text())
    assert manifest["counts"]["rejected"] == len(read_jsonl(os.path.join(res.round_dir, "rejections.jsonl")))


def test_spoiling_is_a_pure_function_of_the_request_history():
    bodies = [{"messages": [{"role": "user", "content": f"q{i % 5}"}], "seed": 0} for i in range(60)]
    a, b = LoopbackTeacher(malformed_rate=0.4, seed=3), LoopbackTeacher(malformed_rate=0.4, seed=3)
    assert [a(x) for x in bodies] == [b(x) for x in bodies]
    c = LoopbackTeacher(malformed_rate=0.4, seed=4)
    assert [c(x) for x in bodies] != [a(x) for x in bodies]
    assert 0 < sum(v for k, v in a.counts.items() if k.count("/") == 1) < 60
    with pytest.raises(ValueError, match="malformed_rate"):
        LoopbackTeacher(malformed_rate=1.5)


def test_cli_serves_until_killed():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "data_synth.loopback_teacher", "--port=0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        with urllib.request.urlopen(info["base_url"] + "/models", timeout=10) as r:
            assert json.loads(r.read())["data"][0]["id"] == "loopback-teacher"
    finally:
        proc.kill()
        proc.wait(timeout=10)
