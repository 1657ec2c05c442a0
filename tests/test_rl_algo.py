"""GRPO math against values worked out by hand / with plain numpy formulas."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agq_jax.envs.rewards import SUCCESS_THRESHOLD
from agq_jax.rl import algo
from agq_jax.rl.batch import attach_advantages, collate, validate_batch


def test_grpo_advantages_hand_values():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    # group 0: mean 0.5, unbiased std sqrt(4*0.25/3) = 0.57735
    a = np.asarray(algo.compute_advantages(r, "grpo", eps=0.0))
    np.testing.assert_allclose(a[0], [0.866025, -0.866025, -0.866025, 0.866025], rtol=1e-5)
    a = np.asarray(algo.compute_advantages(r, "grpo"))
    np.testing.assert_allclose(a[1], 0.0, atol=1e-7)  # zero-variance group: no signal, no NaN
    a_pop = np.asarray(algo.compute_advantages(r, "grpo", std_ddof=0, eps=0.0))
    np.testing.assert_allclose(a_pop[0], [1, -1, -1, 1], rtol=1e-6)
    a_nostd = np.asarray(algo.compute_advantages(r, "grpo", std_normalize=False))
    np.testing.assert_allclose(a_nostd[0], [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_allclose(np.asarray(algo.compute_advantages(r, "drgrpo")), a_nostd)
    # rloo: r_i - mean of the others; [1,0,0,1] -> 1 - 1/3, 0 - 2/3
    rl = np.asarray(algo.compute_advantages(r, "rloo"))
    np.testing.assert_allclose(rl[0], [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="num_groups, group_size"):
        algo.compute_advantages(np.zeros(4), "grpo")
    with pytest.raises(KeyError, match="registered"):
        algo.compute_advantages(r, "nope")


def test_ppo_clip_both_sides_and_dual_clip():
    # one row, 5 tokens; last token masked out
    logp = np.log(np.array([[1.5, 0.5, 1.1, 0.7, 9.0]]))
    old = np.zeros((1, 5))
    mask = np.array([[1, 1, 1, 1, 0]], np.float32)
    for adv, exp_loss, exp_low, exp_high in [
        # A>0: min(r A, clip(r) A) -> r=1.5 clipped at 1.28; r=0.5 unclipped (min picks 0.5)
        (1.0, [-1.28, -0.5, -1.1, -0.7, 0.0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]),
        # A<0: max(r, clip(r)) -> r=0.5, 0.7 -> 0.8 (low clip active); r=1.5 stays 1.5
        (-1.0, [1.5, 0.8, 1.1, 0.8, 0.0], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]),
    ]:
        out = algo.policy_loss("ppo_clip", logp, old, np.array([adv]), mask)
        np.testing.assert_allclose(np.asarray(out.loss)[0], exp_loss, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(out.clipped_low)[0], exp_low)
        np.testing.assert_array_equal(np.asarray(out.clipped_high)[0], exp_high)
    # dual clip (c=3): with A=-1 a ratio of 5 costs at most 3
    out = algo.policy_loss("ppo_clip", np.log([[5.0, 2.0]]), np.zeros((1, 2)), np.array([-1.0]),
                           np.ones((1, 2)), dual_clip_c=3.0)
    np.testing.assert_allclose(np.asarray(out.loss)[0], [3.0, 2.0], rtol=1e-6)
    # the clipped side has zero gradient, the unclipped side gradient -A * r
    g = jax.grad(lambda lp: algo.policy_loss("ppo_clip", lp, old, np.array([1.0]), mask).loss.sum())(
        jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(np.asarray(g)[0], [0.0, -0.5, -1.1, -0.7, 0.0], rtol=1e-5)


def test_aggregation_modes_hand_values():
    v = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)  # row 2 has no policy token
    assert float(algo.aggregate("token-mean", v, m)) == pytest.approx(10 / 4)
    assert float(algo.aggregate("seq-mean-token-mean", v, m)) == pytest.approx((2.0 + 4.0) / 2)
    assert float(algo.aggregate("seq-mean-token-sum", v, m)) == pytest.approx((6.0 + 4.0) / 2)
    assert float(algo.aggregate("drgrpo", v, m)) == pytest.approx(10 / (3 * 4))
    assert float(algo.aggregate("drgrpo", v, m, norm_len=10)) == pytest.approx(10 / 30)
    # (numerator, denominator) splits add up: two halves give the full-batch value
    parts = [algo.aggregate_parts("token-mean", v[s], m[s]) for s in (slice(0, 1), slice(1, 3))]
    assert float(sum(p[0] for p in parts) / sum(p[1] for p in parts)) == pytest.approx(10 / 4)


def test_kl_estimators_hand_values():
    logp = np.array([np.log(0.5), np.log(0.2)])
    ref = np.array([np.log(0.25), np.log(0.4)])
    log_r = ref - logp  # [-ln 2, ln 2]
    np.testing.assert_allclose(np.asarray(algo.kl_estimate("k1", logp, ref)), -log_r, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(algo.kl_estimate("k2", logp, ref)), 0.5 * log_r**2, rtol=1e-6)
    # k3 = r - 1 - log r: r = 0.5 -> 0.5 - 1 + ln 2; r = 2 -> 2 - 1 - ln 2
    np.testing.assert_allclose(np.asarray(algo.kl_estimate("k3", logp, ref)),
                               [np.log(2) - 0.5, 1 - np.log(2)], rtol=1e-5)
    # unbiasedness of k3 and k1 on a discrete distribution: E_pi[k] = KL(pi || ref)
    pi, rf = np.array([0.7, 0.2, 0.1]), np.array([0.3, 0.3, 0.4])
    kl = float((pi * np.log(pi / rf)).sum())
    for name in ("k1", "k3"):
        est = float((pi * np.asarray(algo.kl_estimate(name, np.log(pi), np.log(rf)))).sum())
        assert est == pytest.approx(kl, rel=1e-5)


def test_gspo_sequence_ratio_and_clip():
    logp = np.array([[0.0, -1.0, -2.0, -3.0], [0.0, -1.0, -1.0, 0.0]])
    old = np.array([[0.0, -1.0002, -2.0004, -9.0], [0.0, -1.1, -0.9, 0.0]])
    mask = np.array([[0, 1, 1, 0], [0, 1, 1, 0]], np.float32)
    adv = np.array([1.0, -1.0])
    out = algo.policy_loss("gspo", logp, old, adv, mask)
    # row 0: mean log ratio 3e-4 -> s = e^{3e-4} ≈ 1.0003 (inside 1+4e-4, unclipped)
    s0 = np.exp(3e-4)
    np.testing.assert_allclose(np.asarray(out.ratio)[0], [0, s0, s0, 0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.loss)[0], [0, -s0, -s0, 0], rtol=1e-6)
    # row 1: mean log ratio 0 -> s = 1, A<0 -> loss 1 on each policy token, nothing clipped
    np.testing.assert_allclose(np.asarray(out.loss)[1], [0, 1, 1, 0], rtol=1e-6)
    assert float(np.asarray(out.clipped_low).sum() + np.asarray(out.clipped_high).sum()) == 0
    # a large sequence ratio is clipped as a whole: s = e^{0.1}, A>0 -> 1 + 4e-4 on every token
    out = algo.policy_loss("gspo", logp, logp - 0.1, np.array([1.0, 1.0]), mask)
    np.testing.assert_allclose(np.asarray(out.loss)[0], [0, -1.0004, -1.0004, 0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.clipped_high), mask)

    # gradient = s * A * mean_t grad logp_t under seq-mean-token-mean (the GSPO gradient)
    def f(lp):
        o = algo.policy_loss("gspo", lp, old, adv, mask)
        return algo.aggregate("seq-mean-token-mean", o.loss, mask)
    g = np.asarray(jax.grad(f)(jnp.asarray(logp, jnp.float32)))
    np.testing.assert_allclose(g[0], [0, -s0 / 2 / 2, -s0 / 2 / 2, 0], rtol=1e-5)  # 1/|y|=1/2, 1/G=1/2
    np.testing.assert_allclose(g[1], [0, 0.25, 0.25, 0], rtol=1e-5)


def test_masks_zero_out_padding_and_non_policy_tokens():
    rng = np.random.default_rng(0)
    logp, old = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    mask = (rng.random((3, 6)) > 0.5).astype(np.float32)
    garbage = np.where(mask > 0, logp, 1e6)  # huge values outside the mask must not leak in
    a = algo.policy_loss("ppo_clip", logp, old, np.ones(3), mask)
    b = algo.policy_loss("ppo_clip", garbage, old, np.ones(3), mask)
    np.testing.assert_allclose(np.asarray(a.loss), np.asarray(b.loss))
    assert np.all(np.asarray(b.loss)[mask == 0] == 0)


def test_entropy_dynamic_sampling_overlong():
    z = np.log(np.array([[0.5, 0.25, 0.25]]))
    assert float(algo.entropy_from_logits(z)[0]) == pytest.approx(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)))
    r = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [0.2, 0.2, 0.3]])
    keep, frac = algo.dynamic_sampling_filter(r)
    np.testing.assert_array_equal(keep, [1, 3])
    assert frac == 0.5
    lm = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(algo.overlong_filter(lm, [False, True, False]).sum(1), [4, 0, 4])
    np.testing.assert_allclose(algo.overlong_soft_penalty([10, 90, 95, 100, 120], 100, 20),
                               [0, -0.5, -0.75, -1.0, -1.0])


def test_training_rewards_hand_values():
    t = SUCCESS_THRESHOLD   # "success" means what the evaluation counts: the environment's threshold
    rubric = np.array([[1.0, 2 / 3, 0.0, 1.0 - 1e-12]])
    np.testing.assert_allclose(algo.training_reward("rubric", rubric, success_threshold=t), rubric.astype(np.float32))
    np.testing.assert_allclose(algo.training_reward("success", rubric, success_threshold=t), [[1.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(algo.training_reward("rubric+success", rubric, success_threshold=t),
                               [[1.0, 1 / 3, 0.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(algo.training_reward("success", rubric, success_threshold=0.5), [[1.0, 1.0, 0.0, 1.0]])
    # a group that differs only in partial credit carries no signal under "success" (dynamic sampling drops it)
    partial = np.array([[0.5, 2 / 3, 0.0, 0.25]])
    assert not algo.zero_variance_groups(algo.training_reward("rubric", partial, success_threshold=t))[0]
    assert algo.zero_variance_groups(algo.training_reward("success", partial, success_threshold=t))[0]
    with pytest.raises(KeyError, match="training reward 'binary'"):
        algo.training_reward("binary", rubric, success_threshold=t)


def test_negative_advantage_weight_hand_values():
    adv = algo.compute_advantages(np.array([[1.0, 0.0, 0.0, 0.0]]), "grpo")  # mean 0.25, std(ddof=1) 0.5
    np.testing.assert_allclose(adv, [[1.5, -0.5, -0.5, -0.5]], rtol=1e-5)
    np.testing.assert_allclose(algo.weight_negative_advantages(adv, 0.25), [[1.5, -0.125, -0.125, -0.125]], rtol=1e-5)
    np.testing.assert_allclose(algo.weight_negative_advantages(adv, 1.0), adv)
    with pytest.raises(ValueError, match="must be >= 0"):
        algo.weight_negative_advantages(adv, -1.0)


def test_collate_and_advantages_batch():
    samples = [{"token_ids": [5, 6, 7], "loss_mask": [0, 1, 1], "logprobs": [0, -0.1, -0.2]},
               {"token_ids": [5, 6], "loss_mask": [1, 1], "logprobs": [-9, -0.3]}]
    b = collate(samples, pad_id=0, pad_to_multiple=4)
    np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 0], [5, 6, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1, 0], [0, 1, 0, 0]])  # column 0 never scored
    np.testing.assert_allclose(b["old_logprobs"][1], [-9, -0.3, 0, 0])
    b = attach_advantages(b, [[1.0, 0.0]], "grpo", std_ddof=0, eps=0.0)
    np.testing.assert_allclose(b["advantages"], [1.0, -1.0])
    assert validate_batch(b) == (2, 4)
    bad = dict(b, loss_mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match="padding"):
        validate_batch(bad)
    with pytest.raises(ValueError, match="advantages"):
        validate_batch(dict(b, advantages=np.ones(3)))


def test_optimizer_schedule_clipping_and_decay_mask():
    import optax
    from agq_jax.rl.optim import OptimConfig, make_optimizer, make_schedule
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=10, decay="cosine", total_steps=110, min_lr_ratio=0.1)
    sched = make_schedule(cfg)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    # halfway through the cosine: lr * (alpha + (1 - alpha) * 0.5)
    assert float(sched(60)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-5)
    assert float(sched(110)) == pytest.approx(1e-4, rel=1e-5)
    lin = make_schedule(OptimConfig(learning_rate=1.0, decay="linear", total_steps=4))
    assert [float(lin(i)) for i in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    # wsd: warmup, the full rate until the last 20% of the post-warmup steps, then linear to the floor
    wsd = make_schedule(OptimConfig(learning_rate=1.0, warmup_steps=10, decay="wsd", total_steps=110))
    assert [float(wsd(i)) for i in (5, 10, 50, 90, 95, 100, 110)] == pytest.approx([0.5, 1, 1, 1, 0.75, 0.5, 0])
    with pytest.raises(ValueError, match="decay"):
        OptimConfig(decay="step")
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    tx = make_optimizer(OptimConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=1.0))
    state = tx.init(params)
    # zero gradients: only decoupled weight decay moves params, and only matrices
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    new = optax.apply_updates(params, upd)
    np.testing.assert_allclose(new["w"], 1 - 0.1 * 0.5)
    np.testing.assert_allclose(new["scale"], 1.0)
    # a huge gradient reaches Adam clipped to global norm 1: its first moment is (1 - b1) * clipped g
    big = {"w": jnp.full((2, 2), 100.0), "scale": jnp.full((2,), 100.0)}
    _, st = tx.update(big, state, params)
    mu = [s.mu for s in jax.tree.leaves(st, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0]
    assert float(optax.global_norm(mu)) == pytest.approx(0.1 * 1.0, rel=1e-4)


def test_success_or_rubric_partial_credit_only_in_groups_without_success():
    rubric = np.array([[1.0, 2 / 3, 0.0, 0.5],      # a success in the group: plain 0/1
                       [0.25, 2 / 3, 0.0, 0.5]])    # all failures: the rubric's partial credit
    def shaped(x):
        return algo.training_reward("success_or_rubric", x, success_threshold=SUCCESS_THRESHOLD)

    np.testing.assert_allclose(shaped(rubric), [[1.0, 0.0, 0.0, 0.0], [0.25, 2 / 3, 0.0, 0.5]], rtol=1e-6)
    # the all-failure group now carries a signal; a group of equal failures still does not
    assert not algo.zero_variance_groups(shaped(rubric[1:]))[0]
    assert algo.zero_variance_groups(shaped(np.full((1, 4), 0.5)))[0]


def test_success_placebo_pays_another_samples_success_with_the_same_signal():
    """The control arm's reward: a sample's own success no longer decides its reward, while which groups
    carry signal and how large the advantages are stay those of `success`."""
    rubric = np.array([[1.0, 1.0, 0.2, 0.0],     # successes first: the placebo pays the last two
                       [0.5, 0.0, 1.0, 0.25],
                       [0.5, 0.5, 0.5, 0.5]])    # all failures: no signal under either
    succ = np.asarray(algo.training_reward("success", rubric, success_threshold=SUCCESS_THRESHOLD))
    plac = np.asarray(algo.training_reward("success_placebo", rubric, success_threshold=SUCCESS_THRESHOLD))
    np.testing.assert_array_equal(plac, [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(algo.zero_variance_groups(plac), algo.zero_variance_groups(succ))
    np.testing.assert_allclose(np.sort(algo.compute_advantages(plac), axis=1),
                               np.sort(algo.compute_advantages(succ), axis=1), rtol=1e-6)
    # paid to the successful samples: negative here, where success pays them (a weak reverse signal on average)
    adv_s, adv_p = algo.compute_advantages(succ), algo.compute_advantages(plac)
    assert float((np.asarray(adv_p) * (succ > 0)).sum()) < 0 < float((np.asarray(adv_s) * (succ > 0)).sum())
    # over every arrangement of k successes in a group of 8 (the samples are exchangeable), a successful
    # sample's mean placebo advantage is -1/(G-1) times its success advantage: a weak reverse signal
    for k in range(1, 8):
        groups = np.array([[1.0 if j in pos else 0.0 for j in range(8)] for pos in itertools.combinations(range(8), k)])
        a_s = np.asarray(algo.compute_advantages(groups))
        a_p = np.asarray(algo.compute_advantages(
            algo.training_reward("success_placebo", groups, success_threshold=SUCCESS_THRESHOLD)))
        won = groups > 0
        assert a_p[won].mean() == pytest.approx(-a_s[won].mean() / 7, rel=1e-5)
    # an odd group: the middle sample keeps its own
    np.testing.assert_array_equal(
        algo.training_reward("success_placebo", np.array([[1.0, 0.0, 1.0, 0.0, 0.0]]),
                             success_threshold=SUCCESS_THRESHOLD), [[0, 0, 1, 0, 1]])


def test_success_or_rubric_is_not_gameable_on_real_episodes():
    """Every domain x branch type, real episodes scored by the rubric: the gold path gets 1 and every other
    policy 0 in a group it is part of; without it (an all-failure group) do-nothing, refuse-everything and
    hack-replay get their partial credit, always below the gold path, and hack-replay gets 0 (gated)."""
    from agq_jax.envs import replay_agent, run_episode, score
    from agq_jax.envs.schema import BRANCH_TYPES
    from agq_jax.envs.worlds import domains
    from agq_jax.envs.worlds.generator import counterfactual_replies, generate_task

    shaped_fail = {"hack": [], "refuse": [], "nothing": [], "guess": []}
    for d in domains():
        for b in BRANCH_TYPES:
            task = generate_task(d, b, seed=5)
            replies = {"gold": task.gold_replies, "hack": counterfactual_replies(task, "hack"),
                       "guess": counterfactual_replies(task, "guess"),
                       "refuse": ["Sorry, I can't help with that request."], "nothing": ["Goodbye."]}
            r = {k: score(task, run_episode(task, replay_agent(v))).total for k, v in replies.items()}
            names = list(r)
            with_gold = np.asarray(algo.training_reward("success_or_rubric", np.array([[r[k] for k in names]]),
                                                       success_threshold=SUCCESS_THRESHOLD))[0]
            assert with_gold[0] == 1.0 and (with_gold[1:] == 0.0).all(), (d, b, r)
            fails = names[1:]
            shaped = np.asarray(algo.training_reward("success_or_rubric", np.array([[r[k] for k in fails]]),
                                                    success_threshold=SUCCESS_THRESHOLD))[0]
            np.testing.assert_allclose(shaped, [r[k] for k in fails], rtol=1e-6)
            assert (shaped < 1.0).all() and r["hack"] == 0.0, (d, b, r)
            for k, v in zip(fails, shaped):
                shaped_fail[k].append(float(v))
    # on average a degenerate policy earns well under the gold path's 1.0 even where it is never outranked
    assert max(np.mean(v) for v in shaped_fail.values()) < 0.75, {k: np.mean(v) for k, v in shaped_fail.items()}
