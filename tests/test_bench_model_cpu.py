"""benchmarks/bench_model_cpu.py end to end at a toy shape: both models agree (the script's own guards), and every
phase and matmul row is reported with the shape it claims. No timing is asserted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("moe", [False, True])
def test_rows_report_the_shapes_they_time(moe):
    args = ["--hidden", "128", "--layers", "1", "--vocab", "512", "--batches", "1", "2", "--prompt-len", "16",
            "--new-tokens", "3", "--repeats", "1"] + (["--moe"] if moe else [])
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_model_cpu.py"), *args], cwd=str(ROOT),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["phase"], r["batch"]) for r in rows if "batch" in r] == [
        ("prefill", 1), ("decode", 1), ("prefill", 2), ("decode", 2)]
    gemms = {(r["phase"], r["rows"]): r for r in rows if r["phase"].startswith("gemm")}
    tokens = 2 * 16  # the largest batch x prompt
    mlp = ("gemm expert_up", 128 // 2, tokens * 4 // 16) if moe else ("gemm mlp_up", 128 * 3, tokens)
    expected = {(mlp[0], m): mlp[1] for m in {1, 8, mlp[2]}} | {("gemm lm_head", m): 512 for m in (1, 8, tokens)}
    assert set(gemms) == set(expected)
    for (name, m), n in expected.items():
        row = gemms[name, m]
        assert row["flops"] == 2 * m * 128 * n
        # both sides timed; not a speed check (a busy host may be arbitrarily slow)
        assert row["repeats"] >= 20 and row["agq_us"] > 0 and row["transformers_us"] > 0
    assert rows[0]["cpu"] and "isa" in rows[0]
    assert "one fp32 matmul" in out.stdout
