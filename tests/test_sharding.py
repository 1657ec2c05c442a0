"""8 forced CPU devices: fsdp x tensor x expert meshes give the single-device forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from _tiny import random_model
from agq_jax.models import qwen3, sharding

CFG = qwen3.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                        model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        norm_topk_prob=True, mlp_only_layers=(1,), initializer_range=0.2)


def _loss_and_grads(graphdef, state, ids, mask):
    def loss(s):
        out = nnx.merge(graphdef, s)(ids, attention_mask=mask)
        return jnp.mean(jax.nn.logsumexp(out.logits, -1)) + out.aux_loss, out.logits
    return jax.value_and_grad(loss, has_aux=True)(state)


_step = jax.jit(_loss_and_grads, static_argnums=0)


@pytest.fixture(scope="module")
def reference():
    graphdef, state = nnx.split(random_model(CFG, seed=0))
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, 128, (8, 12)))
    mask = jnp.asarray((np.arange(12)[None] < rng.randint(6, 13, (8, 1))).astype(np.int32))
    return graphdef, state, ids, mask, _step(graphdef, state, ids, mask)


def test_mesh_config_and_pspec_rules():
    assert sharding.MeshConfig(fsdp=-1, tensor=2).shape(8) == (1, 4, 2, 1)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.MeshConfig(fsdp=-1, tensor=3).shape(8)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sharding.logical_to_pspec(("batch", "seq", "act_embed"), (8, 5, 32), mesh) == P(("data", "fsdp"), None,
                                                                                           None)
    # batch 2 cannot take data x fsdp (4): keep the prefix that divides; kv_heads 1 cannot shard over tensor
    assert sharding.logical_to_pspec(("batch", "kv_heads"), (2, 1), mesh) == P("data", None)
    assert sharding.logical_to_pspec(("layers", "embed", "mlp"), (3, 32, 64), mesh) == P(None, "fsdp", "tensor")


@pytest.mark.parametrize("axes", [(1, 2, 2, 2), (1, 1, 4, 2)], ids=lambda a: "x".join(map(str, a)))
def test_sharded_forward_and_grads_equal_single_device(reference, axes):
    graphdef, state, ids, mask, (ref_val, ref_grads) = reference
    mesh = sharding.make_mesh(sharding.MeshConfig(*axes))
    sharded_state = jax.device_put(state, sharding.state_shardings(state, mesh))
    experts = sharded_state["blocks"][0]["layer"]["mlp"]["experts_up_proj"][...]
    assert experts.sharding.spec[1] == ("expert" if axes[3] > 1 else None)
    with jax.set_mesh(mesh):
        (val, logits), grads = _step(graphdef, sharded_state, ids, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_val[1]), atol=2e-5)
    np.testing.assert_allclose(float(val), float(ref_val[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_sharded_kv_cache_decode_equals_full_forward(reference):
    graphdef, state, ids, _, _ = reference
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=2, expert=2))
    model = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh)))

    @nnx.jit
    def step(m, x, c):
        out = m(x, cache=c)
        return out.logits, out.cache

    with jax.set_mesh(mesh):
        full = np.asarray(nnx.jit(lambda m, x: m(x).logits)(model, ids))
        cache = qwen3.init_cache(CFG, 8, 16, jnp.float32, mesh=mesh)
        assert cache.k.sharding.spec[1] == ("data", "expert")  # rows split over the expert shards too
        logits, cache = step(model, ids[:, :10], cache)
        got = [np.asarray(logits)]
        for t in (10, 11):
            logits, cache = step(model, ids[:, t:t + 1], cache)
            got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=2e-5)


def test_create_sharded_model_matches_unsharded_init():
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=2, expert=2))
    sharded = sharding.create_sharded_model(lambda: qwen3.Qwen3ForCausalLM(CFG, rngs=nnx.Rngs(3)), mesh)
    eager = qwen3.Qwen3ForCausalLM(CFG, rngs=nnx.Rngs(3))
    lm_head = sharded.lm_head[...]
    assert lm_head.sharding.spec == P("fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(eager))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
    paths = [p for p, _, _ in sharding.describe(sharded)]
    assert "blocks.0.layer.mlp.experts_gate_proj" in paths
