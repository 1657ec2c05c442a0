"""Reasoning flywheel: answer equivalence, consistency filter against replayed teacher solutions, offline
procedural seeds and harder variants, seed-file validation, offline round via the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agq_jax.envs.answers import answers_equivalent, extract_final_answer
from data_synth.io_utils import read_jsonl
from agq_jax.envs.reasoning_problems import (Difficulty, ReasoningProblem, generate_problem, generate_seed_set,
                                           harder_variant, load_seed_problems)
from data_synth.replay_server import ReplayServer
from data_synth.run import run_round
from data_synth.teachers import TeacherUnavailable

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = str(ROOT / "tests" / "fixtures" / "teacher_replies" / "reasoning_flow.json")


def _tiny_config():
    from agq_jax.run_config import load_configdict

    return load_configdict(str(ROOT / "configs" / "synth_tiny.py"))


def _teacher_config(c, url: str, model: str, **endpoint):
    """Every role that the reasoning flywheel uses (synthesizer, solver) on `url`; no other role."""
    from agq_jax.run_config import RunConfig

    d = c.teachers.default
    d.base_url, d.model = url, model
    for k, v in endpoint.items():
        d[k] = v
    for role in ("mock_user", "mock_tool", "judge"):
        c.teachers[role].base_url = c.teachers[role].model = ""
    return RunConfig.from_configdict(c)


@pytest.mark.parametrize("pred,gold", [
    ("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "1/2"), ("x+1", "1+x"), ("2x+2", "2(x+1)"),
    ("x^2+2x+1", "(x+1)^2"), ("3.0", "3"), ("\\boxed{36}", "36"), ("$\\sqrt{2}$", "2^{1/2}"),
    ("\\text{Paris}", "paris"), ("-7", "-7.0"), ("The answer is 12.", "12")])
def test_equivalent_answers(pred, gold):
    assert answers_equivalent(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("2", "3"), ("x+1", "x+2"), ("1/2", "0.51"), ("Paris", "London"), ("", "0"), (None, "1"), ("12", "1"),
    ("x", "y"), ("1/2", "2"), ("open(1)", "1"), ("exit()", "0"), ("__import__('os')", "0")])
def test_non_equivalent_answers(pred, gold):
    """Also: answers are never evaluated as Python (open(1) would close this process's stdout)."""
    assert not answers_equivalent(pred, gold)


def test_final_answer_extraction():
    assert extract_final_answer("so \\boxed{\\frac{a}{b+1}} done") == "\\frac{a}{b+1}"
    assert extract_final_answer("first \\boxed{1} then \\boxed{2}") == "2"
    assert extract_final_answer("<answer>42</answer>") == "42"
    assert extract_final_answer("cut off \\boxed{\\frac{1}{2") is None
    assert extract_final_answer("no answer here") is None


def test_consistency_filter_and_variants(tmp_path):
    personas = tmp_path / "personas.jsonl"
    personas.write_text(json.dumps({"persona": "A pharmaceutical chemist", "id": "c"}) + "\n")
    multihop = generate_problem("multihop", Difficulty(hops=2), seed=5)
    failures = {"reasoning": [
        {"id": "f1", "question": "A shop sells pens at 3 dollars each. How much do 7 pens cost?", "answer": "21"},
        {"problem": {"id": "f2", "question": "Solve for x: 2x + 3 = 11.", "answer": "4", "kind": "algebra"}},
        multihop.model_dump(), {"question": "missing its answer"}]}
    with ReplayServer.from_files(FIXTURE) as srv:
        c = _tiny_config()
        c.name, c.run_dir, c.verbose = "r", str(tmp_path / "runs" / "r"), False
        c.data.agentic_weight = 0.0
        c.synth.reasoning.persona_path, c.synth.reasoning.fresh_procedural_per_round = str(personas), 0
        c = _teacher_config(c, srv.base_url, "replay", backoff_s=0.01, max_retries=1)
        res = run_round(c, 1, failures=failures)
        n_requests = srv.request_count()
        rows = read_jsonl(res.reasoning_path)
        from agq_jax.driver.data import REASONING, load_items
        from agq_jax.run_config.schema import EnvSection

        assert len(load_items(rows, REASONING, EnvSection(), with_gold=False)) == len(rows)  # the trainer reads them
        by_q = {r["question"]: r for r in rows}
        kept = {q[:25] for q in by_q}
        assert kept == {"A shop sells pens at 4 do", "Solve for x: 5x - 7 = 2x ", "A chemist buys reagent vi",
                        next(q for q in by_q if q.startswith("Using the search"))[:25]}
        pens = next(r for q, r in by_q.items() if "9 pens" in q)
        assert pens["answer"] == "36" and pens["consistency"]["k"] == 3 and pens["consistency"]["proposed_agrees"]
        from agq_jax.envs.reasoning_problems import ReasoningProblem
        assert all(ReasoningProblem.model_validate(r).id == r["id"] for r in rows)   # what the trainer loads
        assert pens["lineage"]["parents"] == ["f1"] and pens["lineage"]["derivation"] == "self_instruct:values"
        assert by_q["A chemist buys reagent vials at 3 dollars each. How much do 7 vials cost in dollars?"][
            "lineage"]["derivation"] == "persona"
        hard = next(r for q, r in by_q.items() if q.startswith("Using the search"))
        assert hard["lineage"]["derivation"] == "harder" and hard["difficulty"]["hops"] == 3
        rej = {r["item"]: r for r in read_jsonl(os.path.join(res.round_dir, "rejections.jsonl"))}
        reasons = sorted(r["reason"] for r in rej.values() if r["stage"] == "reasoning/consistency")
        assert reasons == ["disagree", "no_answer", "no_answer"]
        assert any(r["reason"] == "schema" and r["item"] == "failures[3]" for r in rej.values())
        stages = {s["name"]: s for s in res.stages}
        assert stages["reasoning/self_instruct"]["failures"] == {"non_json": 1}
        # a re-run costs nothing: checkpoints + cache
        again = run_round(c, 1, failures=failures)
        assert srv.request_count() == n_requests
        assert Path(again.reasoning_path).read_text() == Path(res.reasoning_path).read_text()


def test_procedural_generator_is_deterministic_and_verifiable():
    a, b = generate_seed_set(9, seed=3), generate_seed_set(9, seed=3)
    assert [p.model_dump() for p in a] == [p.model_dump() for p in b]
    assert [p.id for p in generate_seed_set(9, seed=4)] != [p.id for p in a]
    for p in a:
        if p.kind == "arithmetic":   # re-derive the label independently with sympy
            import sympy
            expr = p.question.split("value of ")[1].split(". Give")[0]
            assert answers_equivalent(str(sympy.nsimplify(sympy.sympify(expr))), p.answer)
        if p.kind == "algebra" and "system" not in p.question:
            import sympy
            x = sympy.Symbol("x")
            lhs, rhs = p.question.split(": ", 1)[1].rstrip(".").split(" = ")
            sol = sympy.solve(sympy.sympify(lhs.replace("x", "*x")) - sympy.sympify(rhs.replace("x", "*x")), x)
            assert answers_equivalent(str(sol[0]), p.answer)
        if p.kind == "multihop":
            assert any(p.answer in d["text"] for d in p.documents)


def test_harder_variants_turn_the_knobs():
    for kind in ("arithmetic", "algebra", "multihop"):
        p = generate_problem(kind, Difficulty(), seed=1)
        h = harder_variant(p, round_idx=2)
        assert h.kind == kind and h.lineage.parents == [p.id] and h.lineage.round == 2
        d0, d1 = Difficulty.from_dict(p.difficulty), Difficulty.from_dict(h.difficulty)
        assert (d1.num_ops, d1.algebra_level, d1.hops) > (d0.num_ops, d0.algebra_level, d0.hops)
        assert harder_variant(p, round_idx=2) == h


def test_seed_file_reports_bad_rows(tmp_path):
    f = tmp_path / "seeds.jsonl"
    f.write_text('{"question": "1+1?", "answer": "2", "source": "toy"}\nnot json\n{"question": "no answer"}\n[1]\n')
    good, bad = load_seed_problems(str(f))
    assert [p.answer for p in good] == ["2"] and good[0].source == "toy"
    assert [(b["where"].rsplit(":", 1)[1], b["reason"]) for b in bad] == [("2", "non_json"), ("3", "schema"),
                                                                          ("4", "schema")]
    assert "answer" in bad[1]["detail"]


def test_offline_round_via_cli_and_down_teacher(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "data_synth.run", f"--config={ROOT}/configs/synth_tiny.py",
                          "--round=0", f"--config.run_dir={tmp_path}", "--config.verbose=False"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "offline" and summary["agentic"] == 12 and summary["reasoning"] == 12
    rows = read_jsonl(os.path.join(summary["round_dir"], "reasoning.jsonl"))
    assert all(ReasoningProblem.model_validate(r) for r in rows)
    c = _tiny_config()
    c.run_dir, c.verbose, c.teachers.health_timeout_s = str(tmp_path), False, 0.5
    with pytest.raises(TeacherUnavailable, match="127.0.0.1:9/v1/models"):
        run_round(_teacher_config(c, "http://127.0.0.1:9/v1", "m"), 0)
