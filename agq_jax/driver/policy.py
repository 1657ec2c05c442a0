"""The policy side of the driver: model construction from the config, the sampler, rollouts, HF export."""
from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
from flax import nnx

from agq_jax.driver.vocab import SpecialIds


def model_config(cfg, tok, ids: SpecialIds):
    """Qwen3Config from cfg.model (preset + overrides); a procedural vocabulary sets the vocab and token ids."""
    from agq_jax.models.config import PRESETS, Qwen3Config

    m = cfg.model
    if m.preset and m.preset not in PRESETS:
        raise ValueError(f"config model.preset={m.preset!r} is not one of {sorted(PRESETS)}")
    base = PRESETS[m.preset] if m.preset else Qwen3Config()
    fields = {f.name for f in dataclasses.fields(Qwen3Config)}
    over = dict(m.overrides)
    bad = sorted(set(over) - fields)
    if bad:
        raise ValueError(f"config model.overrides has unknown Qwen3Config fields {bad}")
    over.update(remat=m.remat, attention_impl=m.attention_impl, moe_impl=m.moe_impl)
    if cfg.tokenizer.kind == "procedural":
        over.update(vocab_size=-(-len(tok) // 64) * 64, bos_token_id=None, eos_token_id=(ids.im_end, ids.endoftext),
                    pad_token_id=ids.pad, torch_dtype="float32")
    for k in ("eos_token_id", "mlp_only_layers"):
        if isinstance(over.get(k), list):
            over[k] = tuple(over[k])
    return dataclasses.replace(base, **over)


def build_model(cfg, tok, ids: SpecialIds, mesh=None):
    """Random init of cfg.model (seeded by cfg.seed) or the HF checkpoint at cfg.model.hf_path."""
    from agq_jax.models import qwen3

    dtype, pdtype = jnp.dtype(cfg.model.dtype), jnp.dtype(cfg.model.param_dtype)
    if cfg.model.hf_path:
        return qwen3.from_pretrained(cfg.model.hf_path, dtype=dtype, mesh=mesh, param_dtype=pdtype)
    mcfg = model_config(cfg, tok, ids)
    make = lambda: qwen3.Qwen3ForCausalLM(mcfg, rngs=nnx.Rngs(int(cfg.seed)), dtype=dtype, param_dtype=pdtype)  # noqa: E731
    if mesh is None:
        return make()
    from agq_jax.models import sharding

    return sharding.create_sharded_model(make, mesh)


def make_mesh(cfg):
    """The training mesh, or None on a single device / when cfg.mesh.enabled is off."""
    if not cfg.mesh.get("enabled", True) or jax.device_count() == 1:
        return None
    from agq_jax.models import sharding

    m = cfg.mesh
    return sharding.make_mesh(sharding.MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor, expert=m.expert))


_SAMPLERS: dict = {}


def shared_sampler(model, *, mesh, pad_id: int, chunk_size: int):
    """One Sampler per (architecture, mesh, pad id, chunk): a Sampler holds only the graphdef and its jitted
    prefill/decode (weights are call arguments), so drivers built in the same process (a resumed run, the
    SFT-only vs GRPO comparison, tests) reuse the compiled executables instead of recompiling them."""
    from agq_jax.rollout import Sampler

    graphdef, _ = nnx.split(model)
    key = (graphdef, id(mesh) if mesh is not None else None, int(pad_id), int(chunk_size))
    try:
        hit = _SAMPLERS.get(key)
    except TypeError:  # an unhashable graphdef: no sharing
        return Sampler(model, mesh=mesh, pad_id=pad_id, chunk_size=chunk_size)
    if hit is None or hit.mesh is not mesh:
        hit = _SAMPLERS[key] = Sampler(model, mesh=mesh, pad_id=pad_id, chunk_size=chunk_size)
    return hit


class Policy:
    """Samples episodes from the live model: `policy.model` is swapped in after every train step."""

    def __init__(self, cfg, model, tok, ids: SpecialIds, mesh=None):
        from agq_jax.rollout import RolloutConfig

        self.cfg, self.model, self.tok, self.ids, self.mesh = cfg, model, tok, ids, mesh
        self.sampler = shared_sampler(model, mesh=mesh, pad_id=ids.pad, chunk_size=int(cfg.rollout.get("chunk_size", 256)))
        r = cfg.rollout
        self.rollout_cfg = RolloutConfig(max_len=int(r.max_len),
                                         max_new_tokens_per_turn=int(r.max_new_tokens_per_turn) or None,
                                         max_turns=int(r.max_agent_turns) + 1, enable_thinking=bool(r.enable_thinking),
                                         max_workers=int(r.max_workers))
        self._pool = None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.ids.im_end, self.ids.tool_call_end) if self.cfg.rollout.stop_on_tool_call else (self.ids.im_end,)

    def sampling(self, *, greedy: bool = False, temperature: float | None = None):
        from agq_jax.rollout import SamplingParams

        rl = self.cfg.rl
        if greedy:
            return SamplingParams(temperature=0.0, stop_ids=self.stop_ids)
        t = float(rl.temperature if temperature is None else temperature)
        return SamplingParams(temperature=t, top_p=float(rl.top_p), top_k=int(rl.top_k), stop_ids=self.stop_ids)

    def rollouts(self, envs, *, params, rng, group_ids):
        import concurrent.futures as cf

        from agq_jax.driver.data import score_env
        from agq_jax.rollout import run_rollouts

        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=int(self.cfg.rollout.max_workers))
        return run_rollouts(self.sampler, self.model, envs, self.tok, params=params, config=self.rollout_cfg,
                            rng=rng, group_ids=group_ids, score_fn=score_env, executor=self._pool)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def export_hf(model, cfg, run_dir: str, out_dir: str) -> str:
    """HF directory (safetensors + config + the run's tokenizer files) that transformers loads."""
    from agq_jax.models import qwen3

    tok_dir = os.path.join(run_dir, "tokenizer") if cfg.tokenizer.kind == "procedural" else None
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    qwen3.save_pretrained(model, out_dir, tokenizer_dir=tok_dir, max_shard_bytes=int(cfg.export.max_shard_bytes))
    return out_dir
