"""Worlds chosen per config (scripted / teacher user, state / expected / teacher tools, no / teacher judge, plain /
reference protocol) on every task source, with the loopback teacher as mock user, mock tool and judge."""
from pathlib import Path

import pytest

from agq_jax.envs import probes
from agq_jax.envs.importers import export_parquet, export_reference_json
from agq_jax.envs.judge import JudgeCache
from agq_jax.envs.sources import heldout_split, load_task_files
from agq_jax.envs.tools import SharedToolCache, StateToolBackend, TeacherToolBackend
from agq_jax.envs.users import ScriptedUser, TeacherUser
from agq_jax.envs.world import TeacherChats, World, WorldSpec
from agq_jax.envs.worlds.generator import generate_tasks
from data_synth.loopback_teacher import start_loopback_teacher
from data_synth.teachers import Endpoint, TeacherClient


ROOT = Path(__file__).resolve().parents[1]
FULL_SIZE = ("0_6b", "8b", "30b_a3b", "235b_a22b")


@pytest.fixture(scope="module")
def client():
    with start_loopback_teacher() as srv:
        ep = Endpoint(base_url=srv.base_url, model="loopback", backoff_s=0.01, timeout_s=10)
        with TeacherClient({r: ep for r in ("mock_user", "mock_tool", "judge")}) as c:
            yield c, srv


@pytest.fixture(scope="module")
def chats(client):
    c, srv = client
    return TeacherChats(*(c.as_callable(r) for r in ("mock_user", "mock_tool", "judge"))), srv


def _play(world, task, replies):
    return probes.play(world.make_env(task, tool_cache=SharedToolCache()), replies)


def test_spec_and_teachers_are_checked():
    with pytest.raises(ValueError, match="world judge='maybe'"):
        WorldSpec(judge="maybe")
    with pytest.raises(ValueError, match="gates"):
        WorldSpec(gates=("nope",))
    with pytest.raises(ValueError, match="needs a mock_tool teacher"):
        World(WorldSpec(tools="teacher"))


@pytest.mark.parametrize("protocol", ["plain", "reference"])
def test_paper_world_on_procedural_and_imported_tasks(chats, protocol, demo_path):
    c, srv = chats
    world = World(WorldSpec(user="teacher", tools="teacher", judge="teacher", protocol=protocol), c, JudgeCache())
    demo, _ = load_task_files([demo_path])
    tasks = generate_tasks(10, seed=21) + demo[:10]
    before = dict(srv.loopback.counts)
    for t in tasks:
        env = _play(world, t, world.gold_replies(t))
        r = env.reward()
        assert r.total == 1.0, (t.id, env.record.termination, r.components)
        assert r.components["subgoal/judge"] == 1.0
        hack = probes.probe_replies(t, "hack", protocol) if t.expected_returns.hack_path and not t.branch.legal else None
        if hack:
            assert _play(world, t, hack).reward().total == 0.0, t.id
        refuse = _play(world, t, probes.probe_replies(t, "refuse", protocol)).reward()
        assert refuse.total < 1.0, t.id
    grew = {k: srv.loopback.counts[k] - before.get(k, 0) for k in ("mock_user", "mock_tool", "judge")}
    assert all(v > 0 for v in grew.values()), grew


def test_scripted_world_keeps_working_offline():
    world = World(WorldSpec(protocol="plain"))
    for t in generate_tasks(10, seed=22):
        assert _play(world, t, world.gold_replies(t)).reward().total == 1.0


def test_offline_world_plays_the_demo_tasks(demo_path):
    ref = World(WorldSpec(protocol="reference", tools="expected"))
    demo, _ = load_task_files([demo_path])
    for t in demo[:20]:
        assert _play(ref, t, ref.gold_replies(t)).reward().total == 1.0


def test_task_files_and_heldout_split(tmp_path, demo_path):
    demo, issues = load_task_files([demo_path])
    extra = generate_tasks(6, seed=1)
    export_reference_json(extra, str(tmp_path / "more.json"))
    both, issues2 = load_task_files([demo_path, str(tmp_path / "more.json"), demo_path])
    assert len(both) == 106 and sum(i.field == "id" for i in issues2) == 100     # the repeated file is named
    train, held = heldout_split(both, 0.2, seed=0)
    assert len(train) + len(held) == 106 and 10 <= len(held) <= 35
    assert heldout_split(list(reversed(both)), 0.2, seed=0)[1] == list(reversed(held))   # order-independent
    with pytest.raises(ValueError, match="expected one of"):
        load_task_files([str(tmp_path / "x.csv")])
    # the nine-column parquet of the full release is a task source too: the same tasks and issues
    export_parquet(demo, str(tmp_path / "release.parquet"), full=False)
    assert load_task_files([str(tmp_path / "release.parquet")]) == (demo, issues)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_configs_train_and_evaluate_in_the_papers_world(client, name, demo_path):
    """What the shipped full-size configs build through the driver: teacher user, teacher tools and the rubric
    judge under the reference protocol and gate, on the released tasks (a tenth held out for evaluation)."""
    from agq_jax.driver import data as D
    from agq_jax.run_config import load

    c, srv = client
    rc = load(str(ROOT / "configs" / f"{name}.py"))
    world = D.make_world(rc.env, c)
    train, held = D.task_file_items(rc, heldout=False), D.task_file_items(rc, heldout=True)
    assert len(train) + len(held) == 100 and 3 <= len(held) <= 20
    assert sum(bool(it.gold) for it in train) == len(train)          # every training task's gold replays to 1.0
    item = next(it for it in train if it.obj.expected_returns.hack_path)
    env = D.make_env(item, world)
    msgs = env.reset()
    assert isinstance(env.user, TeacherUser) and isinstance(env.backend, TeacherToolBackend)
    assert env.backend.chat is not None and env.judge is not None
    assert "<policy>" in msgs[0]["content"] and "/no_think" in msgs[-1]["content"]
    before = srv.loopback.counts["judge"]
    env.step("<answer>I'm sorry, I cannot help with that.</answer>")          # refuse at once: no lookup
    assert env.done and D.score_env(env)[0] == 0.0                      # the reference gate: no tool response
    env = D.make_env(item, world)
    env.reset()
    for reply in item.gold:
        if env.step(reply).done:
            break
    assert D.score_env(env)[0] == 1.0 and srv.loopback.counts["judge"] > before   # judged by the teacher


def test_offline_configs_keep_the_scripted_world(client):
    """configs/tiny.py (the offline demo) builds the scripted world even when a teacher client is at hand."""
    from agq_jax.driver import data as D
    from agq_jax.run_config import load

    c, _ = client
    rc = load(str(ROOT / "configs" / "tiny.py"))
    assert not rc.data.task_files
    world = D.make_world(rc.env, c)
    env = world.make_env(generate_tasks(1, seed=5)[0])
    env.reset()
    assert isinstance(env.user, ScriptedUser) and isinstance(env.backend, StateToolBackend) and env.judge is None
