"""MoE pieces: ragged_dot / tiled / megablox dispatch == dense oracle (values and gradients), router and aux loss
== HF. Megablox (the TPU kernel) runs in Pallas interpret mode here: the same kernel code, on the CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter, load_balancing_loss_func

from _tiny import random_model
from agq_jax.models import moe, qwen3

N, H, I, E, K = 24, 16, 8, 6, 2


@pytest.fixture(scope="module")
def expert_inputs():
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (N, H))
    router = jax.random.normal(ks[1], (H, E))
    wg = 0.3 * jax.random.normal(ks[2], (E, H, I))
    wu = 0.3 * jax.random.normal(ks[3], (E, H, I))
    wd = 0.3 * jax.random.normal(ks[4], (E, I, H))
    return x, router, wg, wu, wd


@pytest.mark.parametrize("impl,norm_topk_prob", [("ragged", True), ("ragged", False), ("tiled", True),
                                                  ("megablox", True)])
def test_sorted_dispatch_equals_dense_values_and_grads(expert_inputs, impl, norm_topk_prob):
    x, router, wg, wu, wd = expert_inputs

    def make(impl):
        @jax.jit
        def f(x, router, wg, wu, wd):
            _, top_w, top_i = moe.route(x, router, K, norm_topk_prob)
            y = impl(x, top_i, top_w, wg, wu, wd)
            return jnp.sum(jnp.sin(y)), y
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)

    (loss_r, y_r), g_r = make(moe.EXPERT_IMPLS[impl])(x, router, wg, wu, wd)
    (loss_d, y_d), g_d = make(moe.experts_dense)(x, router, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(y_r), np.asarray(y_d), atol=1e-5)
    np.testing.assert_allclose(float(loss_r), float(loss_d), rtol=1e-5)
    for a, b in zip(g_r, g_d):
        assert np.abs(np.asarray(b)).max() > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_sorted_dispatch_handles_empty_experts(expert_inputs):
    """Every token routed to the same two experts: other groups are empty and must contribute nothing."""
    x, _, wg, wu, wd = expert_inputs
    top_i = jnp.tile(jnp.array([[4, 1]], jnp.int32), (N, 1))
    top_w = jnp.full((N, 2), 0.5)
    ref = np.asarray(moe.experts_dense(x, top_i, top_w, wg, wu, wd))
    for impl in (moe.experts_ragged, moe.experts_tiled, moe.experts_megablox):
        np.testing.assert_allclose(np.asarray(impl(x, top_i, top_w, wg, wu, wd)), ref, atol=1e-5)


@pytest.mark.parametrize("rows", [N // 4, N], ids=["tokens-fsdp", "tokens-fsdp-expert"])
def test_megablox_sharded_equals_dense_values_and_grads(expert_inputs, rows):
    """Megablox under a (fsdp 2, tensor 2, expert 2) mesh of CPU devices: the shard_map path (each expert shard
    computes its own groups via group_offset, partial outputs summed over tensor and expert) gives the dense
    oracle's outputs and gradients, the weight gradients landing on their shards; with the tokens split over
    the expert axis too (expert parallelism) the expert group's tokens are gathered and the sum scattered back."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from agq_jax.models import sharding

    x, router, wg, wu, wd = expert_inputs
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2, expert=2), jax.devices()[:8])

    def make(impl, **kw):
        def f(x, router, wg, wu, wd):
            _, top_w, top_i = moe.route(x, router, K, True)
            y = impl(x, top_i, top_w, wg, wu, wd, **kw)
            return jnp.sum(jnp.sin(y)), y
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))

    (_, y_d), g_d = make(moe.experts_dense)(x, router, wg, wu, wd)
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))  # noqa: E731
    with jax.set_mesh(mesh):
        tokens = sharding.logical_to_pspec(("batch",), (rows,), mesh)[0]  # N/4 = 6 rows cannot split over expert
        assert tokens == (("fsdp", "expert") if rows == N else "fsdp")
        args = (put(x, tokens), router, put(wg, "expert", "fsdp", "tensor"), put(wu, "expert", "fsdp", "tensor"),
                put(wd, "expert", "tensor", "fsdp"))
        (_, y_m), g_m = make(moe.experts_megablox, batch_rows=rows)(*args)
    np.testing.assert_allclose(np.asarray(y_m), np.asarray(y_d), atol=1e-5)
    for a, b in zip(g_m, g_d):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("m,tile,offset", [(1, 1, 0), (7, 1, 0), (40, 4, 0), (40, 64, 0), (300, 32, 0),
                                           (40, 4, 2 * E)])
def test_padded_grouped_matmul_equals_ragged_dot(m, tile, offset):
    """Values and gradients (x and w) of the looped CPU grouped matmul against ragged_dot, with empty groups
    (multinomial over E groups); offset > 0 reads one layer out of a [3*E, ...] stack, and the w gradient
    lands only in that layer's rows."""
    rng = np.random.RandomState(m)
    flat_e = jnp.asarray(rng.randint(0, E, m), jnp.int32)
    sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    x = jnp.asarray(rng.randn(m, H), jnp.float32)
    stack = jnp.asarray(rng.randn(3 * E, H, I), jnp.float32)
    lay = moe.padded_layout(flat_e, E, tile)
    assert lay.rows >= m and lay.rows % tile == 0

    def padded(x, stack):
        buf = jnp.zeros((lay.rows, H)).at[lay.dest].set(x)
        out = moe.grouped_matmul_padded(buf, stack, lay.tiles, lay.start, jnp.int32(offset), tile)
        return out[lay.dest]

    order = jnp.argsort(flat_e, stable=True)

    def ragged(x, stack):  # the reference sorts rows by group, then unsorts
        y = jax.lax.ragged_dot(x[order], stack[offset:offset + E], sizes)
        return y[jnp.argsort(order)]

    np.testing.assert_allclose(np.asarray(padded(x, stack)), np.asarray(ragged(x, stack)), atol=1e-4)
    cot = jnp.asarray(rng.randn(m, I), jnp.float32)
    grads = [jax.jit(jax.grad(lambda x, s: (f(x, s) * cot).sum(), argnums=(0, 1)))(x, stack) for f in (padded, ragged)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3, rtol=1e-4)
    outside = np.delete(np.asarray(grads[0][1]), np.arange(offset, offset + E), axis=0)
    assert not outside.any() and np.abs(np.asarray(grads[0][1][offset:offset + E])).max() > 0


@pytest.mark.parametrize("m,tile,offset", [(1, 1, 0), (40, 4, 0), (300, 32, 0), (40, 4, 2 * E)])
def test_fused_grouped_mlp_equals_three_grouped_matmuls(m, tile, offset):
    """The one-loop SwiGLU (inference) and its custom VJP (the three-loop forward and backward) against three
    `grouped_matmul_padded` calls: the same values, and the same gradients for the buffer and all three
    stacks (zero outside this layer's experts)."""
    rng = np.random.RandomState(m)
    flat_e = jnp.asarray(rng.randint(0, E, m), jnp.int32)
    lay = moe.padded_layout(flat_e, E, tile)
    buf = jnp.zeros((lay.rows, H)).at[lay.dest].set(jnp.asarray(rng.randn(m, H), jnp.float32))
    ws = [jnp.asarray(rng.randn(3 * E, *shape), jnp.float32) for shape in ((H, I), (H, I), (I, H))]
    args = (lay.tiles, lay.start, jnp.int32(offset), tile)

    def fused(buf, wg, wu, wd):
        return moe.grouped_mlp_padded(buf, wg, wu, wd, *args)

    def three(buf, wg, wu, wd):
        gmm = moe.grouped_matmul_padded
        return gmm(jax.nn.silu(gmm(buf, wg, *args)) * gmm(buf, wu, *args), wd, *args)

    np.testing.assert_allclose(np.asarray(jax.jit(fused)(buf, *ws)), np.asarray(jax.jit(three)(buf, *ws)),
                               atol=1e-4, rtol=1e-5)
    cot = jnp.asarray(rng.randn(lay.rows, H), jnp.float32)
    grads = [jax.jit(jax.grad(lambda *a, f=f: (f(*a) * cot).sum(), argnums=(0, 1, 2, 3)))(buf, *ws)
             for f in (fused, three)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3, rtol=1e-5)
    for dw in grads[0][1:]:
        assert not np.delete(np.asarray(dw), np.arange(offset, offset + E), axis=0).any()


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_matches_hf(expert_inputs, norm_topk_prob):
    x, router, *_ = expert_inputs
    cfg = Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K, norm_topk_prob=norm_topk_prob)
    hf = Qwen3MoeTopKRouter(cfg)
    with torch.no_grad():
        hf.weight.copy_(torch.tensor(np.asarray(router).T))
        logits, scores, idx = hf(torch.tensor(np.asarray(x)))
    probs, top_w, top_i = moe.route(x, router, K, norm_topk_prob)
    np.testing.assert_array_equal(np.asarray(top_i), idx.numpy())
    np.testing.assert_allclose(np.asarray(top_w), scores.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(probs), torch.softmax(logits, -1).numpy(), atol=1e-6)


def test_load_balancing_loss_matches_hf_with_mask():
    """Stats pooled over layers, padding excluded: equals transformers' load_balancing_loss_func."""
    rng = np.random.RandomState(0)
    layers, b, t = 3, 2, 5
    gate_logits = [rng.randn(b * t, E).astype(np.float32) for _ in range(layers)]
    mask = np.ones((b, t), np.int64)
    mask[0, 3:] = 0
    ref = load_balancing_loss_func(tuple(torch.tensor(g) for g in gate_logits), E, K, torch.tensor(mask))
    stats = moe.RouterStats.zeros(E)
    for g in gate_logits:
        probs = jax.nn.softmax(jnp.asarray(g), -1)
        _, top_i = jax.lax.top_k(probs, K)
        stats = stats + moe.router_stats(probs, top_i, jnp.asarray(mask.reshape(-1)))
    np.testing.assert_allclose(float(moe.load_balancing_loss(stats, E)), float(ref), rtol=1e-6)
    ref_nomask = load_balancing_loss_func(tuple(torch.tensor(g) for g in gate_logits), E, K, None)
    stats = moe.RouterStats.zeros(E)
    for g in gate_logits:
        probs = jax.nn.softmax(jnp.asarray(g), -1)
        stats = stats + moe.router_stats(probs, jax.lax.top_k(probs, K)[1], jnp.ones(b * t))
    np.testing.assert_allclose(float(moe.load_balancing_loss(stats, E)), float(ref_nomask), rtol=1e-6)


@pytest.mark.parametrize("impl", ["ragged", "auto", "megablox"])
def test_model_level_impl_equals_dense_oracle(impl):
    """Whole MoE model (scanned layers): moe_impl='ragged' / 'auto' (= the looped tiled kernel with its custom
    VJP on CPU) / 'megablox' (the TPU kernel, interpreted) and 'dense' agree in logits, aux loss and every
    param gradient."""
    assert moe.resolve_moe_impl("auto", "cpu") == "tiled" and moe.resolve_moe_impl("auto", "gpu") == "ragged"
    assert moe.resolve_moe_impl("auto", "tpu") == "megablox"
    cfg = qwen3.Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, model_type="qwen3_moe",
                            num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I, initializer_range=0.2)
    state = nnx.state(random_model(cfg, seed=1))
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 64, (2, 6)))

    def run(impl):
        graphdef = nnx.graphdef(nnx.eval_shape(
            lambda: qwen3.Qwen3ForCausalLM(cfg.replace(moe_impl=impl), rngs=nnx.Rngs(0))))

        @jax.jit
        def f(st):
            def loss(s):
                out = nnx.merge(graphdef, s)(ids)
                return jnp.sum(jnp.tanh(out.logits)) + 100.0 * out.aux_loss, out.logits
            return jax.value_and_grad(loss, has_aux=True)(st)
        return f(state)

    (l_r, logits_r), g_r = run(impl)
    (l_d, logits_d), g_d = run("dense")
    np.testing.assert_allclose(np.asarray(logits_r), np.asarray(logits_d), atol=1e-5)
    np.testing.assert_allclose(float(l_r), float(l_d), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_d)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)  # fp32 summation order
