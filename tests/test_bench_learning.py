"""benchmarks/bench_learning.py, the few-step version: real runs of the training CLI as a tree of shared
prefixes (SFT -> round 0 -> two arms), finished nodes skipped on a rerun, and the seed statistics and paired
differences computed from the runs' own metrics."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_learning  # noqa: E402


def _bench(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_learning.py"), *args], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lb")
    res = _bench("--small", "--seeds", "0", "--arms", "sft", "grpo", "fresh", "--attention", "auto",
                 "--out", str(out), "--summary", str(out / "summary.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_arms_share_their_prefix_and_differ_after_it(small_run):
    out, _ = small_run
    s0 = out / "auto" / "s0"
    recs = {n: json.loads((s0 / n / "bench_done.json").read_text()) for n in ("sft", "grpo_r0", "grpo", "fresh")}
    # the SFT-only evaluation is computed once and inherited (same numbers, not re-run) by every arm
    for n in ("grpo_r0", "grpo", "fresh"):
        assert recs[n]["evals"]["round0_sft"] == recs["sft"]["evals"]["round0_sft"]
    assert recs["grpo"]["evals"]["round0"] == recs["fresh"]["evals"]["round0"] == recs["grpo_r0"]["evals"]["round0"]
    assert set(recs["grpo"]["evals"]) == {"round0_sft", "round0", "round1"}
    # round 1's data: harder variants of the failures vs as many fresh tasks (the control)
    methods = {}
    for arm in ("grpo", "fresh"):
        rows = [json.loads(line) for line in (s0 / arm / "data" / "round_1" / "agentic.jsonl").open()]
        methods[arm] = {r["lineage"]["method"] for r in rows}
    assert "harder_variant" in methods["grpo"] and "fresh_control" not in methods["grpo"]
    assert "fresh_control" in methods["fresh"]


def test_rerun_skips_finished_nodes_and_prints_tables(small_run):
    out, first = small_run
    before = {p: p.stat().st_mtime for p in out.glob("auto/s0/*/bench_done.json")}
    res = _bench("--small", "--seeds", "0", "--arms", "sft", "grpo", "fresh", "--attention", "auto", "--out", str(out))
    assert res.returncode == 0 and "agq_jax.train" not in res.stderr  # nothing ran again
    assert {p: p.stat().st_mtime for p in out.glob("auto/s0/*/bench_done.json")} == before
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert {(r["arm"], r["round"]) for r in lines if r["bench"] == "learning" and r["group"] == "all"} == {
        ("sft", "round0_sft"), ("grpo", "round0_sft"), ("grpo", "round0"), ("grpo", "round1"),
        ("fresh", "round0_sft"), ("fresh", "round0"), ("fresh", "round1")}
    assert "per branch type and round" in res.stdout and "paired differences" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    grpo = json.loads((out / "auto" / "s0" / "grpo" / "bench_done.json").read_text())["evals"]["round1"]
    assert summary["aggregate"]["auto"]["grpo"]["round1"]["all/pass@1"]["mean"] == pytest.approx(grpo["eval/all/pass@1"])


def test_statistics_over_seeds_from_the_records(small_run, tmp_path):
    """Mean / std / paired differences over seeds on known numbers: seed 1 = seed 0's records with pass@1 moved."""
    src, _ = small_run
    out = tmp_path / "lb"
    shutil.copytree(src / "auto" / "s0", out / "auto" / "s0", ignore=shutil.ignore_patterns("checkpoints"))
    for node in ("sft", "grpo_r0", "grpo", "fresh"):
        rec = json.loads((out / "auto" / "s0" / node / "bench_done.json").read_text())
        for tag, m in rec["evals"].items():
            m["eval/all/pass@1"] = {"round0_sft": 0.2, "round0": 0.25, "round1": 0.3}[tag]
            if node == "fresh" and tag == "round1":
                m["eval/all/pass@1"] = 0.26
        (out / "auto" / "s0" / node / "bench_done.json").write_text(json.dumps(rec))
        rec["seed"] = 1
        for tag, m in rec["evals"].items():
            m["eval/all/pass@1"] += 0.1
        (out / "auto" / "s1" / node).mkdir(parents=True)
        (out / "auto" / "s1" / node / "bench_done.json").write_text(json.dumps(rec))
        shutil.copy(out / "auto" / "s0" / node / "config.json", out / "auto" / "s1" / node / "config.json")
    res = _bench("--seeds", "0", "1", "--arms", "sft", "grpo", "fresh", "--attention", "auto", "--out", str(out),
                 "--report-only")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    st = next(r for r in rows if r["bench"] == "learning" and r["arm"] == "grpo" and r["round"] == "round1"
              and r["group"] == "all" and r["metric"] == "pass@1")
    assert st["mean"] == pytest.approx(0.35) and st["std"] == pytest.approx(np.std([0.3, 0.4], ddof=1))
    gain = next(r for r in rows if r["bench"] == "learning_paired" and r["comparison"] == "GRPO - SFT"
                and r["metric"] == "all/pass@1")
    assert gain["mean"] == pytest.approx(0.1) and gain["positive"] == 2 and gain["std"] == pytest.approx(0.0, abs=1e-9)
    assert gain["t"] == float("inf")  # the same gain in every seed: not mean / (float residue)
    table = next(x for x in res.stdout.splitlines() if "GRPO - SFT" in x and "all/pass@1" in x and "{" not in x)
    assert table.split()[7:9] == ["inf", "2/2"], table
    fly = next(r for r in rows if r["bench"] == "learning_paired" and r["comparison"] == "flywheel - fresh"
               and r["metric"] == "all/pass@1")
    assert fly["mean"] == pytest.approx(0.04)
    assert set(bench_learning.ARMS) <= bench_learning.NODES.keys()  # every arm is a node the bench can run


def test_prior_summary_and_the_kernel_perturbation(small_run, tmp_path):
    """Seeds measured on another day count through their --summary (per-seed values), and the same arm and seed
    under two attention kernels gives the paired 'kernels' difference."""
    src, _ = small_run
    out = tmp_path / "lb"
    for impl, shift in (("auto", 0.0), ("xla", -0.05)):
        shutil.copytree(src / "auto" / "s0", out / impl / "s0", ignore=shutil.ignore_patterns("checkpoints"))
        for node in ("sft", "grpo_r0", "grpo"):
            p = out / impl / "s0" / node / "bench_done.json"
            rec = json.loads(p.read_text())
            for tag, m in rec["evals"].items():
                m["eval/all/pass@1"] = {"round0_sft": 0.2, "round0": 0.25, "round1": 0.3}[tag] + shift
                m["eval/all/greedy_pass@1"] = 0.5916667  # a tie, stored as 0.5917 in a summary
            p.write_text(json.dumps(rec))
    args = ["--seeds", "0", "--arms", "sft", "grpo", "--attention", "auto", "xla", "--report-only"]
    res = _bench(*args, "--out", str(out), "--summary", str(tmp_path / "first.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    # the same report from the summary alone (no run directories), to 4 digits
    res2 = _bench(*args, "--out", str(tmp_path / "empty"), "--prior", str(tmp_path / "first.json"),
                  "--summary", str(tmp_path / "second.json"))
    assert res2.returncode == 0, res2.stderr[-2000:]
    rows = [json.loads(x) for x in res2.stdout.splitlines() if x.startswith("{")]
    kern = {(r["comparison"], r["metric"]): r for r in rows if r["bench"] == "learning_paired"
            and r["attention"] == "auto-xla"}
    assert kern[("grpo: kernels", "all/pass@1")]["mean"] == pytest.approx(0.05, abs=1e-4)
    assert kern[("sft: kernels", "all/pass@1")]["mean"] == pytest.approx(0.05, abs=1e-4)
    gain = {r["attention"]: r["mean"] for r in rows if r["bench"] == "learning_paired"
            and r["comparison"] == "GRPO - SFT" and r["metric"] == "all/pass@1"}
    assert gain == pytest.approx({"auto": 0.1, "xla": 0.1}, abs=1e-4)
    first, second = (json.loads((tmp_path / f).read_text()) for f in ("first.json", "second.json"))
    a, b = first["aggregate"]["xla"]["grpo"]["round1"], second["aggregate"]["xla"]["grpo"]["round1"]
    assert a.keys() == b.keys() and all(b[k]["mean"] == pytest.approx(a[k]["mean"], abs=1e-4) for k in a)
    # SFT from its run directory, the rest from the prior: the tie is still a tie
    for impl in ("auto", "xla"):
        shutil.copytree(out / impl / "s0" / "sft", tmp_path / "mixed" / impl / "s0" / "sft")
    res3 = _bench(*args, "--out", str(tmp_path / "mixed"), "--prior", str(tmp_path / "first.json"))
    assert res3.returncode == 0, res3.stderr[-2000:]
    tie = [json.loads(x) for x in res3.stdout.splitlines() if x.startswith("{") and '"GRPO - SFT"' in x
           and "greedy_pass@1" in x]
    assert len(tie) == 2 and all(r["positive"] == 0 and r["mean"] == 0.0 for r in tie), tie
    # the cost of the nodes measured on another day travels with their values
    assert second["wall_s"] == first["wall_s"], (first["wall_s"], second["wall_s"])
    assert {"auto/sft", "auto/grpo"} <= set(first["wall_s"])


def test_one_report_one_recipe(small_run, tmp_path):
    """A report's runs must share a recipe (their config.json, less seed / kernel / each arm's own change): a
    seed trained with another KL coefficient stops the report, naming its file and the key; an SFT-only node
    is held only to what SFT reads."""
    src, _ = small_run
    out = tmp_path / "lb"
    for seed in (0, 1):
        shutil.copytree(src / "auto" / "s0", out / "auto" / f"s{seed}", ignore=shutil.ignore_patterns("checkpoints"))
    args = ["--seeds", "0", "1", "--arms", "sft", "grpo", "fresh", "--attention", "auto", "--report-only",
            "--out", str(out), "--summary", str(tmp_path / "s.json")]

    def edit(node, key, value):
        p = out / "auto" / "s1" / node / "config.json"
        cfg = json.loads(p.read_text())
        section, leaf = key.split(".")
        cfg[section][leaf] = value
        p.write_text(json.dumps(cfg))

    edit("sft", "rl.kl_coef", 0.5)        # SFT does not read rl: same recipe
    res = _bench(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["recipe"]["rl.kl_coef"] == 0.05 and summary["recipe"]["sft.steps"] == 2
    assert not {"seed", "model.attention_impl", "synth.agentic.expansion"} & summary["recipe"].keys()  # variables
    edit("grpo", "rl.kl_coef", 0.5)
    res = _bench(*args)
    assert res.returncode != 0
    assert "s1/grpo/config.json" in res.stderr and "rl.kl_coef" in res.stderr, res.stderr[-2000:]


def test_committed_figures_are_the_shipped_recipe():
    """docs/learning_benchmark.json (the spread `make demo` prints beside its numbers, the README's table) was
    measured with the recipe configs/tiny.py ships: change the recipe, re-run the benchmark."""
    from agq_jax.demo import seed_spread
    from agq_jax.run_config.core import load

    summary = json.loads((ROOT / "docs" / "learning_benchmark.json").read_text())
    shipped = bench_learning.recipe(json.loads(json.dumps(load(str(ROOT / "configs" / "tiny.py")).to_dict(),
                                                          default=list)))
    assert bench_learning.recipe_diff(shipped, summary["recipe"], "grpo") == []
    spread = seed_spread(load(str(ROOT / "configs" / "tiny.py")).model.attention_impl)
    assert {"all/pass@1", "all/greedy_pass@1"} <= spread.keys() and spread["all/pass@1"][0]["n"] >= 5
