"""Equality tests of the performance paths (issue 6) against their reference paths, values and gradients.

Blocked causal attention = jax's XLA attention (fp32) with left/right padding, GQA, lengths that are not a
multiple of the block; "auto"/"blocked" resolve to it only for the no-cache causal forward, and a whole
model gives the same logits and gradients either way. Splash attention (TPU, Pallas interpret mode here) = the
same oracle on real rows, also sharded over a mesh. Gathered MoE experts (the few-token decode path of
moe_impl="tiled") = the dense all-experts oracle, and a tiled MoE model decodes to its own full forward."""
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agq_jax.models import attention, moe, qwen3

TOL = 1e-5


def _causal_mask(valid):
    t = valid.shape[1]
    idx = jnp.arange(t)
    return ((idx[None, :] <= idx[:, None])[None] & valid[:, None, :])[:, None]


def _inputs(b, t, n, kv, d, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for h in (n, kv, kv))
    lengths = np.array([t, t - 3, t - 11, 5][:b])
    valid = np.arange(t)[None] < lengths[:, None]          # rows 0-1 right padded
    valid[-1] = np.arange(t) >= t - lengths[-1]             # last row left padded: its first queries see no key
    return q, k, v, jnp.asarray(valid), jax.random.normal(jax.random.key(seed), (b, t, n, d))


def _loss(fn, cot):
    return jax.jit(jax.value_and_grad(lambda q, k, v, m: jnp.sum(fn(q, k, v, m) * cot), argnums=(0, 1, 2)))


# (T, heads, kv heads, block, segments): single-block segments, lax.map segments (padded last segment when T is
# not a block multiple), one block only, MHA (heads == kv heads) and GQA.
@pytest.mark.parametrize("t,n,kv,block,segments", [(45, 4, 2, 16, 4), (64, 4, 4, 8, 4), (33, 6, 2, 4, 3),
                                                   (100, 4, 2, 16, 2), (7, 2, 1, 32, 4)])
def test_blocked_matches_xla_values_and_grads(t, n, kv, block, segments):
    q, k, v, valid, cot = _inputs(4, t, n, kv, 16, seed=t)
    mask = _causal_mask(valid)
    scale = 16 ** -0.5
    ref = lambda q, k, v, m: attention.attention(q, k, v, m, scale, "xla", causal=True)  # noqa: E731
    blk = lambda q, k, v, m: attention.blocked_causal_attention(q, k, v, m, scale, block, segments)  # noqa: E731
    out_ref, out_blk = jax.jit(ref)(q, k, v, mask), jax.jit(blk)(q, k, v, mask)
    np.testing.assert_allclose(out_blk, out_ref, atol=TOL, rtol=TOL)  # every row, padding rows included
    (val_r, g_r), (val_b, g_b) = _loss(ref, cot)(q, k, v, mask), _loss(blk, cot)(q, k, v, mask)
    np.testing.assert_allclose(val_b, val_r, atol=TOL * float(jnp.sum(jnp.abs(out_ref * cot))))  # a sum of B*T*N*D terms
    for name, a, b in zip("qkv", g_b, g_r):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL, err_msg=f"d/d{name}")


def test_resolution_rules():
    r = attention.resolve_attention_impl
    long = 2 * attention.ATTENTION_BLOCK
    assert r("auto", long, long, causal=True) == "blocked"      # tests run on CPU
    assert r("auto", long - 1, long - 1, causal=True) == "xla"   # one block: nothing to skip
    assert r("auto", 1, long, causal=False) == "xla"             # decode with a cache
    gpu = dict(backend="gpu", head_dim=128)
    assert r("auto", 256, 256, True, dtype=jnp.bfloat16, **gpu) == "cudnn"
    assert r("auto", 2, 256, False, dtype=jnp.bfloat16, **gpu) == "cudnn"   # cache chunk: cuDNN with the mask
    assert r("auto", 1, 256, False, dtype=jnp.bfloat16, **gpu) == "xla"     # one-token decode (odd length)
    assert r("auto", 256, 256, True, dtype=jnp.float32, **gpu) == "xla"     # cuDNN flash needs bf16 / fp16
    assert r("auto", 255, 255, True, dtype=jnp.bfloat16, **gpu) == "xla"    # odd length with a mask bias
    assert r("auto", 256, 256, True, dtype=jnp.bfloat16, backend="gpu", head_dim=160) == "xla"
    assert r("auto", 256, 256, True, dtype=jnp.bfloat16, backend="tpu", head_dim=128) == "splash"
    assert r("auto", 1, 256, False, dtype=jnp.bfloat16, backend="tpu", head_dim=128) == "xla"   # decode
    assert r("splash", 8, 64, causal=False) == "xla" and r("splash", 64, 64, causal=True) == "splash"
    assert r("blocked", 4, 64, causal=False) == "xla"            # KV-cache prefill / decode fall back
    assert r("blocked", 64, 64, causal=False) == "xla"           # a non-causal mask is never block-skipped
    assert r("xla", long, long, causal=True) == "xla"
    c = attention.resolve_cache_attention_impl  # with a KV cache
    assert c("auto") == c("blocked") == "blocked" and c("xla") == "buffer"
    assert c("auto", backend="gpu") == c("blocked", backend="tpu") == c("cudnn", backend="gpu") == "buffer"
    assert c("auto", backend="tpu") == c("splash") == "buffer"
    with pytest.raises(ValueError, match="attention impl='flash'"):
        r("flash", 8, 8, causal=True)
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="square causal mask"):
        attention.blocked_causal_attention(q, q[:, :4], q[:, :4], jnp.ones((1, 1, 8, 4), bool), 0.5)


# (T, heads, kv heads, mesh): T not a multiple of 128 (padded inside), two query / key blocks with the heads split
# over tensor (GQA groups stay whole), and one kv head that tensor does not divide (repeated to the query heads).
@pytest.mark.parametrize("t,n,kv,mesh_shape", [(45, 4, 2, None), (130, 6, 2, (2, 2)), (64, 4, 1, (2, 2))])
def test_splash_matches_xla_on_real_rows_values_and_grads(t, n, kv, mesh_shape):
    """Splash attention (the TPU kernel, Pallas interpret mode here) = the XLA oracle on every real query row
    with left / right padding and GQA, and so are the gradients of a loss over real rows. Padding query rows
    differ by design (they attend to padding keys, see splash_causal_attention)."""
    from agq_jax.models import sharding

    q, k, v, valid, cot = _inputs(4, t, n, kv, 16, seed=t)
    mask = _causal_mask(valid)
    cot = cot * valid[:, :, None, None]
    ref = lambda q, k, v, m: attention.attention(q, k, v, m, 0.25, "xla", causal=True)  # noqa: E731
    spl = lambda q, k, v, m: attention.attention(q, k, v, m, 0.25, "splash", causal=True)  # noqa: E731
    (val_r, g_r), out_r = _loss(ref, cot)(q, k, v, mask), jax.jit(ref)(q, k, v, mask)
    ctx = contextlib.nullcontext()
    if mesh_shape:
        ctx = jax.set_mesh(sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=mesh_shape[0], tensor=mesh_shape[1],
                                                                  expert=1), jax.devices()[:4]))
    with ctx:
        (val_s, g_s), out_s = _loss(spl, cot)(q, k, v, mask), jax.jit(spl)(q, k, v, mask)
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out_s)[real], np.asarray(out_r)[real], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(val_s, val_r, atol=TOL * float(jnp.sum(jnp.abs(out_r * cot))))
    for name, a, b in zip("qkv", g_s, g_r):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL, err_msg=f"d/d{name}")


# (cache slots S, kv_len bound, query rows T): S a block multiple with NaN beyond the visited blocks (proves they
# are never read); S not a multiple, so the last block is clamped and overlaps the one before (masked, not
# counted twice); a one-token decode step.
@pytest.mark.parametrize("s,kv_len,t", [(40, 21, 3), (30, 27, 4), (30, 30, 1)])
def test_cached_blocked_attention_matches_xla(s, kv_len, t):
    rng = np.random.default_rng(s + t)
    layers, b, n, kv, d, block = 3, 3, 4, 2, 8, 8
    k_all, v_all = (rng.normal(size=(layers, b, kv, s, d)).astype(np.float32) for _ in range(2))
    q = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32)
    new_len = np.array([kv_len, kv_len - 5, kv_len - t + 1])        # rows of different lengths
    qpos = new_len[:, None] - t + np.arange(t)[None]
    mask = jnp.asarray((np.arange(s)[None, None] <= qpos[:, :, None]) & (np.arange(s) < new_len[:, None, None])[:, :1])
    mask = mask[:, None]
    layer = 1
    ref = attention.attention(q, jnp.asarray(k_all[layer]).swapaxes(1, 2), jnp.asarray(v_all[layer]).swapaxes(1, 2), mask,
                              d ** -0.5, "xla")
    visited = -(-kv_len // block) * block
    if visited < s:  # slots past the visited blocks: poison them
        k_all[:, :, :, visited:] = np.nan
        v_all[:, :, :, visited:] = np.nan
    got = jax.jit(attention.cached_blocked_attention, static_argnames=("scale", "block"))(
        q, jnp.asarray(k_all), jnp.asarray(v_all), layer, mask, scale=d ** -0.5, kv_len=kv_len, block=block)
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=TOL)


@pytest.fixture(scope="module")
def models():
    cfg = qwen3.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    return {impl: qwen3.Qwen3ForCausalLM(dataclasses.replace(cfg, attention_impl=impl), rngs=nnx.Rngs(0))
            for impl in ("xla", "auto", "splash")}


@pytest.mark.parametrize("impl", ["auto", "splash"])
def test_model_impl_equals_xla_forward_grads_and_cache(models, impl):
    """A whole model with attention_impl auto (= blocked on CPU) or splash (the TPU kernel, interpreted) against
    xla: the same loss over real positions and the same gradients; with a KV cache both fall back to XLA."""
    ref, auto = models["xla"], models[impl]
    t = 2 * attention.ATTENTION_BLOCK + 9
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 128, (3, t)), jnp.int32)
    mask = np.ones((3, t), np.int32)
    mask[1, -20:] = 0       # right padding
    mask[2, :13] = 0        # left padding
    mask = jnp.asarray(mask)
    weights = jnp.asarray(rng.normal(size=(3, t, 128)), jnp.float32) * mask[..., None]

    def loss(model):
        return jnp.sum(model(ids, attention_mask=mask).logits * weights)

    val_r, g_r = nnx.jit(nnx.value_and_grad(loss))(ref)
    val_a, g_a = nnx.jit(nnx.value_and_grad(loss))(auto)
    np.testing.assert_allclose(val_a, val_r, rtol=1e-4)  # a sum of B*T*V terms
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(g_a)),
                                 jax.tree_util.tree_leaves_with_path(nnx.state(g_r))):
        # fp32 sums over B*T*V terms: 1e-5 of the gradient's scale
        np.testing.assert_allclose(a, b, atol=TOL * float(jnp.max(jnp.abs(b))), err_msg=jax.tree_util.keystr(path))

    # the cache path falls back: prefill + decode with "auto" equals the full forward
    full = auto(ids[:1]).logits
    cache = qwen3.init_cache(auto.config, 1, t)
    out = auto(ids[:1, :-1], cache=cache)
    step = auto(ids[:1, -1:], cache=out.cache)
    np.testing.assert_allclose(step.logits[:, 0], full[:, -1], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.logits, full[:, :-1], atol=1e-4, rtol=1e-4)


# ---- MoE: the tiled experts' inference path (stacked experts indexed per layer) ---------------------------

@pytest.mark.parametrize("batch", [1, 3])
def test_tiled_moe_cached_decode_matches_forward(batch):
    """With a cache, tiled MoE layers index the stacked [layer, expert] weights from inside the layer scan
    (no per-layer copy); a dense first layer shifts the MoE run to layers 1-2, so a wrong layer offset
    reads the wrong experts. Prefill + one-token steps must equal the plain forward."""
    cfg = qwen3.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, model_type="qwen3_moe",
                            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                            moe_impl="tiled", mlp_only_layers=(0,), initializer_range=0.2)
    assert cfg.layer_groups() == ((False, 0, 1), (True, 1, 2))
    model = qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(batch).integers(0, 96, (batch, 12)), jnp.int32)
    full = model(ids).logits
    step = nnx.jit(lambda m, ids, cache: m(ids, cache=cache))  # eager would dispatch every loop op
    out = step(model, ids[:, :8], qwen3.init_cache(cfg, batch, 16))
    logits = [out.logits]
    for j in range(8, 12):
        out = step(model, ids[:, j:j + 1], out.cache)
        logits.append(out.logits)
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full, atol=1e-4, rtol=1e-4)
