"""The loopback scripted teacher: every role answered from the request, malformed replies counted and survived."""
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
from agq_jax.envs.reasoning_problems import generate_seed_set
from agq_jax.envs.sources import PERSONAS, released_file
from data_synth.run import run_round

ROOT = Path(__file__).resolve().parents[1]


def _personas(tmp: Path) -> str:
    """The released personas when the shared data sits beside the repo, else three of our own."""
    shared = released_file(PERSONAS)
    if shared:
        return shared
    path = tmp / "personas.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "persona": p}) + "\n" for i, p in enumerate(
        ["A pharmacist who manages prescription refills.", "A travel agent who rebooks cancelled flights.",
         "A librarian who handles inter-library loans."])))
    return str(path)


def _config(tmp: Path, url: str, name: str):
    from agq_jax.run_config import RunConfig, load_configdict

    c = load_configdict(str(ROOT / "configs" / "synth_tiny.py"))
    c.name, c.run_dir, c.verbose = name, str(tmp / "runs" / name), False
    d = c.teachers.default
    d.base_url, d.model, d.backoff_s, d.timeout_s, d.max_retries = url, "loopback", 0.01, 10.0, 2
    for role in ("mock_user", "mock_tool", "judge"):
        c.teachers[role].base_url = c.teachers[role].model = ""
    a = c.synth.agentic
    a.persona_path, a.num_personas, a.num_procedural = _personas(tmp), 3, 0
    c.synth.reasoning.num_procedural = 3
    return RunConfig.from_configdict(c)


def _failures():
    return {"agentic": [], "reasoning": [p.model_dump() for p in generate_seed_set(3, 5, kinds=("arithmetic",))]}


def _paper_world_plays(tasks: list[Task], base_url: str) -> None:
    """Synthesized tasks in the paper's world (teacher user, tools and judge; reference protocol and gate): the
    gold path scores 1, refusing at once less, the hack path 0."""
    from agq_jax.envs import probes
    from agq_jax.envs.judge import JudgeCache
    from agq_jax.envs.world import TeacherChats, World, WorldSpec
    from data_synth.teachers import Endpoint, TeacherClient

    roles = ("mock_user", "mock_tool", "judge")
    ep = Endpoint(base_url=base_url, model="loopback", backoff_s=0.01, timeout_s=10)
    with TeacherClient({r: ep for r in roles}) as c:
        world = World(WorldSpec(user="teacher", tools="teacher", judge="teacher", protocol="reference",
                                gates=("no_forbidden", "tool_response", "clean_end")),
                      TeacherChats(*(c.as_callable(r) for r in roles)), JudgeCache())

        def play(task, replies):
            return probes.play(world.make_env(task), replies).reward()

        for t in tasks:
            gold = play(t, world.gold_replies(t))
            assert gold.total == 1.0 and gold.components["subgoal/judge"] == 1.0, (t.id, gold.components)
            assert play(t, probes.probe_replies(t, "refuse", "reference")).total < 1.0, t.id
            if t.expected_returns.hack_path and not t.branch.legal:
                assert play(t, probes.probe_replies(t, "hack", "reference")).total == 0.0, t.id
        assert all(c.stats_dict()[r]["calls"] > 0 for r in ("mock_user", "judge")), c.stats_dict()


def test_a_teacher_round_with_every_synthesis_role(tmp_path):
    with start_loopback_teacher() as srv:
        res = run_round(_config(tmp_path, srv.base_url, "clean"), 0, _failures())
        counts = dict(srv.loopback.counts)
        _paper_world_plays([Task.model_validate(row) for row in read_jsonl(res.agentic_path)], srv.base_url)
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
