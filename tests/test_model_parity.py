"""agq_jax Qwen3 / Qwen3-MoE is the same function as transformers': logits, greedy decoding, KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from _tiny import TINY, VOCAB, build_hf, hf_logits, random_model
from agq_jax.models import qwen3

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build_hf(request.param, path, seed=len(request.param))
    ours = qwen3.from_pretrained(path, dtype=jnp.float32)
    return request.param, hf, ours


SEQ = 16  # every full forward uses [2, SEQ] so each model compiles it once
MAX_LEN = 48


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, attention_mask=mask)


@nnx.jit
def _step(model, ids, mask, cache):
    out = model(ids, attention_mask=mask, cache=cache)
    return out.logits, out.cache


def test_logits_match_hf(pair):
    name, hf, ours = pair
    rng = np.random.RandomState(1)
    ids = rng.randint(0, VOCAB, (2, SEQ))
    ref = hf_logits(hf, ids)
    out = _forward(ours, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32))
    got = np.asarray(out.logits)
    assert got.shape == ref.shape == (2, SEQ, VOCAB)
    assert np.abs(got - ref).max() <= TOL, name
    # hidden states and the separately exposed LM head give the same logits
    np.testing.assert_allclose(np.asarray(out.hidden @ ours.unembed()), np.asarray(out.logits), atol=1e-5)


def test_padding_mask_matches_hf(pair):
    """Left- and right-padded rows: valid positions equal HF with the same mask and positions."""
    name, hf, ours = pair
    rng = np.random.RandomState(2)
    ids = rng.randint(0, VOCAB, (2, SEQ))
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref = hf_logits(hf, ids, mask, positions)
    got = np.asarray(_forward(ours, jnp.asarray(ids), jnp.asarray(mask)).logits)
    valid = mask.astype(bool)
    assert np.abs(got[valid] - ref[valid]).max() <= TOL, name


def _greedy(model, prompts, new_tokens):
    """Batched greedy decoding of ragged prompts with one KV cache (right-padded prefill, per-row lengths)."""
    b, tmax = len(prompts), max(map(len, prompts))
    ids = np.zeros((b, tmax), np.int32)
    mask = np.zeros((b, tmax), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = p, 1
    cache = qwen3.init_cache(model.config, b, MAX_LEN, jnp.float32)
    logits, cache = _step(model, jnp.asarray(ids), jnp.asarray(mask), cache)
    last = np.asarray(logits)[np.arange(b), mask.sum(-1) - 1]
    out = [[] for _ in range(b)]
    for _ in range(new_tokens):
        tok = last.argmax(-1)
        for i in range(b):
            out[i].append(int(tok[i]))
        logits, cache = _step(model, jnp.asarray(tok[:, None], jnp.int32), jnp.ones((b, 1), jnp.int32), cache)
        last = np.asarray(logits)[:, 0]
    np.testing.assert_array_equal(np.asarray(cache.lengths), mask.sum(-1) + new_tokens)
    return out


def test_greedy_32_tokens_match_hf_generate(pair):
    name, hf, ours = pair
    rng = np.random.RandomState(3)
    prompts = [list(rng.randint(0, VOCAB, 3)), list(rng.randint(0, VOCAB, 6))]
    got = _greedy(ours, prompts, 32)
    for prompt, mine in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert mine == ref[0, len(prompt):].tolist(), name


def test_kv_cache_chunks_equal_full_forward(pair):
    """Prefill, a ragged multi-token chunk, then single tokens: every valid logit equals the full forward."""
    name, _, ours = pair
    rng = np.random.RandomState(4)
    seqs = np.zeros((2, SEQ), np.int32)
    seqs[0, :12], seqs[1, :9] = rng.randint(0, VOCAB, 12), rng.randint(0, VOCAB, 9)
    full_mask = np.zeros((2, SEQ), np.int32)
    full_mask[0, :12], full_mask[1, :9] = 1, 1
    # causal: every prefix's logits are the full (right-padded) forward's logits at those positions
    full = np.asarray(_forward(ours, jnp.asarray(seqs), jnp.asarray(full_mask)).logits)
    plan = [(6, 4), (3, 2), (1, 1), (1, 1), (1, 1)]  # tokens per row per call (right padding inside a chunk)
    cache = qwen3.init_cache(ours.config, 2, MAX_LEN, jnp.float32)
    pos = [0, 0]
    for chunk in plan:
        t = max(chunk)
        ids = np.zeros((2, t), np.int32)
        mask = np.zeros((2, t), np.int32)
        for i, n in enumerate(chunk):
            ids[i, :n], mask[i, :n] = seqs[i][pos[i]:pos[i] + n], 1
        logits, cache = _step(ours, jnp.asarray(ids), jnp.asarray(mask), cache)
        for i, n in enumerate(chunk):
            ref = full[i, pos[i]:pos[i] + n]
            assert np.abs(np.asarray(logits)[i, :n] - ref).max() <= TOL, (name, chunk, i)
            pos[i] += n
    np.testing.assert_array_equal(np.asarray(cache.lengths), pos)


def test_aux_loss_matches_hf(pair):
    name, hf, ours = pair
    rng = np.random.RandomState(5)
    ids = rng.randint(0, VOCAB, (2, SEQ))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    out = _forward(ours, jnp.asarray(ids), jnp.asarray(mask))
    if not ours.config.is_moe:
        assert float(out.aux_loss) == 0.0
        return
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
    expected = ours.config.router_aux_loss_coef * float(ref.aux_loss)
    np.testing.assert_allclose(float(out.aux_loss), expected, rtol=1e-5)


def test_remat_and_unscanned_layers_give_same_grads():
    """Remat policies and the python-loop layer path are pure re-schedulings: same loss and gradients."""
    _, kw = TINY["moe_norm_mlp_only"]
    base = qwen3.Qwen3Config(vocab_size=VOCAB, model_type="qwen3_moe", **{**kw, "mlp_only_layers": (1,)})
    state = nnx.state(random_model(base, seed=0))
    ids = jnp.asarray(np.random.RandomState(6).randint(0, VOCAB, (2, 7)))

    def loss_grads(cfg):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))))

        @jax.jit
        def run(st):
            def loss(s):
                out = nnx.merge(graphdef, s)(ids)
                return jnp.mean(jax.nn.logsumexp(out.logits, -1)) + out.aux_loss
            return jax.value_and_grad(loss)(st)
        return run(state)

    # two schedules that share nothing but the math: scanned + full remat vs python loop + dots-saveable remat
    val_a, grads_a = loss_grads(base.replace(remat="full"))
    val_b, grads_b = loss_grads(base.replace(remat="dots", scan_layers=False))
    np.testing.assert_allclose(float(val_a), float(val_b), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
