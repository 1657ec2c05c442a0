"""GRPO-family math as small pure functions, registered by name so configs pick them with a string.

Conventions (shared with `step.py` and the rollout module):
- Per-token arrays are `[B, T]` and *token aligned*: `logp[b, t]` is the log-probability of token
  `input_ids[b, t]` given tokens `< t`; `mask[b, t]` (the loss mask) is 1 on policy tokens only.
- Rewards for advantage estimators are `[P, G]`: P prompts (groups) × G rollouts each.
- Every function works on numpy or jax arrays (it uses `jnp`), so tests check it against numpy.

Losses return a *numerator* per token; the aggregation modes turn it into a scalar through
`(numerator, denominator)` pairs so a mini-batch split into micro-batches (gradient accumulation)
or across devices/processes gives exactly the full-batch value.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


ADVANTAGES: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}
AGGREGATIONS: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
TRAINING_REWARDS: dict[str, Callable] = {}


def _register(table: dict, kind: str):
    def deco(name: str):
        def wrap(fn):
            if name in table:
                raise ValueError(f"{kind} {name!r} registered twice")
            table[name] = fn
            return fn
        return wrap
    return deco


register_advantage = _register(ADVANTAGES, "advantage estimator")
register_policy_loss = _register(POLICY_LOSSES, "policy loss")
register_aggregation = _register(AGGREGATIONS, "loss aggregation")
register_kl = _register(KL_ESTIMATORS, "KL estimator")
register_training_reward = _register(TRAINING_REWARDS, "training reward")


def lookup(table: dict, name: str, kind: str) -> Callable:
    """Registry lookup with an error that lists the valid names."""
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered: {sorted(table)}")
    return table[name]


# ----------------------------------------------------------------------------- advantages

def _check_groups(rewards):
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {rewards.shape}")
    return jnp.asarray(rewards, jnp.float32)


@register_advantage("grpo")
def grpo_advantages(rewards, *, std_normalize: bool = True, eps: float = 1e-6, std_ddof: int = 1):
    """GRPO: (r - group mean) / (group std + eps); `std_normalize=False` keeps only the centring.

    std uses ddof=1 by default (the unbiased estimate, as in the reference implementations)."""
    r = _check_groups(rewards)
    centred = r - r.mean(axis=1, keepdims=True)
    if not std_normalize:
        return centred
    g = r.shape[1]
    ddof = std_ddof if g > std_ddof else 0
    std = jnp.sqrt((centred**2).sum(axis=1, keepdims=True) / (g - ddof))
    return centred / (std + eps)


@register_advantage("drgrpo")
def drgrpo_advantages(rewards, **_):
    """Dr.GRPO: centred rewards without std normalisation (pair with the `drgrpo` aggregation)."""
    return grpo_advantages(rewards, std_normalize=False)


@register_advantage("rloo")
def rloo_advantages(rewards, **_):
    """Leave-one-out baseline: r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean)."""
    r = _check_groups(rewards)
    g = r.shape[1]
    if g < 2:
        raise ValueError(f"rloo needs group_size >= 2, got {g}")
    return (r - r.mean(axis=1, keepdims=True)) * (g / (g - 1))


def weight_negative_advantages(advantages, weight: float):
    """Scale the negative advantages by `weight` (1 = plain GRPO). Below 1 the update leans on reinforcing
    successes (which sharpens the policy) over pushing failures down (which spreads their probability over
    every other token, raising entropy on tokens the reward never looks at)."""
    a = jnp.asarray(advantages, jnp.float32)
    if weight < 0:
        raise ValueError(f"negative-advantage weight must be >= 0, got {weight}")
    return jnp.where(a < 0, weight * a, a)


def compute_advantages(rewards, estimator: str = "grpo", **kwargs):
    """[P, G] rewards -> [P, G] advantages with the named estimator."""
    return lookup(ADVANTAGES, estimator, "advantage estimator")(rewards, **kwargs)


# ----------------------------------------------------------------------------- policy losses

class PolicyLossOut(NamedTuple):
    """Per-token loss (to be aggregated) and per-token diagnostics (0/1 clip indicators, ratio)."""
    loss: jax.Array        # [B, T], zero outside the mask
    ratio: jax.Array       # [B, T] importance ratio actually used by the loss
    clipped_low: jax.Array   # [B, T] 1 where the lower clip was active (A < 0, ratio < 1 - eps_low)
    clipped_high: jax.Array  # [B, T] 1 where the upper clip was active (A > 0, ratio > 1 + eps_high)


def _clipped_objective(ratio, adv, mask, eps_low, eps_high, dual_clip_c):
    """-min(r A, clip(r) A), optionally dual-clipped at -c A for negative advantages."""
    unclipped = -ratio * adv
    clipped = -jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        loss = jnp.where(adv < 0, jnp.minimum(loss, -dual_clip_c * adv), loss)
    m = mask.astype(jnp.float32)
    low = ((ratio < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32) * m
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32) * m
    return loss * m, low, high


def _seq_adv(advantages, mask):
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]
    if adv.shape[0] != mask.shape[0]:
        raise ValueError(f"advantages {adv.shape} do not match mask {mask.shape}")
    return adv


@register_policy_loss("ppo_clip")
def ppo_clip_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.28,
                  dual_clip_c: float | None = None, **_):
    """Token-level PPO clip with clip-higher (DAPO: eps_low=0.2, eps_high=0.28), optional dual clip."""
    mask = jnp.asarray(mask, jnp.float32)
    adv = _seq_adv(advantages, mask)
    log_ratio = jnp.where(mask > 0, logp - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    loss, low, high = _clipped_objective(ratio, adv, mask, clip_low, clip_high, dual_clip_c)
    return PolicyLossOut(loss, ratio * mask, low, high)


@register_policy_loss("gspo")
def gspo_loss(logp, old_logp, advantages, mask, *, gspo_clip_low: float = 3e-4,
              gspo_clip_high: float = 4e-4, **_):
    """GSPO: sequence ratio s = exp(mean_t (logp - old_logp)) clipped per sequence.

    The token form s_t = sg(s) * exp(logp_t - sg(logp_t)) has the value of s and the gradient
    s * grad(logp_t) / |y|-weighted through the aggregation (use `seq-mean-token-mean`)."""
    mask = jnp.asarray(mask, jnp.float32)
    adv = _seq_adv(advantages, mask)
    log_ratio = jnp.where(mask > 0, logp - old_logp, 0.0)
    n_tok = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    seq_log_ratio = log_ratio.sum(axis=1, keepdims=True) / n_tok
    token_log_ratio = jax.lax.stop_gradient(seq_log_ratio) + logp - jax.lax.stop_gradient(logp)
    ratio = jnp.exp(jnp.where(mask > 0, token_log_ratio, 0.0))
    loss, low, high = _clipped_objective(ratio, adv, mask, gspo_clip_low, gspo_clip_high, None)
    return PolicyLossOut(loss, ratio * mask, low, high)


def policy_loss(name: str, logp, old_logp, advantages, mask, **kwargs) -> PolicyLossOut:
    return lookup(POLICY_LOSSES, name, "policy loss")(logp, old_logp, advantages, mask, **kwargs)


# ----------------------------------------------------------------------------- aggregation

@register_aggregation("token-mean")
def agg_token_mean(values, mask, **_):
    """Every policy token of the batch weighs the same (DAPO default)."""
    m = jnp.asarray(mask, jnp.float32)
    return (values * m).sum(), m.sum()


@register_aggregation("seq-mean-token-mean")
def agg_seq_mean_token_mean(values, mask, **_):
    """Mean over sequences of each sequence's token mean (original GRPO, GSPO)."""
    m = jnp.asarray(mask, jnp.float32)
    n_tok = m.sum(axis=1)
    per_seq = (values * m).sum(axis=1) / jnp.maximum(n_tok, 1.0)
    has = (n_tok > 0).astype(jnp.float32)
    return (per_seq * has).sum(), has.sum()


@register_aggregation("seq-mean-token-sum")
def agg_seq_mean_token_sum(values, mask, **_):
    """Mean over sequences of each sequence's token sum."""
    m = jnp.asarray(mask, jnp.float32)
    has = (m.sum(axis=1) > 0).astype(jnp.float32)
    return (values * m).sum(), has.sum()


@register_aggregation("drgrpo")
def agg_drgrpo(values, mask, *, norm_len: int | None = None, **_):
    """Dr.GRPO: token sum divided by a constant (num sequences × `norm_len`, default the padded T)."""
    m = jnp.asarray(mask, jnp.float32)
    length = m.shape[1] if norm_len is None else norm_len
    return (values * m).sum(), jnp.asarray(m.shape[0] * float(length), jnp.float32)


def aggregate_parts(name: str, values, mask, **kwargs):
    """(numerator, denominator) of the named aggregation; the loss is their ratio."""
    return lookup(AGGREGATIONS, name, "loss aggregation")(values, mask, **kwargs)


def aggregate(name: str, values, mask, **kwargs):
    num, den = aggregate_parts(name, values, mask, **kwargs)
    return num / jnp.maximum(den, 1e-8)


# ----------------------------------------------------------------------------- KL estimators
# Schulman's estimators of KL(pi || ref) from samples of pi, with log r = ref_logp - logp.

@register_kl("k1")
def kl_k1(logp, ref_logp):
    return logp - ref_logp


@register_kl("k2")
def kl_k2(logp, ref_logp):
    return 0.5 * (ref_logp - logp) ** 2


@register_kl("k3")
def kl_k3(logp, ref_logp, clamp: float = 10.0):
    """exp(log r) - log r - 1 >= 0, unbiased, low variance; log r clamped for stability."""
    log_r = jnp.clip(ref_logp - logp, -clamp, clamp)
    return jnp.exp(log_r) - log_r - 1.0


def kl_estimate(name: str, logp, ref_logp):
    return lookup(KL_ESTIMATORS, name, "KL estimator")(logp, ref_logp)


# ----------------------------------------------------------------------------- training rewards
# What GRPO optimises, from the rubric reward in [0, 1] (sub-goal fraction x gates; 1 = success). The
# evaluation always reports the rubric reward and success; only the advantage sees the shaped value. What
# counts as a success is the environment's (agq_jax.envs.rewards.SUCCESS_THRESHOLD): the caller passes it.


@register_training_reward("rubric")
def reward_rubric(rubric, success_threshold: float):
    """Partial credit: every met sub-goal counts (dense, but a policy can climb it without succeeding)."""
    return jnp.asarray(rubric, jnp.float32)


@register_training_reward("success")
def reward_success(rubric, success_threshold: float):
    """1 for a task completed (every sub-goal met, no gate failed), else 0: the pass@k objective itself."""
    return (jnp.asarray(rubric, jnp.float32) >= success_threshold).astype(jnp.float32)


@register_training_reward("rubric+success")
def reward_rubric_success(rubric, success_threshold: float):
    """Half partial credit, half success: success always outranks any partial episode."""
    return 0.5 * (reward_rubric(rubric, success_threshold) + reward_success(rubric, success_threshold))


@register_training_reward("success_or_rubric")
def reward_success_or_rubric(rubric, success_threshold: float):
    """Success (0/1), except in a group where no sample succeeded: there the rubric's partial credit, so a
    group of all failures (a branch type the policy cannot yet solve) still ranks its samples by sub-goals
    met instead of carrying no signal. A success anywhere in the group restores the 0/1 objective, so
    partial credit never competes with a success. The last axis is the group ([..., G])."""
    r = jnp.asarray(rubric, jnp.float32)
    success = reward_success(r, success_threshold)
    return jnp.where(success.max(axis=-1, keepdims=True) > 0, success, r)


@register_training_reward("success_placebo")
def reward_success_placebo(rubric, success_threshold: float):
    """A control, not a recipe: each sample gets the success of another sample of its group (the group
    reversed; the middle one of an odd group keeps its own), whatever it did itself. The groups with signal
    and the advantages' sizes are exactly those of `success`: what updates of that size do without the
    information (bench_learning's `placebo` arm). Not quite no information: the other sample succeeds a
    little less often when this one did, so in expectation each advantage is -1/(G-1) times its `success`
    advantage (a weak reverse signal). The last axis is the group ([..., G])."""
    return reward_success(rubric, success_threshold)[..., ::-1]


def training_reward(name: str, rubric, *, success_threshold: float):
    return lookup(TRAINING_REWARDS, name, "training reward")(rubric, success_threshold)


# ----------------------------------------------------------------------------- entropy

def entropy_from_logits(logits):
    """H = logsumexp(z) - sum softmax(z) z over the last axis, in fp32."""
    z = jnp.asarray(logits, jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    return lse - (jax.nn.softmax(z, axis=-1) * z).sum(axis=-1)


# ----------------------------------------------------------------------------- batch filters (host side)

def zero_variance_groups(rewards, atol: float = 1e-6):
    """Dynamic sampling (DAPO): bool [P] True where all G rewards are equal (no learning signal)."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {r.shape}")
    return (r.max(axis=1) - r.min(axis=1)) <= atol


def dynamic_sampling_filter(rewards, atol: float = 1e-6):
    """Indices of groups to keep and the fraction dropped; the driver refills the batch by sampling more."""
    zero = zero_variance_groups(rewards, atol)
    return np.nonzero(~zero)[0], float(zero.mean()) if zero.size else 0.0


def overlong_filter(loss_mask, truncated):
    """Overlong filtering: truncated responses (hit the length limit) contribute no loss."""
    lm = np.asarray(loss_mask)
    tr = np.asarray(truncated, bool)
    if tr.shape != lm.shape[:1]:
        raise ValueError(f"truncated {tr.shape} must be [B] matching loss_mask {lm.shape}")
    return lm * (~tr)[:, None].astype(lm.dtype)


def overlong_soft_penalty(response_lengths, max_len: int, cache_len: int):
    """DAPO soft overlong punishment: 0 up to max_len - cache_len, then linear down to -1 at max_len."""
    n = np.asarray(response_lengths, np.float64)
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len} max_len={max_len}")
    start = max_len - cache_len
    return np.where(n <= start, 0.0, np.where(n <= max_len, (start - n) / cache_len, -1.0))
