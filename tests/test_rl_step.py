"""Chunked log-probs, the GRPO/SFT train step, gradient accumulation, MoE aux loss, sharded == single device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agq_jax.models import qwen3
from agq_jax.models.sharding import MeshConfig, make_mesh
from agq_jax.rl.logprobs import full_logprobs_reference, next_token_logprobs
from agq_jax.rl.optim import OptimConfig, make_schedule
from agq_jax.rl.step import LossConfig, StepConfig, Trainer

VOCAB, B, T = 256, 8, 24
# shared configs: trainers with equal (model graph, configs, shapes) reuse one compiled step
OPT = OptimConfig(learning_rate=3e-3, weight_decay=0.0)
LOSS = LossConfig(logprob_chunk=8)


def tiny_cfg(moe: bool = False, tie: bool = True):
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie, max_position_embeddings=128)
    if moe:
        kw.update(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  norm_topk_prob=True, router_aux_loss_coef=0.01, tie_word_embeddings=False)
    return qwen3.Qwen3Config(**kw)


def tiny_model(moe: bool = False, seed: int = 0, tie: bool = True):
    return qwen3.Qwen3ForCausalLM(tiny_cfg(moe, tie), rngs=nnx.Rngs(seed))


def make_batch(seed: int = 0, b: int = B, t: int = T):
    """Right-padded rows: prompt (not policy) then a response (policy), ragged lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (b, t)).astype(np.int32)
    lens = rng.integers(t // 2, t + 1, b)
    am = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    lm = (am * (np.arange(t)[None] >= 6)).astype(np.float32)
    ids = ids * am
    return {"input_ids": ids, "attention_mask": am, "loss_mask": lm,
            "advantages": rng.normal(size=b).astype(np.float32)}


def with_sampler_logprobs(trainer, batch, noise: float = 0.0, seed: int = 1):
    """old_logprobs = the current policy's (optionally perturbed, like a bf16 sampler), 0 off the mask."""
    lp, _ = trainer.compute_logprobs(batch)
    lp = lp + noise * np.random.default_rng(seed).normal(size=lp.shape)
    return {**batch, "old_logprobs": (lp * batch["loss_mask"]).astype(np.float32)}


@pytest.fixture(scope="module")
def dense():
    return tiny_model()


def test_chunked_logprobs_equal_full_softmax_values_and_grads(dense):
    batch = make_batch()
    ids, am = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    graphdef, params = nnx.split(dense)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(B, T)), jnp.float32)

    def chunked(p):
        m = nnx.merge(graphdef, p)
        h, _, _ = m.hidden_states(ids, attention_mask=am)
        lp, ent = next_token_logprobs(h, m.unembed(), ids, chunk_size=5, temperature=0.7)  # 23 = 4*5 + 3 (pad)
        return (lp * w).sum() + (ent * w).sum(), (lp, ent)

    def full(p):
        m = nnx.merge(graphdef, p)
        lp, ent = full_logprobs_reference(m(ids, attention_mask=am).logits, ids, temperature=0.7)
        return (lp * w).sum() + (ent * w).sum(), (lp, ent)

    (vc, (lpc, entc)), gc = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    (vf, (lpf, entf)), gf = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    np.testing.assert_allclose(lpc, lpf, atol=2e-5)
    np.testing.assert_allclose(entc, entf, atol=2e-5)
    assert np.all(np.asarray(lpc)[:, 0] == 0)
    # alignment: column t scores token t under the prefix < t
    logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x).logits)(params, ids[:1, :4])[0]
    ref = jax.nn.log_softmax(logits[2] / 0.7)[ids[0, 3]]
    assert float(lpc[0, 3]) == pytest.approx(float(ref), abs=1e-5)
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gf)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    # the chunked program never holds a [B, T, V] array
    hlo = jax.jit(lambda p: chunked(p)[0]).lower(params).as_text()
    assert f"{B}x{T - 1}x{VOCAB}" not in hlo and f"{B}x{T}x{VOCAB}" not in hlo


def test_grpo_step_reduces_loss_and_reports_metrics(dense):
    trainer = Trainer(nnx.clone(dense), OPT, LOSS, StepConfig(ppo_epochs=1))
    batch = with_sampler_logprobs(trainer, make_batch(1))
    first = trainer.train_batch(batch)
    assert first["logprob_diff_first"] < 1e-5            # trainer recomputes the sampler's log-probs
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["clip_frac"] == 0.0
    assert first["tokens"] == batch["loss_mask"][:, 1:].sum()
    losses = [first["pg_loss"]] + [trainer.train_batch(batch)["pg_loss"] for _ in range(5)]
    assert losses[-1] < losses[0] - 0.05, losses
    last = trainer.train_batch(batch)
    assert last["clip_frac_high"] + last["clip_frac_low"] > 0  # the policy moved past the clip range
    assert last["logprob_diff_first"] > 1e-3 and int(trainer.state.step) == 7
    assert 0 < last["entropy"] < np.log(VOCAB) + 1e-3


def test_sft_stage_lowers_nll_on_masked_tokens(dense):
    trainer = Trainer(nnx.clone(dense), OPT, LOSS, StepConfig())
    batch = make_batch(2)
    sft = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    lp0, _ = trainer.compute_logprobs(sft)
    nll0 = -(lp0 * sft["loss_mask"]).sum() / sft["loss_mask"][:, 1:].sum()
    m = [trainer.train_batch(sft, stage="sft") for _ in range(8)]
    assert m[0]["nll"] == pytest.approx(float(nll0), rel=1e-5)
    assert m[-1]["nll"] < m[0]["nll"] - 0.3, [x["nll"] for x in m]
    with pytest.raises(ValueError, match="missing keys"):
        trainer.train_batch(sft, stage="grpo")


def test_grad_accumulation_and_minibatches_match_full_batch(dense):
    """micro-batching is exact (the token-mean denominator comes from the whole mini-batch)."""
    base = make_batch(3)
    outs = []
    for micro in (None, 2):
        tr = Trainer(nnx.clone(dense), OPT, LOSS, StepConfig(micro_batch_size=micro))
        m = tr.train_batch(with_sampler_logprobs(tr, base, noise=0.05))
        outs.append((m, jax.tree.leaves(tr.state.params)))
    (m1, p1), (m2, p2) = outs
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    for a, b in zip(p1, p2):  # Adam's first step is ~lr * sign(g): a real mismatch would be ~1e-3
        np.testing.assert_allclose(a, b, atol=5e-5)
    # μ = 2 epochs × 2 mini-batches = 4 optimizer steps; lr follows warmup
    tr = Trainer(nnx.clone(dense), OptimConfig(learning_rate=1e-3, warmup_steps=10), LOSS,
                 StepConfig(ppo_epochs=2, mini_batch_size=4, micro_batch_size=2))
    m = tr.train_batch(with_sampler_logprobs(tr, base))
    assert m["optimizer_steps"] == 4 and int(tr.state.step) == 4
    assert m["lr"] == pytest.approx(float(make_schedule(tr.optim_cfg)(3)))
    # a mini-batch with no loss token (all its groups masked) is not an optimizer step: AdamW's momentum from
    # the steps before would otherwise keep moving the weights on a zero gradient
    after = [np.asarray(x) for x in jax.tree.leaves(tr.state.params)]  # (the trainer donates its state)
    masked = dict(with_sampler_logprobs(tr, base), loss_mask=np.zeros_like(base["loss_mask"]))
    m = tr.train_batch(masked)
    assert m["optimizer_steps"] == 0 and m["skipped_steps"] == 4 and int(tr.state.step) == 4
    for a, b in zip(after, jax.tree.leaves(tr.state.params)):
        np.testing.assert_array_equal(a, b)
    rows = np.arange(len(base["loss_mask"]))[:, None]
    half = dict(masked, loss_mask=np.where(rows < 2, base["loss_mask"], 0))  # live rows 0-1 of 8
    m = tr.train_batch(half)
    assert m["optimizer_steps"] + m["skipped_steps"] == 4 and int(tr.state.step) == 4 + m["optimizer_steps"]
    assert m["optimizer_steps"] >= 2   # each epoch's shuffle puts the live rows in one or both mini-batches
    assert m["tokens"] == 2 * float((base["loss_mask"][:2] * base["attention_mask"][:2])[:, 1:].sum())
    with pytest.raises(ValueError, match="not a multiple of mini_batch_size"):
        Trainer(nnx.clone(dense), OPT, LOSS, StepConfig(mini_batch_size=3)).train_batch(
            with_sampler_logprobs(tr, base))


def test_loss_positions_only_equal_every_position(dense, caplog):
    """LossConfig.scored_tokens: the LM head runs on the loss positions only (here 18 of 23 per row), with
    the same losses, KL-reference pass and updates as on every position; a batch with a row past the bound
    trains on every position (warned)."""
    base = make_batch(4)
    most = int((base["loss_mask"] * base["attention_mask"])[:, 1:].sum(axis=1).max())
    assert 0 < most < T - 1
    scored = LossConfig(logprob_chunk=64, kl_coef=0.1, scored_tokens=most)
    every = LossConfig(logprob_chunk=64, kl_coef=0.1)
    runs = {}
    for name, loss in (("scored", scored), ("every", every), ("short", LossConfig(**{**scored.__dict__,
                                                                                      "scored_tokens": most - 1}))):
        tr = Trainer(nnx.clone(dense), OPT, loss, StepConfig(mini_batch_size=4, micro_batch_size=2))
        batch = with_sampler_logprobs(tr, base, noise=0.05)
        ms = [tr.train_batch(batch) for _ in range(2)] + [tr.train_batch(batch, stage="sft")]
        runs[name] = (ms, jax.tree.leaves(tr.state.params), tr)
    for name in ("scored", "short"):
        for a, b in zip(runs[name][0], runs["every"][0]):
            for k in ("loss", "kl", "entropy", "ratio_mean", "nll", "tokens"):
                if k in b:
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (name, k)
        for a, b in zip(runs[name][1], runs["every"][1]):
            np.testing.assert_allclose(a, b, atol=2e-5)
    assert "loss.scored_tokens=%d" % (most - 1) in caplog.text  # the short bound fell back, and said so
    # the scored program's LM head is [rows, 18, V], never [rows, 23, V]
    tr = runs["scored"][2]
    dev = tr.to_device({k: base[k] for k in ("input_ids", "attention_mask", "loss_mask")})
    from agq_jax.rl.step import _logprobs_jit

    hlo = {name: _logprobs_jit.lower(spec, tr.state.params, tr.state.model_state, dev).as_text()
           for name, spec in (("scored", tr._spec), ("every", tr._full_spec))}
    assert f"{B}x{most}x{VOCAB}" in hlo["scored"] and f"{B}x{T - 1}x{VOCAB}" not in hlo["scored"]
    assert f"{B}x{T - 1}x{VOCAB}" in hlo["every"]


def test_kl_reference_and_moe_aux_loss():
    model = tiny_model(moe=True)
    tr = Trainer(model, OptimConfig(learning_rate=3e-3), LossConfig(kl_coef=0.5, policy_loss="gspo",
                                                                     loss_agg="seq-mean-token-mean"))
    assert tr.ref_params is not None  # materialised only because kl_coef > 0
    batch = with_sampler_logprobs(tr, make_batch(4))
    m0 = tr.train_batch(batch)
    assert m0["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert m0["aux_loss"] > 0 and m0["loss"] == pytest.approx(m0["pg_loss"] + m0["aux_loss"], rel=1e-5)
    m1 = tr.train_batch(batch)
    assert m1["kl"] > 0 and m1["loss"] > m1["pg_loss"] + m1["aux_loss"]
    ref_model = tiny_model(moe=True, seed=1)
    tr.set_reference(ref_model)  # the KL now follows the new reference: token-mean k3 of the two log-probs
    lp_pol, _ = tr.compute_logprobs(batch)
    lp_ref, _ = tr.compute_logprobs(batch, nnx.state(ref_model, nnx.Param))
    mask = batch["loss_mask"]
    k3 = np.exp(lp_ref - lp_pol) - (lp_ref - lp_pol) - 1
    assert tr.train_batch(batch)["kl"] == pytest.approx(float((k3 * mask).sum() / mask.sum()), rel=1e-4)
    with pytest.raises(ValueError, match="structure"):
        tr.set_reference(tiny_model())
    assert Trainer(tiny_model(), OptimConfig(), LossConfig()).ref_params is None


def test_sharded_step_equals_single_device(dense):
    """data2 × fsdp2 × tensor2 on 8 CPU devices: same metrics and params as one device (fp32)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (forced) CPU devices")
    batch = make_batch(5)
    cfgs = (OptimConfig(learning_rate=1e-3, warmup_steps=10), LOSS,
            StepConfig(ppo_epochs=2, mini_batch_size=4, micro_batch_size=2))
    single = Trainer(nnx.clone(dense), *cfgs)
    batch = with_sampler_logprobs(single, batch, noise=0.05)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
    sharded = Trainer(nnx.clone(dense), *cfgs, mesh=mesh)  # the trainer shards params by the logical rules

    def check_layout(st):
        specs = [x.sharding.spec for x in jax.tree.leaves(st.params)]
        assert sum("tensor" in str(s) and "fsdp" in str(s) for s in specs) >= 5, specs
        moments = [s for s in jax.tree.leaves(st.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
        for tree in (moments[0].mu, moments[0].nu):  # Adam moments live exactly where their params do
            assert [x.sharding.spec for x in jax.tree.leaves(tree)] == specs
    check_layout(sharded.state)
    for _ in range(2):
        ms, mm = single.train_batch(batch), sharded.train_batch(batch)
        for k in ("loss", "pg_loss", "grad_norm", "entropy", "clip_frac", "logprob_diff"):
            assert ms[k] == pytest.approx(mm[k], rel=1e-4, abs=1e-5), k
    check_layout(sharded.state)
    for a, b in zip(jax.tree.leaves(single.state.params), jax.tree.leaves(sharded.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    lp_s, _ = single.compute_logprobs(batch)
    lp_m, _ = sharded.compute_logprobs(batch)
    np.testing.assert_allclose(lp_s, lp_m, atol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_optimizer_state():
    model = qwen3.Qwen3ForCausalLM(tiny_cfg(), rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    tr = Trainer(model, OPT, LOSS, StepConfig())
    batch = make_batch(6)
    lp16, _ = tr.compute_logprobs(batch)
    lp32, _ = Trainer(tiny_model(), OPT, LOSS).compute_logprobs(batch)
    mask = batch["loss_mask"] > 0
    assert 0 < np.abs(lp16 - lp32)[mask].mean() < 0.05  # bf16 matmuls, fp32 log-softmax
    m = tr.train_batch({**batch, "old_logprobs": lp16 * batch["loss_mask"]})
    assert np.isfinite(m["loss"]) and m["logprob_diff_first"] < 1e-6
    assert {x.dtype for x in jax.tree.leaves(tr.state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(tr.state.opt_state) if x.ndim > 0} == {jnp.dtype(jnp.float32)}
