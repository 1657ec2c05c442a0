"""Agentic flywheel end to end against a loopback OpenAI-compatible server replaying hand-written teacher
replies (tests/fixtures/teacher_replies/agentic_flow.json): good, malformed and adversarial replies."""
import json
import os
import shutil
from pathlib import Path

import pytest

from agq_jax.envs.rewards import score
from agq_jax.envs.runtime import make_env, replay_agent, run_episode
from agq_jax.envs.parsing import format_tool_call
from agq_jax.envs.schema import Task
from data_synth import agentic_flywheel
from data_synth.agentic_flywheel import hack_replies
from data_synth.io_utils import read_jsonl
from data_synth.replay_server import ReplayServer
from data_synth.run import run_round

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = str(ROOT / "tests" / "fixtures" / "teacher_replies" / "agentic_flow.json")
PERSONAS = ["A school basketball team captain who believes sports and their funding should be prioritized over "
            "student council campaigns",
            "A maternal health advocate focused on raising awareness about postpartum complications.",
            "A legal advisor who understands the legal implications of incomplete or inaccurate project documentation"]


def _tiny_config():
    from agq_jax.run_config import load_configdict

    return load_configdict(str(ROOT / "configs" / "synth_tiny.py"))


def make_config(tmp: Path, url: str, name: str = "t", **changes):
    """The synth_tiny run config with every teacher role on `url` and the fixture's personas; `changes`
    are dotted knobs ("synth.agentic.num_personas": 0)."""
    from agq_jax.run_config import RunConfig

    personas = tmp / "personas.jsonl"
    personas.write_text("".join(json.dumps({"persona": p, "id": f"p{i}"}) + "\n" for i, p in enumerate(PERSONAS)))
    c = _tiny_config()
    c.name, c.run_dir, c.verbose = name, str(tmp / "runs" / name), False
    d = c.teachers.default
    d.base_url, d.model, d.backoff_s, d.timeout_s, d.max_retries = url, "replay-teacher", 0.01, 10.0, 1
    for role in ("mock_user", "mock_tool", "judge"):  # roles this flow does not use: no endpoint
        c.teachers[role].base_url = c.teachers[role].model = ""
    a = c.synth.agentic
    a.persona_path, a.num_personas = str(personas), 3
    a.num_procedural, a.procedural_per_round, a.max_branches_per_tree = 0, 0, 6
    c.data.reasoning_weight = 0.0
    return RunConfig.from_configdict(c).replace(**changes)


@pytest.fixture(scope="module")
def round0(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agentic")
    srv = ReplayServer.from_files(FIXTURE).start()
    cfg = make_config(tmp, srv.base_url)
    res = run_round(cfg, 0)
    yield {"srv": srv, "cfg": cfg, "res": res, "tmp": tmp, "requests": srv.request_count(),
           "tasks": read_jsonl(res.agentic_path), "rejections": read_jsonl(os.path.join(res.round_dir, "rejections.jsonl")),
           "manifest": json.loads(Path(res.manifest_path).read_text())}
    srv.stop()


def test_survivors_and_rejection_reasons(round0):
    tasks, rej = round0["tasks"], round0["rejections"]
    assert sorted(t["branch"]["node_id"] for t in tasks) == ["declines", "free", "taken", "which_slot"]
    by_item = {r["item"]: r for r in rej}
    # malformed -> truncated -> refused: counted attempt by attempt, then dropped with the last reason
    assert by_item["persona/p1"]["failures"] == ["non_json", "truncated", "refused"]
    assert by_item["persona/p1"]["reason"] == "refused"
    assert by_item["persona/p2"]["failures"] == ["invalid", "invalid", "schema"]
    assert "domain" in by_item["persona/p2"]["detail"]
    assert by_item["persona/p0/bp/dispute"]["reason"] == "refused"
    # the adversarial user talked the teacher solver into the hack path: the task is not kept
    solver_failed = [r for r in rej if r["reason"] == "solver_failed"]
    assert len(solver_failed) == 1 and "book_slot" in solver_failed[0]["detail"]
    stages = {s["name"]: s for s in round0["manifest"]["stages"]}
    assert stages["agentic/expand"]["failures"] == {"invalid": 1}       # legal-only tree, then a good one
    assert stages["agentic/backtranslate"]["failures"] == {"non_json": 2, "invalid": 1, "truncated": 1, "refused": 1}
    assert stages["agentic/adversarial"]["failures"] == {"invalid": 1}  # reveal of an unknown fact key
    assert stages["agentic/validate"]["rejections"] == {"solver_failed": 1}


def test_tasks_are_valid_and_run_in_the_mock_world(round0):
    tasks = [Task.model_validate(t) for t in round0["tasks"]]
    assert {t.branch.branch_type for t in tasks} == {"legal", "refusal", "confirmation", "clarification"}
    for t in tasks:
        assert 3 <= len(t.tools) <= 5 and all(len(s.param_names) <= 3 for s in t.tools)
        assert t.behavior_tree.find(t.branch.node_id) is not None and t.behavior_tree.depth() >= 2
        assert t.metadata["validation"]["gold_reward"] == 1.0 and t.metadata["validation"]["solver_reward"] == 1.0
        for f in t.user.hidden_facts:
            assert f.value not in t.user_opening        # information-deficient opening
        env = make_env(t, user="scripted", tools="expected")
        msgs = env.reset()
        assert msgs[1]["content"] == t.user_opening and "# Tools" in msgs[0]["content"]
        rec = run_episode(t, replay_agent(t.gold_replies), user="scripted", tools="expected")
        assert score(t, rec).total == 1.0, t.id
    taken = next(t for t in tasks if t.branch.node_id == "taken")
    assert not taken.branch.legal and taken.rubric.forbidden_actions and taken.user.escape.steps
    hack = run_episode(taken, replay_agent(hack_replies(taken)), user="scripted", tools="expected")
    assert score(taken, hack).total == 0.0
    free = next(t for t in tasks if t.branch.node_id == "free")
    # acting without asking / confirming loses reward: the rubric is programmatic and partial
    careless = [format_tool_call("book_slot", {"slot_id": "S-101", "member_id": "M-12"}), "Done."]
    r = score(free, run_episode(free, replay_agent(careless), user="scripted", tools="expected"))
    assert 0.0 <= r.total < 1.0


def test_manifest_lineage_models_and_prompt_hashes(round0):
    m = round0["manifest"]
    assert m["mode"] == "teacher" and m["counts"]["agentic"] == 4
    assert m["teachers"]["models"] == {"synthesizer": "replay-teacher", "solver": "replay-teacher"}
    assert m["teachers"]["endpoints"]["solver"]["base_url"] == round0["srv"].base_url
    assert set(m["prompt_hashes"]) >= {"agentic/blueprint", "agentic/expand", "agentic/backtranslate",
                                       "agentic/adversarial", "agentic/failure"}
    for t in round0["tasks"]:
        lin = m["lineage"][t["id"]]
        assert lin["method"] == "synthesized" and lin["source_task_id"] == "persona/p0" and lin["round"] == 0
    assert m["teachers"]["usage"]["synthesizer"]["completion_tokens"] > 0
    assert "api_key" not in json.dumps(m).replace("api_key_env", "")


def test_rerun_from_cache_issues_zero_requests_and_same_dataset(round0):
    res, srv = round0["res"], round0["srv"]
    before = Path(res.agentic_path).read_text()
    shutil.rmtree(os.path.join(res.round_dir, "stages"))     # no checkpoints: only the response cache helps
    again = run_round(round0["cfg"], 0)
    assert srv.request_count() == round0["requests"]
    assert Path(again.agentic_path).read_text() == before
    assert all(u["requests"] == 0 for u in again.teacher_stats.values())


def test_killed_stage_resumes_to_the_same_dataset(round0, tmp_path, monkeypatch):
    with ReplayServer.from_files(FIXTURE) as srv:
        cfg = make_config(tmp_path, srv.base_url, name=round0["cfg"].name)
        real, calls = agentic_flywheel.stage_backtranslate, {"n": 0}

        async def killed_after_two(item, ctx, c):
            out = await real(item, ctx, c)
            calls["n"] += 1
            if calls["n"] == 3:   # the third finished item dies before its checkpoint line is written
                raise KeyboardInterrupt("simulated kill")
            return out

        monkeypatch.setattr(agentic_flywheel, "stage_backtranslate", killed_after_two)
        with pytest.raises(KeyboardInterrupt):
            run_round(cfg, 0)
        ckpt = os.path.join(tmp_path, "runs", cfg.name, "data", "round_0", "stages", "agentic",
                            "backtranslate.ckpt.jsonl")
        assert len(read_jsonl(ckpt, tolerate_truncated_tail=True)) == 2
        monkeypatch.setattr(agentic_flywheel, "stage_backtranslate", real)
        res = run_round(cfg, 0)
        assert next(s for s in res.stages if s["name"] == "agentic/blueprint")["resumed"] == 3
        assert Path(res.agentic_path).read_text() == Path(round0["res"].agentic_path).read_text()


def test_failure_expansion_grows_a_branch(round0, tmp_path):
    free = Task.model_validate(next(t for t in round0["tasks"] if t["branch"]["node_id"] == "free"))
    careless = [format_tool_call("book_slot", {"slot_id": "S-101", "member_id": "M-12"}), "Done."]
    rec = run_episode(free, replay_agent(careless), user="scripted", tools="expected")
    reward = score(free, rec).total
    assert reward < 1.0
    with ReplayServer.from_files(FIXTURE) as srv:
        cfg = make_config(tmp_path, srv.base_url, **{"synth.agentic.num_personas": 0})
        res = run_round(cfg, 1, failures={"agentic": [{"task": free.model_dump(mode="json"),
                                                        "episode": rec.to_dict(), "reward": reward}]})
    rows = read_jsonl(res.agentic_path)
    assert len(rows) == 1
    t = Task.model_validate(rows[0])
    assert t.lineage.method == "expanded_from_failure" and t.lineage.parent_ids == [free.id] and t.lineage.round == 1
    assert t.branch.node_id == "friend_booking" and t.behavior_tree.find("free") is not None
    assert t.metadata["failure_analysis"]["failure_type"] == "acted_without_verification"
    stage = next(s for s in res.stages if s["name"] == "agentic/failure_expansion")
    assert stage["failures"] == {"non_json": 1} and stage["outputs"] == 1
    assert score(t, run_episode(t, replay_agent(t.gold_replies), user="scripted", tools="expected")).total == 1.0


def test_offline_round_makes_failures_harder(tmp_path, round0):
    from agq_jax.run_config import RunConfig

    c = _tiny_config()
    c.name, c.run_dir, c.verbose = "off", str(tmp_path / "off"), False
    c.synth.agentic.num_procedural, c.data.reasoning_weight = 4, 0.0
    r0 = run_round(RunConfig.from_configdict(c), 0)
    tasks = [Task.model_validate(t) for t in read_jsonl(r0.agentic_path)]
    for t in tasks:   # procedural tasks come verified: gold replay scores 1 in the state-backed world
        assert score(t, run_episode(t, replay_agent(t.gold_replies), user="scripted")).total == 1.0
    synthesized = round0["tasks"][0]   # a teacher-made task has no procedural generator behind it
    c.synth.agentic.procedural_per_round = 0
    r1 = run_round(RunConfig.from_configdict(c), 1, failures=[{"type": "agentic", "task": tasks[0].model_dump(mode="json")},
                                   {"type": "agentic", "task": synthesized}])
    rows = [Task.model_validate(t) for t in read_jsonl(r1.agentic_path)]
    assert len(rows) == 1 and rows[0].lineage.method == "harder_variant"
    assert rows[0].lineage.parent_ids == [tasks[0].id] and rows[0].difficulty.level > tasks[0].difficulty.level
    assert r1.mode == "offline" and dict(r1.top_rejections) == {"agentic/harder:not_procedural": 1}
    # same inputs -> same dataset, from scratch in a fresh directory
    c.run_dir = str(tmp_path / "again")
    run_round(RunConfig.from_configdict(c), 0)
    again = run_round(RunConfig.from_configdict(c), 1, failures=[{"type": "agentic", "task": tasks[0].model_dump(mode="json")}])
    assert Path(again.agentic_path).read_text() == Path(r1.agentic_path).read_text()


def test_validation_with_teacher_simulated_user(round0):
    """Stage 5 with every party a teacher behind the same client: solver (replayed fixture) and mock user."""
    from data_synth.agentic_flywheel import solver_agent, validate_task_sync
    from data_synth.teachers import Endpoint, TeacherClient

    from agq_jax.envs.users import USER_SYSTEM

    def user_role(body):
        msgs = body["messages"]
        if msgs[0]["content"] != USER_SYSTEM:
            return None
        last = msgs[1]["content"].rsplit("Agent]: ", 1)[-1].lower()   # the agent's latest message
        if "member id" in last:
            return "<reply>My member id is M-12 and I'd like slot S-101.</reply>"
        if "go ahead" in last or "confirm" in last:
            return "<reply>Yes.</reply>"
        return "<reply>Thanks! ###STOP</reply>"

    free = next(t for t in round0["tasks"] if t["branch"]["node_id"] == "free")
    with ReplayServer.from_files(FIXTURE, responder=user_role) as srv:
        ep = Endpoint(base_url=srv.base_url, model="replay-teacher", backoff_s=0.01)
        with TeacherClient({"solver": ep, "mock_user": ep}) as c:
            out = validate_task_sync(free, solver=solver_agent(c, "solver"), user_chat=c.as_callable("mock_user"))
            sent = [r["body"]["messages"] for r in srv.requests if r["body"] and "[policy:free]" in
                    r["body"]["messages"][0]["content"]]
            assert all(m["role"] in ("system", "user", "assistant") for msgs in sent for m in msgs)
            assert any("<tool_response>" in m["content"] for msgs in sent for m in msgs)
            assert c.stats_dict()["mock_user"]["calls"] == 3
    assert out["metadata"]["validation"]["solver_reward"] == 1.0


def test_offline_fresh_control_matches_count_and_difficulty_not_the_failures(tmp_path):
    """expansion="fresh" (the flywheel's control in benchmarks/bench_learning.py): as many tasks as failures, at
    the difficulty of their harder variants, but fresh procedural tasks of random domain / branch type."""
    from agq_jax.envs.worlds.generator import generate_task
    fails = [generate_task("retail", "clarification", seed=s) for s in range(8)]
    rows = [{"type": "agentic", "task": t.model_dump(mode="json")} for t in fails]
    out = {}
    from agq_jax.run_config import RunConfig

    for mode in ("harder", "fresh"):
        c = _tiny_config()
        c.name, c.run_dir, c.verbose = mode, str(tmp_path / mode), False
        c.synth.agentic.num_procedural, c.synth.agentic.procedural_per_round, c.data.reasoning_weight = 0, 0, 0.0
        c.synth.agentic.expansion = mode
        rc = RunConfig.from_configdict(c)
        out[mode] = [Task.model_validate(t) for t in read_jsonl(run_round(rc, 1, failures=rows).agentic_path)]
    harder, fresh = out["harder"], out["fresh"]
    assert len(harder) == len(fresh) == len(fails)
    key = lambda t: (t.difficulty.level, t.difficulty.n_distractors, t.difficulty.adversarial_pressure)  # noqa: E731
    assert sorted(map(key, fresh)) == sorted(map(key, harder)) and all(t.difficulty.level == 1 for t in fresh)
    assert all(t.branch.branch_type == "clarification" and t.domain == "retail" for t in harder)
    assert len({(t.domain, t.branch.branch_type) for t in fresh}) > 2          # not the failures' branch
    fail_ids = {t.id for t in fails}
    assert all(set(t.lineage.parent_ids).isdisjoint(fail_ids) and t.lineage.method == "fresh_control" for t in fresh)
    for t in fresh:   # verified like every procedural task
        assert score(t, run_episode(t, replay_agent(t.gold_replies), user="scripted")).total == 1.0
    c.synth.agentic.expansion = "sideways"
    with pytest.raises(ValueError, match="synth.agentic.expansion"):
        RunConfig.from_configdict(c)
