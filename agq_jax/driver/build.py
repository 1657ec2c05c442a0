"""What a run builds from its config before the first step: the mesh, the model, and the HF export; and the
model at one of a run's checkpoints (`python -m agq_jax.export`).

The model's architecture and training fields come from `agq_jax.run_config.model_config` (the one
derivation); with `model.hf_path` the weights load straight into their shardings.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from agq_jax.tokenizer import SpecialIds


def vocab_info(rc, tok, ids: SpecialIds):
    """(size, pad, eos ids) of a procedural tokenizer, what model_config needs; None for the real one."""
    if rc.tokenizer.kind != "procedural":
        return None
    return len(tok), ids.pad, (ids.im_end, ids.endoftext)


def make_mesh(rc):
    """The training mesh, or None on a single device / with mesh.enabled off."""
    m = rc.mesh
    if not m.enabled or jax.device_count() == 1:
        return None
    from agq_jax.models import sharding

    return sharding.make_mesh(sharding.MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor, expert=m.expert))


def _device_bytes() -> float:
    """Memory of one local device: the accelerator's limit, or host RAM shared by the CPU devices."""
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() or {}
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / max(len(jax.local_devices()), 1)


def preflight(rc, mcfg, mesh) -> None:
    """Fail before any weight is loaded when the train state cannot fit: per device, the params, their
    gradients and the two AdamW moments (the least training allocates), against the device's memory. The
    error names the layout and the tools that check a config without its hardware."""
    from agq_jax.models.hf_io import abstract_model
    from agq_jax.run_config.schema import HARDWARE

    pdtype = jnp.dtype(rc.model.param_dtype)
    _, abstract = abstract_model(mcfg, jnp.dtype(rc.model.dtype), pdtype)
    leaves = jax.tree.leaves(abstract)
    if mesh is None:
        per_device = sum(x.size * x.dtype.itemsize for x in leaves)
    else:
        from agq_jax.models.sharding import state_shardings

        shards = jax.tree.leaves(state_shardings(abstract, mesh))
        per_device = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shards))
    mu = jnp.dtype(rc.optim.mu_dtype).itemsize / pdtype.itemsize if rc.optim.mu_dtype else 1.0
    need, have = per_device * (3 + mu), _device_bytes()
    if need <= 0.9 * have:
        return
    n = sum(x.size for x in leaves)
    hw = HARDWARE.get(rc.mesh.hardware)
    sized = (f" Layout {rc.mesh.layout!r} is sized for {hw.description} devices ({hw.hbm_bytes / 2**30:.0f} GiB "
             f"each)." if hw is not None and rc.mesh.layout else "")
    raise MemoryError(
        f"config {rc.name!r}: the model ({n / 1e9:.2f}B params) needs {need / 2**30:.1f} GiB per device for its "
        f"train state (params + grads + 2 AdamW moments in {rc.model.param_dtype}, over "
        f"{jax.device_count()} {jax.default_backend()} device(s)) but a device here has "
        f"{have / 2**30:.1f} GiB.{sized} Check a layout's fit without its hardware with "
        f"`python -m agq_jax.aot --config=configs/NAME.py:LAYOUT`, or run this config's code path at toy size on "
        f"a CPU with `--config=configs/NAME.py:cpu-smoke`.")


def build_model(rc, tok, ids: SpecialIds, mesh=None):
    """The policy: the HF checkpoint at model.hf_path (sharded as it loads), else a random init seeded by
    `seed`; either way with the config model_config derives (training fields and overrides included).
    Checks first that the train state fits (preflight)."""
    from agq_jax.models import qwen3
    from agq_jax.run_config import model_config

    mcfg = model_config(rc, vocab=vocab_info(rc, tok, ids))
    preflight(rc, mcfg, mesh)
    dtype, pdtype = jnp.dtype(rc.model.dtype), jnp.dtype(rc.model.param_dtype)
    if rc.model.hf_path:
        return qwen3.from_pretrained(rc.model.hf_path, dtype=dtype, mesh=mesh, param_dtype=pdtype, config=mcfg)
    make = lambda: qwen3.Qwen3ForCausalLM(mcfg, rngs=nnx.Rngs(rc.seed), dtype=dtype, param_dtype=pdtype)  # noqa: E731
    if mesh is None:
        return make()
    from agq_jax.models import sharding

    return sharding.create_sharded_model(make, mesh)


def startup_banner(rc, model, mesh, teachers) -> str:
    """What a run is about to train, on what, with which teachers (printed once; warns when the layout was
    sized for another platform than the one jax runs on)."""
    from agq_jax.models.attention import resolve_attention_impl
    from agq_jax.models.moe import resolve_moe_impl
    from agq_jax.run_config.schema import HARDWARE

    cfg = model.config
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    t = rc.rollout.max_len
    attn = resolve_attention_impl(cfg.attention_impl, t, t, True, dtype=model.dtype, head_dim=cfg.head_dim)
    source = rc.model.hf_path or f"random init of {rc.model.preset or 'model.overrides'}"
    m = rc.mesh
    axes = "x".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names) if mesh is not None else "one device"
    lines = [f"[{rc.name}] {cfg.model_type} {n / 1e9:.3g}B params from {source}; compute {rc.model.dtype}, "
             f"masters {rc.model.param_dtype}, remat {cfg.remat}, attention {cfg.attention_impl} ({attn} for "
             f"{t}-token rows), MoE " + (f"{cfg.moe_impl} ({resolve_moe_impl(cfg.moe_impl)})" if cfg.is_moe else "-"),
             f"[{rc.name}] mesh {axes} on {jax.device_count()} {jax.default_backend()} device(s)"
             + (f", layout {m.layout!r}" if m.layout else ""),
             f"[{rc.name}] teachers: " + (", ".join(f"{r}={e.model}" for r, e in sorted(teachers.endpoints.items()))
                                         if teachers is not None else "none (offline world and procedural data)")]
    hw = HARDWARE.get(m.hardware)
    if hw is not None and hw.platform not in ("cpu", jax.default_backend()):
        lines.append(f"[{rc.name}] WARNING: layout {m.layout!r} is sized for {hw.description} ({hw.platform}); "
                     f"jax runs on {jax.default_backend()}")
    return "\n".join(lines)


def loss_temperature(rl) -> float:
    """The temperature the trainer's log-probs use: the sampler's, when sampling was plain temperature
    sampling (no top-k / top-p truncation); else 1 (the sampler's own log-probs are used for the ratio)."""
    plain = rl.top_k == 0 and rl.top_p >= 1.0
    return rl.temperature if plain else 1.0


def rollout_config(rc):
    """The rollout loop's limits from the run config (the sampler's episodes and the train step's bound on
    loss tokens per row both come from here)."""
    from agq_jax.rollout import RolloutConfig

    r = rc.rollout
    return RolloutConfig(max_len=r.max_len, max_new_tokens_per_turn=r.max_new_tokens_per_turn or None,
                         max_response_tokens=r.max_response_tokens or None, max_turns=rc.env.max_agent_turns + 1,
                         enable_thinking=r.enable_thinking, max_workers=r.max_workers)


def trainer_configs(rc, kind: str):
    """(OptimConfig, LossConfig, StepConfig) of the SFT or the GRPO trainer: every knob the train step
    reads, taken from the run config here and nowhere else (the compile-ahead tool uses this too)."""
    from agq_jax.rl.optim import OptimConfig
    from agq_jax.rl.step import LossConfig, StepConfig

    o, rl = rc.optim, rc.rl
    moments = dict(b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm or None,
                   mu_dtype=o.mu_dtype or None)
    if kind == "sft":
        s = rc.sft
        optim = OptimConfig(learning_rate=s.learning_rate, warmup_steps=s.warmup_steps, decay=s.decay,
                            total_steps=max(s.steps, 1), **moments)
        # gold episodes obey the rollout's limits too (one that does not trains on every position)
        loss = LossConfig(stage="sft", loss_agg=s.loss_agg, logprob_chunk=rl.logprob_chunk,
                          scored_tokens=rollout_config(rc).max_policy_tokens)
        steps = StepConfig(ppo_epochs=1, mini_batch_size=None, micro_batch_size=s.micro_batch_rows or None,
                           shuffle=False, seed=rc.seed)
        return optim, loss, steps
    if kind != "grpo":
        raise ValueError(f"trainer kind {kind!r}: expected 'sft' or 'grpo'")
    updates = rl.ppo_epochs * (rl.tasks_per_step // rl.mini_batch_tasks)
    total = o.total_steps or max(rl.steps_per_round * rc.rounds * updates, 1)
    optim = OptimConfig(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, decay=o.decay,
                        total_steps=total, min_lr_ratio=o.min_lr_ratio, **moments)
    loss = LossConfig(stage="grpo", policy_loss=rl.policy_loss, clip_low=rl.clip_low, clip_high=rl.clip_high,
                      dual_clip_c=rl.dual_clip_c or None, gspo_clip_low=rl.gspo_clip_low,
                      gspo_clip_high=rl.gspo_clip_high, loss_agg=rl.loss_agg, kl_coef=rl.kl_coef,
                      kl_estimator=rl.kl_estimator, entropy_coef=rl.entropy_coef, temperature=loss_temperature(rl),
                      logprob_chunk=rl.logprob_chunk, scored_tokens=rollout_config(rc).max_policy_tokens)
    steps = StepConfig(ppo_epochs=rl.ppo_epochs, mini_batch_size=rl.mini_batch_tasks * rl.group_size,
                       micro_batch_size=rl.micro_batch_rows or None, shuffle=True, seed=rc.seed)
    return optim, loss, steps


def export_hf(model, rc, run_dir: str, out_dir: str) -> str:
    """HF directory (safetensors + config + the run's tokenizer files) that transformers loads."""
    from agq_jax.models import qwen3

    tok_dir = os.path.join(run_dir, "tokenizer") if rc.tokenizer.kind == "procedural" else None
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    qwen3.save_pretrained(model, out_dir, tokenizer_dir=tok_dir, max_shard_bytes=rc.export.max_shard_bytes)
    return out_dir


def run_checkpoint(path) -> tuple[Path, int] | None:
    """(run dir, step) when `path` is a training run's directory (its latest checkpoint) or one of its
    `checkpoints/<step>` directories; None otherwise."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        from agq_jax.rl.checkpoint import CheckpointManager

        with CheckpointManager(path / "checkpoints", async_save=False) as mngr:
            step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"run {path} has no complete checkpoint under {path / 'checkpoints'}")
        return path, step
    if path.name.isdigit() and path.parent.name == "checkpoints" and (path.parent.parent / "config.json").is_file():
        return path.parent.parent, int(path.name)
    return None


def load_run_model(run_dir, step: int):
    """(model, run config) at checkpoint `step` of the run in `run_dir`: the run's own config and vocabulary,
    the policy's weights only (not the optimizer moments), on the run's mesh when this host has its devices,
    else on one device."""
    from agq_jax.driver.vocab import load_run_tokenizer
    from agq_jax.models.hf_io import abstract_model
    from agq_jax.models.sharding import state_shardings
    from agq_jax.rl.checkpoint import CheckpointManager
    from agq_jax.run_config import RunConfig, model_config

    run_dir = Path(run_dir)
    rc = RunConfig.from_configdict(json.loads((run_dir / "config.json").read_text()))
    tok = load_run_tokenizer(rc.tokenizer, run_dir, is_writer=False)
    mcfg = model_config(rc, vocab=vocab_info(rc, tok, SpecialIds.of(tok)))
    try:
        mesh = make_mesh(rc)
    except ValueError as e:  # trained on more devices than this host has: the weights fit one for export
        print(f"[export] not on the run's mesh ({e}); restoring onto one device", flush=True)
        mesh = None
    graphdef, abstract = abstract_model(mcfg, jnp.dtype(rc.model.dtype), jnp.dtype(rc.model.param_dtype))
    params, rest = abstract.split(nnx.Param, ...)  # as the trainer splits it: its state's .params
    if mesh is not None:
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                              state_shardings(params, mesh))
    with CheckpointManager(run_dir / "checkpoints", async_save=False) as mngr:
        params = mngr.restore_subtree("train", ".params", params, step)
        if jax.tree.leaves(rest):
            rest = mngr.restore_subtree("train", ".model_state", rest, step)
    return nnx.merge(graphdef, params, rest), rc
