"""Qwen3-0.6B student with the AgenticQwen reference recipe (GRPO, G=16, 64 tasks/step, lr 1e-6, clip 0.2/0.28).

    python -m agq_jax.train --config=configs/0_6b.py                 # default layout: v6e-8
    python -m agq_jax.train --config=configs/0_6b.py:h100x8          # a named layout from MESH_LAYOUTS
    python -m agq_jax.train --config=configs/0_6b.py --config.model.hf_path=/data/Qwen3-0.6B

`model.hf_path` is a local HF directory (config.json + safetensors), relative to the working directory;
fetch it first (docs/launch.md, "Weights"). The smallest student gets a short SFT warm start on
expert trajectories in round 0 so that it emits well-formed tool calls before GRPO.
"""
from agq_jax.run_config import sibling

ref = sibling(__file__, "_reference")
Layout = ref.Layout

PRESET = "Qwen3-0.6B"
HF_PATH = "checkpoints/Qwen3-0.6B"
DEFAULT_LAYOUT = "v6e-8"

# 0.6B params: fp32 master + grads + AdamW = ~10 GB in all, so FSDP within one host is plenty. What
# limits the micro-batch is attention over 14k-token rows (XLA materialises [heads, T, T] scores):
# one row per device; see `python launch/mesh_plan.py configs/0_6b.py`.
# decode_batch_size: the largest per-host rollout batch whose compiled prefill and decode stay under 90% of HBM
# with the train state resident (`python -m agq_jax.aot --config=configs/0_6b.py:LAYOUT --fit_decode_batch`);
# v6e-8 would fit 128 at 96%, kept at 64 for the runtime's own buffers.
MESH_LAYOUTS = {
    "v6e-8": Layout("tpu-v6e", 8, dict(data=1, fsdp=-1, tensor=2, expert=1), micro_batch_rows=4,
                    decode_batch_size=64, topology="v6e:2x4/2x4x1",
                    note="one v6e-8 host (8 chips x 32 GB); tensor=2 halves each chip's attention scores"),
    "v5p-8": Layout("tpu-v5p", 4, dict(data=1, fsdp=-1, tensor=1, expert=1), micro_batch_rows=4,
                    decode_batch_size=128, topology="v5p:2x2x1",
                    note="one v5p-8 host (4 chips x 95 GB)"),
    "h100x8": Layout("h100", 8, dict(data=1, fsdp=-1, tensor=1, expert=1), micro_batch_rows=8,
                     note="one 8xH100 node"),
    "h100x16": Layout("h100", 16, dict(data=2, fsdp=-1, tensor=1, expert=1), micro_batch_rows=16,
                      note="two 8xH100 nodes: data parallel across nodes, FSDP inside each"),
}


def recipe(c):
    c.sft.enabled = True
    c.sft.rounds = "first"
    c.sft.steps = 200
    c.sft.batch_size = 16
    c.sft.learning_rate = 1e-5
    c.sft.warmup_steps = 20


def get_config(layout: str | None = None):
    return ref.get_config_for(globals(), "0_6b", layout)
