"""Attention kernels behind one entry point, `attention`, and the KV-cache variant `cache_attention`.

`models/qwen3.py` calls these; which kernel runs is chosen here from the config's `attention_impl` and the
backend: XLA's attention (the oracle), cuDNN flash attention on GPU, Pallas splash attention on TPU, and
blocked kernels tuned for CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from agq_jax.models.config import ATTENTION_IMPLS
from agq_jax.models.sharding import MESH_AXES, logical_to_pspec, target_platform

__all__ = ["attention", "causal_attention", "causal_mask", "cache_attention", "write_layer", "resolve_attention_impl", "resolve_cache_attention_impl",
           "blocked_causal_attention", "cached_blocked_attention", "splash_causal_attention", "ATTENTION_BLOCK",
           "ATTENTION_SEGMENTS", "AUTO_BLOCKED_MIN_BLOCKS", "CACHE_KEY_BLOCK", "SPLASH_BLOCK"]


# Blocked causal attention, tuned on a 2-core x86 CPU (docs/performance.md): 64-row query blocks keep each
# block's [B, N, 64, keys] fp32 scores cache-sized; blocks are grouped into at most 4 segments, each one
# `lax.map` over its blocks with the segment's key extent, so compile time does not grow with T.
ATTENTION_BLOCK = 64
ATTENTION_SEGMENTS = 4
# "auto" uses the blocked path on CPU once a training sequence spans at least this many blocks.
AUTO_BLOCKED_MIN_BLOCKS = 2
CACHE_KEY_BLOCK = 128  # key slots per step of `cached_blocked_attention`
# Splash attention's query / key block (forward and both backward kernels) on TPU; shorter rows use the
# smallest multiple of 128 that holds them.
SPLASH_BLOCK = 512


def resolve_attention_impl(impl: str, q_len: int, kv_len: int, causal: bool, *, dtype=None, head_dim: int = 0,
                           backend: str | None = None) -> str:
    """The implementation `attention` runs.

    "auto": on CPU a causal no-cache sequence of >= 2 blocks -> "blocked"; on TPU a causal no-cache sequence
    -> "splash"; on GPU with bf16/fp16 q, head_dim <= 128 and a multiple of 8, even lengths (cuDNN's limits
    with a mask-derived bias) -> "cudnn"; else "xla". (jax.nn.dot_product_attention(implementation=None)
    itself always runs XLA in this jax version.) "blocked" / "splash" without a causal square mask (KV-cache
    prefill / decode) -> "xla". `backend` defaults to the platform the program is traced for."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r}; expected one of {ATTENTION_IMPLS}")
    square = causal and q_len == kv_len
    if impl == "auto":
        backend = backend or target_platform()
        if backend == "cpu" and square and q_len >= AUTO_BLOCKED_MIN_BLOCKS * ATTENTION_BLOCK:
            return "blocked"
        if backend == "tpu" and square:
            return "splash"
        half = dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        if backend == "gpu" and half and 0 < head_dim <= 128 and head_dim % 8 == 0 and q_len % 2 == 0 \
                and kv_len % 2 == 0:
            return "cudnn"
        return "xla"
    if impl in ("blocked", "splash") and not square:
        return "xla"
    return impl


def resolve_cache_attention_impl(impl: str, backend: str | None = None) -> str:
    """With a KV cache (sampler prefill / decode): "blocked" (`cached_blocked_attention`) for "auto" /
    "blocked" on CPU, else "buffer": `attention(impl)` over the layer's whole cache buffer (XLA / cuDNN)."""
    if impl in ("auto", "blocked") and (backend or target_platform()) == "cpu":
        return "blocked"
    return "buffer"


def attention(q, k, v, mask, scale: float, impl: str = "xla", causal: bool = False):
    """The one attention entry point: q [B,T,N,D], k/v [B,S,K,D] (GQA), mask [B,1,T,S] bool -> [B,T,N,D].

    `causal=True` promises S == T and mask[b, 0, t, s] = (s <= t) & key_valid[b, s] (the no-cache forward):
    "blocked" then skips key blocks, cuDNN gets its causal mask type on top of the mask and splash reads the
    key validity off the mask's last row. impl: "xla" (jax's XLA attention), "cudnn" (cuDNN flash attention,
    GPU, bf16/fp16), "splash" (Pallas splash attention, TPU), "blocked" (below), "auto" (see
    `resolve_attention_impl`)."""
    impl = resolve_attention_impl(impl, q.shape[1], k.shape[1], causal, dtype=q.dtype, head_dim=q.shape[-1])
    if impl == "blocked":
        return blocked_causal_attention(q, k, v, mask, scale)
    if impl == "splash":
        return splash_causal_attention(q, k, v, mask[:, 0, -1, :], scale)
    if impl == "cudnn":
        square = causal and q.shape[1] == k.shape[1]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=square, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def causal_mask(key_valid):
    """[B,1,T,T] bool: query t sees key s <= t when key s is real (key_valid [B,T])."""
    idx = jnp.arange(key_valid.shape[1])
    return ((idx[None, :] <= idx[:, None])[None] & key_valid[:, None, :])[:, None]


def causal_attention(q, k, v, key_valid, scale: float, impl: str):
    """The no-cache forward (training, log-probs): causal attention over each row's real keys. Splash takes the
    key validity as segment ids; the other kernels get the [B,1,T,T] mask, built here, inside the layer, so
    that no [B,T,T] buffer lives across the layer scan."""
    t = q.shape[1]
    if resolve_attention_impl(impl, t, t, True, dtype=q.dtype, head_dim=q.shape[-1]) == "splash":
        return splash_causal_attention(q, k, v, key_valid, scale)
    return attention(q, k, v, causal_mask(key_valid), scale, impl, causal=True)


def _splash_kernel(t: int, group: int, block: int, interpret: bool):
    """A splash MQA kernel for `group` query heads sharing one key/value head over a causal [t, t] mask (built
    per trace: its block tables become arrays of the program being traced)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(group)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, valid, scale: float, interpret: bool):
    """One device's rows and heads: q [B,T,N,D], k/v [B,T,K,D], valid [B,T] -> [B,T,N,D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    block = min(SPLASH_BLOCK, -(-t // 128) * 128)
    pad = -t % block
    if pad:  # padded positions are padding: segment 0, like the row's own padding
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    kernel = _splash_kernel(t + pad, n // kv_heads, block, interpret)
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t + pad, kv_heads, n // kv_heads, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    seg = valid.astype(jnp.int32)

    def row(q_r, k_r, v_r, s_r):  # [K, G, T, D], [K, T, D], [K, T, D], [T]
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=SegmentIds(s_r, s_r)))(q_r, k_r, v_r)

    out = jax.vmap(row)(qh, kh, vh, seg)  # [B, K, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t + pad, n, d)[:, :t]


def splash_causal_attention(q, k, v, key_valid, scale: float):
    """Causal attention with key padding on Pallas splash attention (TPU; interpret mode elsewhere, tests):
    the [B, N, T, T] scores are never materialised, and fully masked key blocks are skipped.

    q [B,T,N,D], k/v [B,T,K,D] (GQA: each key/value head serves its query group through one MQA kernel),
    key_valid [B,T] bool. The padding mask becomes segment ids (1 real, 0 padding), so a real query sees
    the real keys at or before it, exactly as the XLA path; a padding query sees the padding keys before it
    instead of the XLA path's uniform average, and no real position ever reads a padding one. Under a mesh
    the kernel runs in `shard_map` with the batch and heads split like the activations (heads over tensor;
    key/value heads are repeated to the query heads when tensor does not divide them)."""
    interpret = target_platform() != "tpu"
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return _splash_local(q, k, v, key_valid, scale, interpret)
    q_spec = logical_to_pspec(("batch", "seq", "act_heads", "head_dim"), q.shape, mesh)
    kv_spec = logical_to_pspec(("batch", "seq", "act_kv_heads", "head_dim"), k.shape, mesh)
    if q_spec[2] != kv_spec[2]:
        group = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        kv_spec = q_spec
    local = functools.partial(_splash_local, scale=scale, interpret=interpret)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)),
                         out_specs=q_spec, check_vma=False)(q, k, v, key_valid)


def _attention_block(q, k, v, mask, scale, kv_major: bool = False):
    """Softmax attention of one query block on its keys, as jax's XLA path computes it (fp32 logits and
    softmax, masked logits set to the same large negative). q [B,t,N,D], k/v [B,s,K,D] (or [B,K,s,D] with
    `kv_major`, the KV cache's layout), mask [B,1,t,s]."""
    b, t, n, d = q.shape
    kv_heads = k.shape[1 if kv_major else 2]
    keys = "bksd" if kv_major else "bskd"
    qg = q.reshape(b, t, kv_heads, n // kv_heads, d)
    logits = jnp.einsum(f"btkgd,{keys}->bkgts", qg, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    big_neg = jnp.float32(-0.7 * float(np.finfo(np.float32).max))
    logits = jnp.where(mask[:, :, None], logits, big_neg)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{keys}->btkgd", probs, v)
    return out.reshape(b, t, n, d).astype(q.dtype)


def blocked_causal_attention(q, k, v, mask, scale: float, block: int | None = None, segments: int | None = None):
    """Exactly `jax.nn.dot_product_attention(q, k, v, mask=mask)` for a causal mask (S == T), cheaper on CPU.

    Query rows are cut into `block`-row blocks and the blocks into `segments` consecutive segments; a segment
    attends only to keys [0, segment end), skipping the fully masked upper triangle (with 4 segments 3/8 of
    the [B,N,T,T] score work), and runs its blocks with `lax.map` so each block's scores stay cache-sized and
    only `segments` block bodies are compiled. Rows with no valid key at all (left padding) get the mean of
    all values, as the reference's uniform softmax over fully masked logits gives."""
    b, t, n, d = q.shape
    if k.shape[1] != t or mask.shape[-2:] != (t, t):
        raise ValueError(f"blocked attention needs a square causal mask: q {q.shape}, k {k.shape}, mask {mask.shape}")
    block = block or ATTENTION_BLOCK
    segments = segments or ATTENTION_SEGMENTS
    n_blocks = -(-t // block)
    per_segment = -(-n_blocks // segments)
    outs = []
    for first in range(0, n_blocks, per_segment):
        count = min(n_blocks, first + per_segment) - first
        start, end = first * block, min(t, (first + count) * block)
        q_seg, m_seg = q[:, start:end], mask[:, :, start:end, :end]
        pad = count * block - (end - start)  # only the last segment of a T that is not a block multiple
        if pad:
            q_seg = jnp.pad(q_seg, ((0, 0), (0, pad), (0, 0), (0, 0)))
            m_seg = jnp.pad(m_seg, ((0, 0), (0, 0), (0, pad), (0, 0)))
        k_seg, v_seg = k[:, :end], v[:, :end]
        if count == 1:
            o = _attention_block(q_seg, k_seg, v_seg, m_seg, scale)
        else:
            qs = q_seg.reshape(b, count, block, n, d).swapaxes(0, 1)
            ms = m_seg.reshape(m_seg.shape[0], 1, count, block, end).transpose(2, 0, 1, 3, 4)
            o = jax.lax.map(lambda qm: _attention_block(qm[0], k_seg, v_seg, qm[1], scale), (qs, ms))
            o = o.swapaxes(0, 1).reshape(b, count * block, n, d)
        outs.append(o[:, :end - start])
    out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    has_key = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # [B,T,1,1]
    mean_v = jnp.repeat(jnp.mean(v, axis=1, dtype=jnp.float32).astype(v.dtype), n // v.shape[2], axis=1)
    return jnp.where(has_key, out, mean_v[:, None].astype(out.dtype))


def cached_blocked_attention(q, k_all, v_all, layer, mask, scale: float, kv_len, block: int = CACHE_KEY_BLOCK):
    """Attention of q [B,T,N,D] on layer `layer` of a KV cache k_all/v_all [L,B,K,S,D] under mask [B,1,T,S],
    visiting only the key blocks below `kv_len` (a traced bound on every row's valid slots; the rest of the
    buffer is masked anyway). Online softmax over `block`-slot key blocks, each read straight from the cache:
    XLA:CPU otherwise copies the layer's whole [B,K,S,D] buffer every step and scores all S
    slots. fp32 logits and softmax like the XLA path; a row with no valid key (never read: the Sampler keeps
    its previous logits) gets the mean of the visited values rather than of all S. Inference only: the
    data-dependent trip count has no reverse-mode derivative."""
    b, t, n, d = q.shape
    kv_heads, s = k_all.shape[2], k_all.shape[3]
    block = min(block, s)
    g = n // kv_heads
    qg = q.reshape(b, t, kv_heads, g, d)
    big_neg = jnp.float32(-0.7 * float(np.finfo(np.float32).max))

    def one_block(j, carry):
        m, l, acc = carry
        start = jnp.minimum(j * block, s - block)  # the last block may overlap the one before: masked below
        kb = jax.lax.dynamic_slice(k_all, (layer, 0, 0, start, 0), (1, b, kv_heads, block, d))[0].astype(q.dtype)
        vb = jax.lax.dynamic_slice(v_all, (layer, 0, 0, start, 0), (1, b, kv_heads, block, d))[0].astype(q.dtype)
        mb = jax.lax.dynamic_slice_in_dim(mask, start, block, axis=3)[:, :, None]  # [B,1,1,T,blk]
        fresh = (start + jnp.arange(block)) >= j * block
        logits = jnp.einsum("btkgd,bksd->bkgts", qg, kb, preferred_element_type=jnp.float32) * jnp.float32(scale)
        logits = jnp.where(mb & fresh, logits, big_neg)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        p = jnp.exp(logits - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.where(fresh, p, 0.0).sum(-1)
        pv = jnp.einsum("bkgts,bksd->bkgtd", jnp.where(fresh, p, 0.0).astype(vb.dtype), vb,
                        preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

    init = (jnp.full((b, kv_heads, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, kv_heads, g, t), jnp.float32),
            jnp.zeros((b, kv_heads, g, t, d), jnp.float32))
    n_blocks = jnp.clip((kv_len + block - 1) // block, 1, -(-s // block))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, one_block, init)
    out = acc / l[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d).astype(q.dtype)


def write_layer(cache: jax.Array, layer, new: jax.Array, starts: jax.Array) -> jax.Array:
    """cache [L,B,K,S,D] <- new [B,T,K,D] at (layer, row b, slots starts[b]..); a scatter XLA does in place.
    Slots past max_len are dropped (never clamped onto valid entries)."""
    b, t, kv_heads = new.shape[:3]
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(kv_heads)[None, :, None]
    slots = (starts[:, None] + jnp.arange(t)[None])[:, None, :]
    return cache.at[layer, rows, heads, slots].set(new.swapaxes(1, 2).astype(cache.dtype), mode="drop")


def cache_attention(q, k_all, v_all, layer, mask, scale: float, kv_len, impl: str):
    """Attention of q [B,T,N,D] on layer `layer` of the (already written) cache k_all/v_all [L,B,K,S,D] under
    mask [B,1,T,S]; kv_len bounds every row's valid slots (see `resolve_cache_attention_impl`). The buffer
    path reads the layer in the cache's own layout with XLA's attention arithmetic; only cuDNN, which takes
    [B,S,K,D], gets a transposed copy of the layer."""
    if resolve_cache_attention_impl(impl) == "blocked":
        return cached_blocked_attention(q, k_all, v_all, layer, mask, scale, kv_len)
    k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(q.dtype)
    v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(q.dtype)
    if resolve_attention_impl(impl, q.shape[1], k.shape[2], False, dtype=q.dtype, head_dim=q.shape[-1]) == "cudnn":
        return attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask, scale, impl)
    return _attention_block(q, k, v, mask, scale, kv_major=True)
