"""Offline synthesis round (no teacher): procedural agentic tasks + procedural reasoning problems.

`python -m data_synth.run --config=configs/synth_tiny.py --round=0` writes runs/synth_tiny/data/round_0;
later rounds pass `--failures=F.jsonl` and get procedurally harder variants of what the policy failed.
Any training config works the same way (its `teachers`, `synth` and `data` sections); configs/synth_sglang.py
is this one with every stage on teachers.
"""
from agq_jax.run_config import defaults


def get_config():
    c = defaults()
    c.name = "synth_tiny"
    c.data.agentic_weight = 1.0        # both families of the flywheel
    c.data.reasoning_weight = 1.0
    return c
