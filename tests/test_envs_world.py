"""Worlds chosen per config (scripted / teacher user, state / expected / teacher tools, no / teacher judge, plain /
reference protocol) on every task source, with the loopback teacher as mock user, mock tool and judge."""
import pytest

from agq_jax.envs import probes
from agq_jax.envs.importers import export_reference_json
from agq_jax.envs.judge import JudgeCache
from agq_jax.envs.sources import heldout_split, load_task_files
from agq_jax.envs.tools import SharedToolCache
from agq_jax.envs.world import TeacherChats, World, WorldSpec
from agq_jax.envs.worlds.generator import generate_tasks
from data_synth.loopback_teacher import start_loopback_teacher
from data_synth.teachers import Endpoint, TeacherClient


@pytest.fixture(scope="module")
def chats():
    with start_loopback_teacher() as srv:
        ep = Endpoint(base_url=srv.base_url, model="loopback", backoff_s=0.01, timeout_s=10)
        with TeacherClient({r: ep for r in ("mock_user", "mock_tool", "judge")}) as c:
            yield TeacherChats(*(c.as_callable(r) for r in ("mock_user", "mock_tool", "judge"))), srv


def _play(world, task, replies):
    env = world.make_env(task, tool_cache=SharedToolCache())
    env.reset()
    for r in replies:
        if env.step(r).done:
            break
    if not env.done:
        env.finish("max_agent_turns")
    return env


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
