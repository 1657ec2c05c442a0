"""The `cpu-smoke` layouts: a full-size config's own code path, at toy size, on a CPU.

`python -m agq_jax.train --config=configs/30b_a3b.py:cpu-smoke` runs the shipped recipe unchanged (loss,
MoE kernel, remat, bf16 compute over fp32 masters, the real Qwen3 tokenizer, loading through
`model.hf_path`, teachers for every role, the layout's mesh axes) with only sizes shrunk
(configs/_reference.py, SMOKE_FIELDS). Before jax starts this module forces `smoke.cpu_devices` host
devices; then, with no `model.hf_path` given, it writes a random model of the preset's family at
`smoke.model_sizes` into `<run_dir>/random_init` as an HF checkpoint, which the run then loads.
"""
from __future__ import annotations

import os
import sys

RANDOM_INIT = "random_init"


def force_cpu_devices(n: int) -> None:
    """Make XLA expose `n` CPU devices; must run before jax is imported."""
    if "jax" in sys.modules:
        raise RuntimeError("cpu-smoke: jax was imported before the CPU devices could be forced "
                           "(run it through `python -m agq_jax.train`)")
    flags = os.environ.get("XLA_FLAGS", "")
    flag = f"--xla_force_host_platform_device_count={n}"
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def random_checkpoint(rc, path: str) -> str:
    """Write a random model of `rc`'s preset family at `smoke.model_sizes` to `path` (HF format, with the real
    Qwen3 tokenizer files), unless a checkpoint is already there."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import jax.numpy as jnp
    from flax import nnx

    from agq_jax.models import qwen3
    from agq_jax.models.config import PRESETS

    if not rc.model.preset:
        raise ValueError("cpu-smoke: model.preset names the family of the random checkpoint; it is empty")
    arch = PRESETS[rc.model.preset].replace(**dict(rc.smoke.model_sizes))
    model = qwen3.Qwen3ForCausalLM(arch, rngs=nnx.Rngs(rc.seed), dtype=jnp.float32, param_dtype=jnp.float32)
    tmp = f"{path}.tmp.{os.getpid()}"
    qwen3.save_pretrained(model, tmp)
    os.replace(tmp, path)
    return path


def prepare(rc):
    """The run config of a cpu-smoke run, with model.hf_path pointing at the random checkpoint (written now if
    missing); an explicit model.hf_path is used as given."""
    if rc.model.hf_path:
        return rc
    path = random_checkpoint(rc, os.path.join(rc.resolved_run_dir, RANDOM_INIT))
    return rc.replace(**{"model.hf_path": path})
