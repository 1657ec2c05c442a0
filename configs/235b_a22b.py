"""Qwen3-235B-A22B (MoE, 128 experts, top-8) with the reference recipe and GSPO: the scaling check.

    python -m agq_jax.train --config=configs/235b_a22b.py            # default layout: v5p-256

235B params (22B active): fp32 master + grads + AdamW is ~3.8 TB. The paper trains students up to
30B-A3B and uses this model as the *teacher*; this config exists so the sharding of the largest Qwen3
is built and checked abstractly in the tests, and as a starting point for a self-distillation run.
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

PRESET = "Qwen3-235B-A22B"
HF_PATH = "checkpoints/Qwen3-235B-A22B"
DEFAULT_LAYOUT = "v5p-256"

MESH_LAYOUTS = {
    "v5p-256": Layout("tpu-v5p", 128, dict(data=1, fsdp=-1, tensor=4, expert=1), micro_batch_size=32,
                      note="128 chips / 32 hosts; ~29 GB of training state per chip"),
    "h100x128": Layout("h100", 128, dict(data=1, fsdp=-1, tensor=8, expert=1), micro_batch_size=16,
                       note="sixteen 8xH100 nodes; tensor=8 over NVLink"),
}


def get_config(layout: str | None = None):
    c = ref.build("235b_a22b", PRESET, HF_PATH, MESH_LAYOUTS, layout or DEFAULT_LAYOUT)
    c.rl.policy_loss = "gspo"
    c.rl.loss_agg = "seq-mean-token-mean"
    return c
