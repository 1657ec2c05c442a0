"""Qwen3-30B-A3B (MoE, 128 experts, top-8) student with the reference recipe and GSPO, as the paper does.

    python -m agq_jax.train --config=configs/30b_a3b.py              # default layout: v5p-64
    python -m agq_jax.train --config=configs/30b_a3b.py:h100x16      # two 8xH100 nodes
    python -m agq_jax.train --config=configs/30b_a3b.py:h200x8       # one 8xH200 node

30.5B params (3.3B active): fp32 master + grads + AdamW is ~490 GB, so one 8xH100 node (640 GB) cannot
hold it with room for rollouts; GPU layouts start at two H100 nodes or one 8xH200 node. `model.hf_path` is a local HF directory.

Layouts shard the experts' hidden dim over `fsdp` and their FFN dim over `tensor` (Megatron-style, no
duplicated compute). `v5p-64-ep` adds an `expert` mesh axis (2 shards of 64 whole experts), so expert
weights are gathered over fsdp only, and rows are split over fsdp x expert (16 shards: micro-batches of 16
rows); the MoE block gathers an expert pair's tokens (docs/launch.md, "Choosing a mesh").
"""
from agq_jax.run_config import sibling

ref = sibling(__file__, "_reference")
Layout = ref.Layout

PRESET = "Qwen3-30B-A3B"
HF_PATH = "checkpoints/Qwen3-30B-A3B"
DEFAULT_LAYOUT = "v5p-64"

# decode_batch_size: the largest per-host rollout batch whose compiled prefill and decode stay under 90% of HBM
# with the train state resident (`python -m agq_jax.aot --config=configs/30b_a3b.py:LAYOUT --fit_decode_batch`).
MESH_LAYOUTS = {
    "v5p-64": Layout("tpu-v5p", 32, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_rows=8,
                     decode_batch_size=128, topology="v5p:2x4x4",
                     note="32 chips / 8 hosts; tensor=4 inside a host, FSDP over the slice"),
    "v5p-32": Layout("tpu-v5p", 16, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_rows=4,
                     decode_batch_size=64, topology="v5p:2x2x4",
                     note="16 chips / 4 hosts; ~31 GB of training state per chip"),
    # tensor x expert = 4 = one host's chips, so a host can hold its rollout copy (4 x 2 would span two hosts)
    "v5p-64-ep": Layout("tpu-v5p", 32, dict(data=1, fsdp=-1, tensor=2, expert=2), micro_batch_rows=16,
                        decode_batch_size=128, topology="v5p:2x4x4",
                        note="expert parallel: 64 experts per expert shard, tensor=2 x expert=2 inside a host"),
    # expert_shards=2: a rollout copy spans 2 hosts (8 chips); one host's copy (tensor=4) made the reshard
    # need 33.8 GiB of 31.25 (compiled); with 2 hosts: reshard 17.3, prefill 16.4, decode 21.9 GiB
    "v6e-64": Layout("tpu-v6e", 64, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_rows=16,
                     decode_batch_size=8, expert_shards=2, topology="v6e:8x8",
                     note="64 chips x 32 GB; ~8 GB of training state per chip"),
    "h100x16": Layout("h100", 16, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_rows=4,
                      note="two 8xH100 nodes; tensor=4 over NVLink, FSDP across both nodes"),
    "h100x32": Layout("h100", 32, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_rows=8,
                      note="four 8xH100 nodes"),
    "h200x8": Layout("h200", 8, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_rows=2,
                     note="one 8xH200 node (141 GB each): the one single-node GPU shape that fits"),
}


def recipe(c):
    c.rl.policy_loss = "gspo"                 # sequence-level ratio: stable for MoE routing noise
    c.rl.loss_agg = "seq-mean-token-mean"     # GSPO's sequence-level objective


def get_config(layout: str | None = None):
    return ref.get_config_for(globals(), "30b_a3b", layout)
