#!/usr/bin/env python
"""Parameter counts and sharding of a config's mesh layouts, and the memory *estimate* of its GPU layouts.

    python launch/mesh_plan.py configs/30b_a3b.py                 # every layout of the config
    python launch/mesh_plan.py configs/30b_a3b.py --layout h100x16 --devices 32
    python launch/mesh_plan.py configs/8b.py --json               # one JSON line per layout

TPU layouts are not estimated here: the TPU compiler runs on a CPU host, so their memory, FLOPs and
roofline come from compiling the real programs (`python -m agq_jax.aot --config=configs/NAME.py:LAYOUT`,
`make aot`). GPU layouts cannot be compiled without GPUs, so this file keeps an arithmetic estimate for them:
resident train state = params + gradients + two AdamW moments in param_dtype, plus one layer's
materialised attention scores for the device's rows when no fused kernel runs; the compiler's TPU figures
show what it misses (MoE token buffers, the sampler's cache copies, optimizer state resident during
rollouts: 7-17 GiB per device on the MoE layouts). Check a GPU layout on its hardware with
`python -m agq_jax.aot --config=configs/NAME.py:LAYOUT` run on the GPU node itself (it compiles for
the local devices when the layout names no TPU topology; docs/launch.md, "Memory").
tests/test_configs.py uses these functions to keep the big configs' sharding from rotting.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
STATE_COPIES = 4          # params + grads + AdamW mu + nu, all in param_dtype (optim.mu_dtype unset)
KV_BYTES = 2              # bf16 KV cache entries
# Attention as XLA computes it without a fused kernel: fp32 logits + bf16 probabilities + fp32 gradient of
# the [heads, T, T] score matrix of one layer (remat keeps only one layer's live at a time).
SCORE_BYTES = 4 + 2 + 4


def load_config_module(path: str | os.PathLike):
    """A config file as a module (its MESH_LAYOUTS, DEFAULT_LAYOUT, get_config)."""
    path = pathlib.Path(path).resolve()
    name = f"agq_jax_config_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for attr in ("get_config", "MESH_LAYOUTS", "DEFAULT_LAYOUT"):
        if not hasattr(module, attr):
            raise AttributeError(f"{path}: a full-size config must define {attr}")
    return module


def abstract_params(cfg, dtype: str = "bfloat16", param_dtype: str = "float32"):
    """(graphdef, abstract nnx.State) of the full model: shapes and dtypes only, nothing allocated."""
    import jax.numpy as jnp
    from flax import nnx
    from agq_jax.models.qwen3 import Qwen3ForCausalLM
    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype),
                                                         param_dtype=jnp.dtype(param_dtype)))
    return nnx.split(abstract)


def abstract_mesh(sizes: dict[str, int]):
    import jax
    from jax.sharding import AxisType
    from agq_jax.models.sharding import MESH_AXES
    return jax.sharding.AbstractMesh(tuple(int(sizes[a]) for a in MESH_AXES), MESH_AXES,
                                     axis_types=(AxisType.Auto,) * len(MESH_AXES))


def param_table(abs_state, mesh) -> list[dict[str, Any]]:
    """One row per parameter: path, shape, logical axes, PartitionSpec, shard shape, bytes per device."""
    import numpy as np
    from flax import nnx
    from agq_jax.models.sharding import state_shardings
    shardings = dict(nnx.to_flat_state(state_shardings(abs_state, mesh)))
    rows = []
    for path, var in nnx.to_flat_state(abs_state):
        value = var.get_value()
        sharding = shardings[path].get_value()
        shard = sharding.shard_shape(value.shape)
        itemsize = np.dtype(value.dtype).itemsize
        rows.append(dict(path=".".join(map(str, path)), shape=tuple(value.shape),
                         logical=tuple(var.get_metadata().get("logical_axes") or ()),
                         spec=tuple(sharding.spec) + (None,) * (len(value.shape) - len(sharding.spec)),
                         shard=tuple(shard), size=int(math.prod(value.shape)),
                         device_bytes=int(math.prod(shard)) * itemsize, itemsize=itemsize))
    return rows


def divisibility_errors(rows, sizes: dict[str, int]) -> list[str]:
    """Dimensions whose mesh axes do not divide them (independent of the rule code that chose the axes)."""
    errors = []
    for r in rows:
        for dim, entry in zip(r["shape"], r["spec"]):
            axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
            n = math.prod(sizes[a] for a in axes)
            if dim % n:
                errors.append(f"{r['path']}: dim {dim} of {r['shape']} not divisible by {axes} = {n}")
    return errors


def active_params(cfg, rows) -> int:
    """Parameters a token touches: everything except the (E - k)/E unrouted share of expert weights."""
    total = 0
    for r in rows:
        if "expert" in r["logical"]:
            total += r["size"] * cfg.num_experts_per_tok // cfg.num_experts
        else:
            total += r["size"]
    return total


def kv_bytes_per_token(cfg, sizes: dict[str, int]) -> int:
    """bf16 K+V bytes per token of one sequence on one device (kv heads split over `tensor` when it divides)."""
    heads = cfg.num_key_value_heads
    heads_here = heads // sizes["tensor"] if heads % sizes["tensor"] == 0 else heads
    return cfg.num_hidden_layers * heads_here * cfg.head_dim * 2 * KV_BYTES


def attention_bytes_per_row(cfg, sizes: dict[str, int], seq_len: int) -> int:
    """Peak bytes of one row's materialised attention scores on one device (q heads split over `tensor`)."""
    heads = cfg.num_attention_heads
    heads_here = heads // sizes["tensor"] if heads % sizes["tensor"] == 0 else heads
    return heads_here * seq_len * seq_len * SCORE_BYTES


def plan(config_path: str | os.PathLike, layout: str | None = None, devices: int | None = None,
         _cache: dict | None = None) -> dict[str, Any]:
    """Memory and sharding summary of one layout of a config file (see the module docstring)."""
    from agq_jax.run_config import RunConfig, model_config
    from agq_jax.run_config.schema import HARDWARE

    module = load_config_module(config_path)
    ref = module.ref
    name = layout or module.DEFAULT_LAYOUT
    lay = ref.pick_layout(module.MESH_LAYOUTS, name)
    c = RunConfig.from_configdict(module.get_config(name))
    cfg = model_config(c, weights_optional=True)
    key = (cfg, c.model.param_dtype)
    cache = _cache if _cache is not None else {}
    if key not in cache:
        cache[key] = abstract_params(cfg, c.model.dtype, c.model.param_dtype)
    _, abs_state = cache[key]
    n = devices or lay.devices
    sizes = ref.mesh_shape(lay, n)
    rows = param_table(abs_state, abstract_mesh(sizes))
    hw = HARDWARE[lay.hardware]
    total = sum(r["size"] for r in rows)
    per_device = sum(r["device_bytes"] for r in rows)
    # Intended sharding: fsdp x tensor for every param, x expert for expert weights; `data` replicates.
    ideal = sum(r["size"] * r["itemsize"] / (sizes["fsdp"] * sizes["tensor"]
                                             * (sizes["expert"] if "expert" in r["logical"] else 1))
                for r in rows)
    state = STATE_COPIES * per_device
    kv_tok = kv_bytes_per_token(cfg, sizes)
    free = 0.9 * hw.hbm_bytes - state  # 10% for XLA scratch / fragmentation
    batch_shards = sizes["data"] * sizes["fsdp"]
    rows_per_device = c.rl.micro_batch_rows / batch_shards
    attention = attention_bytes_per_row(cfg, sizes, c.rollout.max_len) * math.ceil(rows_per_device)
    return dict(
        config=pathlib.Path(config_path).stem, layout=name, hardware=hw.description, devices=n, mesh=sizes,
        params=total, active_params=active_params(cfg, rows),
        param_bytes_per_device=per_device, replication_overhead=per_device / ideal - 1.0,
        train_state_bytes_per_device=state, hbm_bytes=hw.hbm_bytes, state_fraction=state / hw.hbm_bytes,
        kv_bytes_per_token=kv_tok, max_len=c.rollout.max_len,
        # Full-length KV caches in flight: per device, and over the mesh (a row lives on one batch shard).
        full_rollouts_per_device=max(0.0, free / (kv_tok * c.rollout.max_len)),
        full_rollouts_global=int(max(0.0, free / (kv_tok * c.rollout.max_len))) * batch_shards,
        batch_shards=batch_shards, micro_batch_rows=c.rl.micro_batch_rows, rows_per_device=rows_per_device,
        # train-step peak if attention is materialised (XLA path): state + one layer's score matrices
        attention_bytes_per_device=attention, train_peak_fraction=(state + attention) / hw.hbm_bytes,
        divisibility_errors=divisibility_errors(rows, sizes), rows=rows, model_config=cfg, run_config=c,
    )


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e9:7.1f} GB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="configs/NAME.py")
    ap.add_argument("--layout", default="all", help="a MESH_LAYOUTS name, or 'all' (default)")
    ap.add_argument("--devices", type=int, default=None, help="device count (default: the layout's own)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per layout")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))
    module = load_config_module(args.config)
    names = list(module.MESH_LAYOUTS) if args.layout == "all" else [args.layout]
    cache: dict = {}
    results = [plan(args.config, n, args.devices, cache) for n in names]
    if args.json:
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k not in ("rows", "model_config", "run_config")}))
        return 0
    r0 = results[0]
    print(f"{r0['config']}: {r0['params'] / 1e9:.2f}B params, {r0['active_params'] / 1e9:.2f}B active per token")
    print(f"{'layout':<11} {'devices':>7} {'mesh (data,fsdp,tensor,expert)':>31} {'params/dev':>11} "
          f"{'state/dev':>11} {'of HBM':>7} {'+attention':>11} {'KV rollouts':>12}")
    for r in results:
        m = r["mesh"]
        mesh = f"({m['data']},{m['fsdp']},{m['tensor']},{m['expert']})"
        print(f"{r['layout']:<11} {r['devices']:>7} {mesh:>31} {_fmt_bytes(r['param_bytes_per_device']):>11} "
              f"{_fmt_bytes(r['train_state_bytes_per_device']):>11} {r['state_fraction']:>6.0%} "
              f"{r['train_peak_fraction']:>10.0%} {r['full_rollouts_global']:>12d}")
        for e in r["divisibility_errors"]:
            print("   ERROR", e)
    print(f"(+attention: train state plus one layer's materialised {r0['max_len']}-token attention scores for the "
          f"micro-batch's rows, of HBM; KV rollouts: full-length KV caches that fit over the mesh beside the state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
