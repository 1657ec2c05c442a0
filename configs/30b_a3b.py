"""Qwen3-30B-A3B (MoE, 128 experts, top-8) student with the reference recipe and GSPO, as the paper does.

    python -m agq_jax.train --config=configs/30b_a3b.py              # default layout: v5p-64
    python -m agq_jax.train --config=configs/30b_a3b.py:h100x16      # two 8xH100 nodes
    python -m agq_jax.train --config=configs/30b_a3b.py:h200x8       # one 8xH200 node

30.5B params (3.3B active): fp32 master + grads + AdamW is ~490 GB, so one 8xH100 node (640 GB) cannot
hold it with room for rollouts; GPU layouts start at two H100 nodes or one 8xH200 node. `model.hf_path` is a local HF directory.

Layouts shard the experts' hidden dim over `fsdp` and their FFN dim over `tensor` (Megatron-style, no
duplicated compute). `v5p-64-ep` adds an `expert` mesh axis (2 shards of 64 whole experts), so expert
weights are gathered over fsdp only; with the current logical rules the token batch is not split over
`expert`, so attention and the router repeat on that axis (docs/launch.md, "Choosing a mesh").
"""
import importlib.util
import pathlib
import sys


def _reference():
    """configs/_reference.py, loaded by path: ml_collections execs config files outside any package."""
    name = "agq_jax_configs__reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).resolve().with_name("_reference.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ref = _reference()
Layout = ref.Layout

PRESET = "Qwen3-30B-A3B"
HF_PATH = "checkpoints/Qwen3-30B-A3B"
DEFAULT_LAYOUT = "v5p-64"

MESH_LAYOUTS = {
    "v5p-64": Layout("tpu-v5p", 32, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_size=8,
                     note="32 chips / 8 hosts; tensor=4 inside a host, FSDP over the slice"),
    "v5p-32": Layout("tpu-v5p", 16, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_size=4,
                     note="16 chips / 4 hosts; ~31 GB of training state per chip"),
    "v5p-64-ep": Layout("tpu-v5p", 32, dict(data=1, fsdp=-1, tensor=4, expert=2), micro_batch_size=4,
                        note="expert parallel: 64 experts per expert shard, tensor=4 inside a host"),
    "v6e-64": Layout("tpu-v6e", 64, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_size=16,
                     note="64 chips x 32 GB; ~8 GB of training state per chip"),
    "h100x16": Layout("h100", 16, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_size=4,
                      note="two 8xH100 nodes; tensor=4 over NVLink, FSDP across both nodes"),
    "h100x32": Layout("h100", 32, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_size=8,
                      note="four 8xH100 nodes"),
    "h200x8": Layout("h200", 8, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_size=2,
                     note="one 8xH200 node (141 GB each): the one single-node GPU shape that fits"),
}


def get_config(layout: str | None = None):
    c = ref.build("30b_a3b", PRESET, HF_PATH, MESH_LAYOUTS, layout or DEFAULT_LAYOUT)
    c.rl.policy_loss = "gspo"                 # sequence-level ratio: stable for MoE routing noise
    c.rl.loss_agg = "seq-mean-token-mean"     # GSPO's sequence-level objective
    return c
