"""Qwen3-235B-A22B (MoE, 128 experts, top-8) with the reference recipe and GSPO: the scaling check.

    python -m agq_jax.train --config=configs/235b_a22b.py            # default layout: v5p-256

235B params (22B active): fp32 master + grads + AdamW is ~3.8 TB. The paper trains students up to
30B-A3B and uses this model as the *teacher*; this config exists so the sharding of the largest Qwen3
is built and checked abstractly in the tests, and as a starting point for a self-distillation run.

Its bf16 rollout copy (470 GB) does not fit one 4-chip host, so `expert_shards=4` splits each copy over 4
hosts (16 chips) that decode together. Compiled for v5p:4x4x8 (docs/launch.md): the train step fits
14,336-token rows (73.2 of 95 GiB per chip; 120 GiB of temporaries before splash attention), the rollout
programs at 32 rows per host fit with the train state resident (prefill 79.1, reshard 86.0 GiB).
"""
from agq_jax.run_config import sibling

ref = sibling(__file__, "_reference")
Layout = ref.Layout

PRESET = "Qwen3-235B-A22B"
HF_PATH = "checkpoints/Qwen3-235B-A22B"
DEFAULT_LAYOUT = "v5p-256"

MESH_LAYOUTS = {
    "v5p-256": Layout("tpu-v5p", 128, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_rows=32,
                      decode_batch_size=32, expert_shards=4, topology="v5p:4x4x8",
                      note="128 chips / 32 hosts; ~29 GB of training state per chip"),
    "h100x128": Layout("h100", 128, dict(data=1, fsdp=-1, tensor=8, expert=1), micro_batch_rows=16,
                       note="sixteen 8xH100 nodes; tensor=8 over NVLink"),
}


def recipe(c):
    c.rl.policy_loss = "gspo"
    c.rl.loss_agg = "seq-mean-token-mean"


def get_config(layout: str | None = None):
    return ref.get_config_for(globals(), "235b_a22b", layout)
