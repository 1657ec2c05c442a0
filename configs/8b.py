"""Qwen3-8B student with the AgenticQwen reference recipe (GRPO, G=16, 64 tasks/step, lr 1e-6, clip 0.2/0.28).

    python -m agq_jax.train --config=configs/8b.py                   # default layout: v5p-32
    python -m agq_jax.train --config=configs/8b.py:h100x8            # one 8xH100 node

`model.hf_path` is a local HF directory (config.json + safetensors), relative to the working directory.
"""
from agq_jax.run_config import sibling

ref = sibling(__file__, "_reference")
Layout = ref.Layout

PRESET = "Qwen3-8B"
HF_PATH = "checkpoints/Qwen3-8B"
DEFAULT_LAYOUT = "v5p-32"

# 8.2B params: fp32 master + grads + AdamW = ~131 GB, sharded by FSDP. The 32 query heads of a 14k-token
# row make ~66 GB of attention scores on the XLA path, so heads are split over `tensor` (inside a host /
# over NVLink) and each device trains one row per micro-batch.
# decode_batch_size: the largest per-host rollout batch whose compiled prefill and decode stay under 90% of HBM
# with the train state resident (`python -m agq_jax.aot --config=configs/8b.py:LAYOUT --fit_decode_batch`);
# v5p-32 would fit 128 at 94%, kept at 64 for the runtime's own buffers.
MESH_LAYOUTS = {
    "v5p-32": Layout("tpu-v5p", 16, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_rows=4,
                     decode_batch_size=64, topology="v5p:2x2x4",
                     note="16 chips / 4 hosts; ~8 GB of training state per chip"),
    "v5p-16": Layout("tpu-v5p", 8, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_rows=2,
                     decode_batch_size=64, topology="v5p:2x2x2",
                     note="8 chips / 2 hosts; ~16 GB of training state per chip"),
    "v6e-32": Layout("tpu-v6e", 32, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_rows=8,
                     decode_batch_size=32, topology="v6e:4x8",
                     note="32 chips x 32 GB; ~4 GB of training state per chip"),
    "h100x8": Layout("h100", 8, dict(data=1, fsdp=-1, tensor=2, expert=1), micro_batch_rows=4,
                     note="one 8xH100 node; ~16 GB of training state per GPU"),
    "h100x16": Layout("h100", 16, dict(data=2, fsdp=-1, tensor=2, expert=1), micro_batch_rows=8,
                      note="two nodes: data parallel across nodes, FSDP + tensor over NVLink inside each"),
}


def get_config(layout: str | None = None):
    return ref.get_config_for(globals(), "8b", layout)
