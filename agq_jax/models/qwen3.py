"""Qwen3 dense and Qwen3-MoE causal LM in Flax NNX (the same function as HF transformers' Qwen3).

Layers of one kind are stored stacked ([layers, ...] params) and run with `jax.lax.scan`, so compile time does
not grow with depth; heterogeneous MoE models (mlp_only_layers / decoder_sparse_step) get one scan per run of
same-kind layers. The KV cache keeps per-row lengths so ragged batches decode together.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agq_jax.models import moe
from agq_jax.models.attention import cache_attention, causal_attention, write_layer
from agq_jax.models.config import PRESETS, Qwen3Config
from agq_jax.models.sharding import annotated_param, cache_sharding, constrain

__all__ = ["Qwen3Config", "PRESETS", "Qwen3ForCausalLM", "KVCache", "CausalLMOutput", "init_cache", "cache_shape",
           "from_pretrained", "save_pretrained", "apply_rope", "rope_cos_sin", "split_layer_stacks", "merge_split"]


class KVCache(NamedTuple):
    """k, v: [num_layers, B, num_kv_heads, max_len, head_dim]; lengths: [B] int32 valid tokens per row.

    Slots and head_dim are the two minor dims, the ones TPU tiles (8/16 x 128): with the heads there, a chip
    holding 2 or 4 KV heads re-laid the whole cache out around every write, and decode transposed each
    layer's K/V before attending (the compiler's figures in docs/performance.md)."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def cache_shape(cfg: Qwen3Config, batch: int, max_len: int) -> tuple[int, ...]:
    return (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)


class CausalLMOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] compute dtype
    hidden: jax.Array  # [B, T, H] final-normed hidden states
    cache: KVCache | None
    aux_loss: jax.Array  # [] router_aux_loss_coef * HF load-balancing loss (0.0 for dense)


def init_cache(cfg: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32, mesh=None) -> KVCache:
    """Empty cache; with `mesh`, k/v are created sharded (batch over data/fsdp, kv heads over tensor)."""
    shape = cache_shape(cfg, batch, max_len)
    if mesh is None:
        k = jnp.zeros(shape, dtype)
        v = jnp.zeros(shape, dtype)
    else:
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=cache_sharding(mesh, shape))
        k, v = zeros(), zeros()
    return KVCache(k, v, jnp.zeros((batch,), jnp.int32))


# ---- functional pieces -----------------------------------------------------------------------------

def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype):
    """HF default RoPE tables for positions [B,T] -> cos, sin [B,T,head_dim] (computed in fp32, cast)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B,T,N,D]; HF rotate_half convention (first half / second half of the head dim)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ---- modules ---------------------------------------------------------------------------------------

class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype, stack: int | None = None):
        self.weight = annotated_param(nnx.initializers.ones, rngs, (dim,), ("norm",), param_dtype, stack)
        self.eps = eps

    def __call__(self, x):
        dt = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dt) * xf.astype(dt)


class Attention(nnx.Module):
    """GQA with per-head RMSNorm on q and k before RoPE (Qwen3)."""

    def __init__(self, cfg: Qwen3Config, *, rngs, dtype, param_dtype, stack=None):
        h, n, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        init = nnx.initializers.normal(cfg.initializer_range)
        self.q_proj = annotated_param(init, rngs, (h, n, d), ("embed", "heads", "head_dim"), param_dtype, stack)
        self.k_proj = annotated_param(init, rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype, stack)
        self.v_proj = annotated_param(init, rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype, stack)
        self.o_proj = annotated_param(init, rngs, (n, d, h), ("heads", "head_dim", "embed"), param_dtype, stack)
        self.use_bias = cfg.attention_bias
        if cfg.attention_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = annotated_param(zeros, rngs, (n, d), ("heads", "head_dim"), param_dtype, stack)
            self.k_bias = annotated_param(zeros, rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, stack)
            self.v_bias = annotated_param(zeros, rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, stack)
            self.o_bias = annotated_param(zeros, rngs, (h,), ("norm",), param_dtype, stack)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype, stack=stack)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype, stack=stack)
        self.scale = d ** -0.5
        self.impl = cfg.attention_impl

    def __call__(self, x, cos, sin, mask, valid, kv=None, starts=None):
        """kv: None, or (k_all, v_all, layer) — the whole cache and this layer's index in it."""
        dt = x.dtype
        q = jnp.einsum("bth,hnd->btnd", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("bth,hkd->btkd", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("bth,hkd->btkd", x, self.v_proj[...].astype(dt))
        if self.use_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        q = constrain(apply_rope(self.q_norm(q), cos, sin), ("batch", "seq", "act_heads", "head_dim"))
        k = constrain(apply_rope(self.k_norm(k), cos, sin), ("batch", "seq", "act_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "act_kv_heads", "head_dim"))
        if kv is not None:
            k_all, v_all, layer = kv
            k_all, v_all = write_layer(k_all, layer, k, starts), write_layer(v_all, layer, v, starts)
            kv = (k_all, v_all, layer)
            out = cache_attention(q, k_all, v_all, layer, mask, self.scale, jnp.max(starts) + q.shape[1], self.impl)
        else:  # no cache: causal over the row's real keys
            out = causal_attention(q, k, v, valid, self.scale, self.impl)
        y = jnp.einsum("btnd,ndh->bth", out, self.o_proj[...].astype(dt))
        if self.use_bias:
            y = y + self.o_bias[...].astype(dt)
        return y, kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen3Config, *, rngs, dtype, param_dtype, stack=None):
        h, i = cfg.hidden_size, cfg.intermediate_size
        init = nnx.initializers.normal(cfg.initializer_range)
        self.gate_proj = annotated_param(init, rngs, (h, i), ("embed", "mlp"), param_dtype, stack)
        self.up_proj = annotated_param(init, rngs, (h, i), ("embed", "mlp"), param_dtype, stack)
        self.down_proj = annotated_param(init, rngs, (i, h), ("mlp", "embed"), param_dtype, stack)

    def __call__(self, x):
        dt = x.dtype
        g = x @ self.gate_proj[...].astype(dt)
        u = x @ self.up_proj[...].astype(dt)
        hmid = constrain(jax.nn.silu(g) * u, ("batch", "seq", "act_mlp"))
        return hmid @ self.down_proj[...].astype(dt)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, is_moe: bool, *, rngs, dtype, param_dtype, stack=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, stack=stack)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, dtype=dtype, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.is_moe = is_moe
        self.mlp = moe.SparseMoeBlock(cfg, dtype=dtype, **kw) if is_moe else MLP(cfg, dtype=dtype, **kw)

    def __call__(self, x, cos, sin, mask, valid, kv=None, starts=None, stacked_layer=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, valid, kv, starts)
        x = x + a
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            m, stats = self.mlp(h, valid, stacked_layer)
        else:
            m, stats = self.mlp(h), None
        x = constrain(x + m, ("batch", "seq", "act_embed"))
        return x, kv, stats


_REMAT = {"full": jax.checkpoint_policies.nothing_saveable,
          "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _is_expert_param(path) -> bool:
    return any(getattr(k, "key", None) in moe.EXPERT_PARAMS for k in path)


def split_weights_for_inference(backend: str | None = None) -> bool:
    """Whether inference callers (the Sampler) should pass the weights split per layer (`split_layer_stacks`).

    Why on CPU: XLA:CPU copies a (dynamic) slice of a stacked weight into a fresh buffer before a dot reads
    it, so a scanned decode step writes and re-reads every layer's weights (measured ~3x the memory traffic
    of a batch-1 step). A model merged from split weights (`merge_split`) runs its layers as a Python loop
    over static indices; XLA simplifies slice(concatenate(per-layer args)) to the argument and the dots read
    the weights in place. GPU / TPU compilers fuse the slice into the matmul: the scan stays there."""
    return (backend or jax.default_backend()) == "cpu"


def _in_layer_stack(path) -> bool:
    return any(getattr(k, "key", None) == "blocks" for k in path)


def split_layer_stacks(state):
    """The model state with every stacked layer param [L, ...] as a tuple of L per-layer arrays: one copy,
    made outside jit once per weight version."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: tuple(x[i] for i in range(x.shape[0])) if _in_layer_stack(p) else x, state)


def merge_split(graphdef, split_state) -> "Qwen3ForCausalLM":
    """Inside jit: the model over a `split_layer_stacks` state, with its layer stacks unrolled."""
    state = jax.tree.map(lambda x: jnp.stack(x) if isinstance(x, tuple) else x, split_state,
                         is_leaf=lambda x: isinstance(x, tuple))
    model = nnx.merge(graphdef, state)
    for block in model.blocks:
        block.unrolled = True
    return model


class LayerStack(nnx.Module):
    """`count` same-kind decoder layers with stacked params, run by one `lax.scan`."""

    def __init__(self, cfg: Qwen3Config, is_moe: bool, count: int, *, rngs, dtype, param_dtype):
        self.layer = DecoderLayer(cfg, is_moe, rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=count)
        self.is_moe = is_moe
        self.count = count
        self.num_experts = cfg.num_experts
        self.remat = cfg.remat
        self.scan = cfg.scan_layers
        self.unrolled = False  # set by `merge_split` (weights passed per layer)

    def __call__(self, x, cos, sin, mask, valid, kv=None, starts=None, first_layer=0):
        """kv: None or the whole cache (k_all, v_all); this run's layers live at first_layer + i."""
        graphdef, state = nnx.split(self.layer)
        stats0 = moe.RouterStats.zeros(self.num_experts) if self.is_moe else None
        cache0 = None if kv is None else (kv[0], kv[1], jnp.asarray(first_layer, jnp.int32))
        unrolled = self.unrolled
        # Inference with the CPU expert kernels: the scan would copy each layer's whole expert stack out of
        # the stacked params before the loop reads the few experts a step selects (XLA:CPU materialises a
        # dynamic slice feeding a dot); instead the experts stay stacked, loop-invariant, and the kernels index
        # [layer, expert] directly. Not for training: the closed-over stack would get a full-size gradient
        # per layer.
        stacked_experts = (kv is not None and not unrolled and self.is_moe
                           and moe.resolve_moe_impl(self.layer.mlp.impl) == "tiled")
        if stacked_experts:
            full = state
            state = jax.tree_util.tree_map_with_path(
                lambda p, a: jnp.zeros((self.count,), a.dtype) if _is_expert_param(p) else a, state)

        def body(carry, layer_state):
            h, stats, cache = carry
            kw = {}
            if stacked_experts:
                layer_state = jax.tree_util.tree_map_with_path(
                    lambda p, a, f: f if _is_expert_param(p) else a, layer_state, full)
                kw = dict(stacked_layer=cache[2] - first_layer)
            h, cache, st = nnx.merge(graphdef, layer_state)(h, cos, sin, mask, valid, cache, starts, **kw)
            if self.is_moe:
                stats = stats + st
            if cache is not None:
                cache = (cache[0], cache[1], cache[2] + 1)
            return (h, stats, cache), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT[self.remat], prevent_cse=not self.scan)
        carry = (x, stats0, cache0)
        if self.scan and not unrolled:
            carry, _ = jax.lax.scan(body, carry, state)
        else:
            for i in range(self.count):
                carry, _ = body(carry, jax.tree.map(lambda a: a[i], state))
        x, stats, cache = carry
        return x, None if cache is None else cache[:2], stats


class Qwen3ForCausalLM(nnx.Module):
    """Qwen3 / Qwen3-MoE causal LM; see docs/ARCHITECTURE.md "Model contract"."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.param_dtype = param_dtype
        init = nnx.initializers.normal(cfg.initializer_range)
        self.embed_tokens = annotated_param(init, rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                            param_dtype)
        self.groups = cfg.layer_groups()
        self.blocks = nnx.List([LayerStack(cfg, is_moe, count, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for is_moe, _, count in self.groups])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = annotated_param(init, rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                           param_dtype)

    def unembed(self) -> jax.Array:
        """[H, V] LM-head matrix in the compute dtype (tied: embedding transposed)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens[...].T.astype(self.dtype)
        return self.lm_head[...].astype(self.dtype)

    def hidden_states(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None):
        """-> (final-normed hidden [B,T,H], updated cache or None, aux_loss scalar)."""
        cfg = self.config
        b, t = input_ids.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            if positions is None:
                positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)
            mask = None  # built per layer from `valid` (or not at all: splash), never held across the layer scan
            starts = None
        else:
            starts = cache.lengths.astype(jnp.int32)
            if positions is None:
                positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
            new_len = starts + jnp.sum(valid, axis=-1, dtype=jnp.int32)
            slot = jnp.arange(cache.max_len, dtype=jnp.int32)
            qpos = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
            mask = ((slot[None, None, :] <= qpos[:, :, None]) & (slot[None, None, :] < new_len[:, None, None]))[:, None]
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "seq", "act_embed"))
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.dtype)

        stats = moe.RouterStats.zeros(cfg.num_experts) if cfg.num_moe_layers else None
        kv = None if cache is None else (cache.k, cache.v)
        for (_, start, _), block in zip(self.groups, self.blocks):
            x, kv, st = block(x, cos, sin, mask, valid, kv, starts, first_layer=start)
            if st is not None:
                stats = stats + st
        hidden = self.norm(x)
        new_cache = None if cache is None else KVCache(kv[0], kv[1], new_len)
        aux = jnp.zeros((), jnp.float32)
        if stats is not None:
            aux = cfg.router_aux_loss_coef * moe.load_balancing_loss(stats, cfg.num_experts)
        return hidden, new_cache, aux

    def __call__(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None
                 ) -> CausalLMOutput:
        hidden, cache, aux = self.hidden_states(input_ids, attention_mask, positions, cache)
        logits = jnp.einsum("bth,hv->btv", hidden, self.unembed())
        logits = constrain(logits, ("batch", "seq", "act_vocab"))
        return CausalLMOutput(logits, hidden, cache, aux)


def from_pretrained(path, dtype=jnp.float32, mesh=None, param_dtype=None, config=None, **config_overrides):
    """Load an HF Qwen3 / Qwen3-MoE directory (see hf_io.from_pretrained)."""
    from agq_jax.models import hf_io
    return hf_io.from_pretrained(path, dtype=dtype, mesh=mesh, param_dtype=param_dtype, config=config,
                                 **config_overrides)


def save_pretrained(model, out_dir, tokenizer_dir=None, max_shard_bytes=None, **kwargs):
    """Write an HF-format directory (see hf_io.save_pretrained)."""
    from agq_jax.models import hf_io
    if max_shard_bytes is not None:
        kwargs["max_shard_bytes"] = max_shard_bytes
    return hf_io.save_pretrained(model, out_dir, tokenizer_dir=tokenizer_dir, **kwargs)
