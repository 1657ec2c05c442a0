"""The reward on all 100 released demo tasks cannot be gamed: refusing, doing nothing and replaying the hack
path all score below the gold path (the hack path 0), under both agent protocols."""
import re
from pathlib import Path

import pytest

from agq_jax.envs import probes
from agq_jax.envs.importers import load_demo_json
from agq_jax.envs.rewards import RewardConfig
from data_synth.loopback_teacher import start_loopback_teacher

DOC = Path(__file__).resolve().parents[1] / "docs" / "mock_world.md"


@pytest.fixture(scope="module")
def tasks(demo_path):
    tasks, issues = load_demo_json(demo_path)
    assert len(tasks) == 100
    return tasks


@pytest.mark.parametrize("protocol", ["plain", "reference"])
def test_no_probe_reaches_the_gold_path(tasks, protocol):
    for t in tasks:
        gold, rec = probes.run_probe(t, "gold", protocol)
        assert gold.total == 1.0, (t.id, rec.termination, gold.components)
        assert rec.termination == ("answer" if protocol == "reference" else "user_stop") or rec.transferred
        calls_a_tool = bool(t.expected_returns.normal_path)
        for kind in ("refuse", "nothing"):
            r, _ = probes.run_probe(t, kind, protocol)
            if calls_a_tool:
                assert r.total < gold.total, (t.id, kind, r.components)
        if t.expected_returns.hack_path:
            for kind in ("hack", "hack_world"):
                r, rec = probes.run_probe(t, kind, protocol)
                assert r.total == 0.0, (t.id, kind, r.components, r.gates)


def test_refusal_without_lookup_scores_below_gold_even_on_pure_refusal_tasks(tasks):
    pure = [t for t in tasks if t.expected_returns.hack_path and not any(
        s.tool_name in t.write_tools and "error" not in str(s.expected_output).lower()
        for s in t.expected_returns.normal_path)]
    assert len(pure) >= 20
    for t in pure:
        r, _ = probes.run_probe(t, "refuse")
        assert r.components["subgoal/writes_match"] == 1.0 and r.components["subgoal/refused"] == 1.0
        assert r.total < 1.0 and any(k.startswith("subgoal/lookup_") and v == 0.0 for k, v in r.components.items())


def test_reference_gate(tasks):
    cfg = RewardConfig(gates=("no_forbidden", "tool_response", "clean_end"))
    rows = probes.probe_table(tasks[:30], "reference", cfg)
    assert rows["gold"]["full_reward"] == 30
    assert rows["refuse"]["mean"] == 0.0 and rows["nothing"]["mean"] == 0.0   # no tool response: gated to 0


def test_the_documented_probe_tables_reproduce(tasks, demo_path, capsys):
    """docs/mock_world.md's probe tables are what `python -m agq_jax.envs.probes` prints: offline under both
    protocols, and with the loopback teacher as user, tools and judge."""
    offline, teacher = re.findall(r"```\n(probe .*?)\n```", DOC.read_text(), re.S)
    for protocol in ("plain", "reference"):
        assert probes.format_table(probes.probe_table(tasks, protocol)) == offline, protocol
    with start_loopback_teacher() as srv:
        assert probes.main(["--data", demo_path, "--teacher_url", srv.base_url]) == 0
    assert capsys.readouterr().out.startswith(teacher + "\n")
