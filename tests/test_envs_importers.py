"""AgenticQwen importers: all 100 demo tasks, malformed records reported, lossless parquet round trips, stats CLI."""
import copy
import json

import pyarrow.parquet as pq
import pytest

from agq_jax.envs import replay_agent, run_episode, score
from agq_jax.envs.importers import (PARQUET_COLUMNS, export_parquet, load_demo_json, load_demo_records, load_jsonl,
                                    load_parquet, save_jsonl)
from agq_jax.envs.runtime import system_message
from agq_jax.envs.worlds.generator import Knobs, generate_tasks
from data_synth import stats


@pytest.fixture(scope="module")
def raw(demo_path):
    with open(demo_path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def demo(raw, demo_path):
    tasks, issues = load_demo_json(demo_path)
    return tasks, issues


def test_all_100_demo_tasks_import(raw, demo):
    tasks, issues = demo
    assert len(tasks) == 100 and [i for i in issues if not i.kept] == []
    # kept issues are untraceable identifiers, each listed on its task (named, counted, not dropped)
    by_id = {t.id: t for t in tasks}
    assert issues and all("neither the request, the background nor an earlier tool output" in i.message for i in issues)
    assert sum(len(t.metadata.get("import_issues", [])) for t in tasks) == len(issues)
    assert all(i.record_id in by_id for i in issues)
    assert [t.id for t in tasks] == [r["id"] for r in raw]
    assert sum(1 for t in tasks if t.expected_returns.hack_path) == 70
    for t, r in zip(tasks, raw):
        assert system_message(t) == r["prompt"][0]["content"]          # the tools block is kept verbatim
        assert t.user_opening == r["prompt"][1]["content"]
        assert 4 <= len(t.tools) <= 7 and all(tool.outputs for tool in t.tools)
        assert t.expected_returns.model_dump() == {k: r["tool_return_expected"].get(k) or []
                                                   for k in ("normal_path", "hack_path")}
        assert t.branch.legal == (not r["tool_return_expected"]["hack_path"] and t.branch.branch_type != "transfer")


def test_malformed_records_are_reported_with_id_and_field(raw):
    recs = copy.deepcopy(raw[:6])
    del recs[1]["prompt"]
    recs[2]["tool_return_expected"] = ["not", "a", "dict"]
    recs[3]["prompt"][0]["content"] = recs[3]["prompt"][0]["content"].replace('{"type": "function"', '{"type: ', 1)
    recs[4]["rubrics"] = 42
    recs[5]["tool_return_expected"]["normal_path"][0] = {"tool_name": "x"}   # a tool the prompt does not define
    recs[0]["tool_return_expected"]["hack_path"][0]["input"] = json.dumps(recs[0]["tool_return_expected"]["hack_path"][0]["input"])
    recs[0]["tool_return_expected"]["hack_path"][1]["input"] = "event GWtypical"   # a string that is no object
    tasks, issues = load_demo_records(recs)
    assert [t.id for t in tasks] == [raw[0]["id"], raw[5]["id"]]                    # unstructurable parts: kept
    dropped = {(i.record_id, i.field.split("[")[0]) for i in issues if not i.kept}
    assert dropped == {(raw[1]["id"], "prompt"), (raw[2]["id"], "tool_return_expected"),
                       (raw[3]["id"], "system.tools"), (raw[4]["id"], "rubrics")}
    kept = {(i.record_id, i.field) for i in issues if i.kept}
    assert {(raw[5]["id"], "tool_return_expected.normal_path[0].tool_name"),
            (raw[0]["id"], "tool_return_expected.hack_path[0].input"),
            (raw[0]["id"], "tool_return_expected.hack_path[1].input")} <= kept
    assert len(tasks[0].expected_returns.hack_path) == len(raw[0]["tool_return_expected"]["hack_path"]) - 1
    assert len(tasks[1].expected_returns.normal_path) == len(raw[5]["tool_return_expected"]["normal_path"]) - 1
    assert all(str(i).startswith("record ") for i in issues)


def test_parquet_round_trip_lossless(tmp_path, demo):
    tasks, demo_issues = demo
    path = tmp_path / "released.parquet"
    export_parquet(tasks, str(path), full=False)
    table = pq.read_table(path)
    assert table.column_names == list(PARQUET_COLUMNS)
    assert all(str(table.schema.field(c).type) == "string" for c in PARQUET_COLUMNS)
    back, issues = load_parquet(str(path))
    assert issues == demo_issues and back == tasks
    # released layout -> tasks -> released layout: byte-identical columns, even for a non-canonical JSON string
    rows = table.to_pylist()
    rows[0]["tool_return_expected_json"] = json.dumps(json.loads(rows[0]["tool_return_expected_json"]), indent=2)
    rows[1]["messages_json"] = json.dumps(json.loads(rows[1]["messages_json"]), ensure_ascii=True)
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "odd.parquet")
    odd, _ = load_parquet(str(tmp_path / "odd.parquet"))
    export_parquet(odd, str(tmp_path / "again.parquet"), full=False)
    assert pq.read_table(tmp_path / "again.parquet").to_pylist() == rows
    # procedural tasks keep everything (world state, tree, gold trajectory) through the full export
    proc = generate_tasks(12, seed=3, knobs=Knobs(level=1))
    export_parquet(proc, str(tmp_path / "proc.parquet"))
    back, issues = load_parquet(str(tmp_path / "proc.parquet"))
    assert issues == [] and back == proc
    save_jsonl(proc, str(tmp_path / "proc.jsonl"))
    assert load_jsonl(str(tmp_path / "proc.jsonl")) == (proc, [])


def test_missing_columns_named(tmp_path):
    import pyarrow as pa
    pq.write_table(pa.table({"id": ["a"], "system": ["s"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="missing columns.*messages_json"):
        load_parquet(str(tmp_path / "bad.parquet"))


def test_stats_cli(tmp_path, capsys):
    tasks = generate_tasks(30, seed=2)
    save_jsonl(tasks, str(tmp_path / "d.jsonl"))
    assert stats.main([str(tmp_path / "d.jsonl"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n_tasks"] == 30 and s["legal_illegal"]["legal"] + s["legal_illegal"]["illegal"] == 30
    assert set(s["branch_types"]) == {"legal", "refusal", "transfer", "clarification", "confirmation"}
    assert s["tree_depth"]["min"] >= 2 and s["branch_coverage"]["covered"] > 0


def test_stats_cli_on_the_demo_tasks(capsys, demo_path):
    assert stats.main([demo_path]) == 0
    assert "legal / illegal: 29 / 71" in capsys.readouterr().out
