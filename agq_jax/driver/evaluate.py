"""Held-out evaluation: pass@1 from a greedy run and pass@k / pass^k from k samples at temperature,
per domain and branch type (agq_jax.envs.metrics), plus termination reasons.

The evaluation RNG is a fixed function of the config seed, so two checkpoints (e.g. SFT-only and after
GRPO) are compared on the same tasks with the same sampling seeds.
"""
from __future__ import annotations

import types
from collections import Counter

import jax

from agq_jax.driver.data import Item, score_env


def _as_task(item: Item):
    """What envs.metrics.summarize reads of a task (domain, branch type, legality) for both families."""
    if item.kind == "agentic":
        return item.obj
    return types.SimpleNamespace(domain=item.domain, branch=types.SimpleNamespace(branch_type="answer", legal=True))


def rollout_items(policy, items: list[Item], *, params, rng, batch_size: int, repeats: int = 1):
    """Run `repeats` episodes of every item in batches; returns episodes grouped per item (item order)."""
    from agq_jax.envs.tools import SharedToolCache

    jobs = [(i, r) for i in range(len(items)) for r in range(repeats)]
    out: list[list] = [[] for _ in items]
    caches = [SharedToolCache() for _ in items]   # the repeats of a task see one consistent world
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start: start + batch_size]
        rng, sub = jax.random.split(rng)
        envs = [policy.make_env(items[i], tool_cache=caches[i]) for i, _ in chunk]
        batch = policy.rollouts(envs, params=params, rng=sub, group_ids=[i for i, _ in chunk])
        for (i, _), ep in zip(chunk, batch.episodes):
            out[i].append(ep)
    return out


def evaluate(policy, items: list[Item], ev, seed: int, *, tag: str) -> dict:
    """Metrics of the current policy on `items` under `ev` (the run config's `eval` section); the sampling
    RNG is a function of `seed` alone. Returns {"greedy", "sampled", "flat", "tag"}."""
    from agq_jax.envs.metrics import summarize

    k = ev.k
    ks = sorted({1, k} | ({2} if k >= 2 else set()))
    rng = jax.random.key(seed * 7919 + 17)
    g_rng, s_rng = jax.random.split(rng)
    flat: dict[str, float] = {}
    result: dict = {"tag": tag}
    bs = ev.batch_size
    greedy_on = ev.greedy_pass1
    terms: Counter = Counter()
    if greedy_on:
        greedy = rollout_items(policy, items, params=policy.sampling(greedy=True), rng=g_rng, batch_size=bs)
        g_sum = summarize([(_as_task(it), [e.reward for e in eps]) for it, eps in zip(items, greedy)], ks=(1,))
        result["greedy"] = g_sum
        for grp, st in g_sum.items():
            flat[f"eval/{grp}/greedy_pass@1"] = st.get("pass@1", 0.0)
            flat[f"eval/{grp}/greedy_reward"] = st["reward_mean"]
        terms.update(e.termination for eps in greedy for e in eps)
    sampled = []
    if k > 0:
        sampled = rollout_items(policy, items, params=policy.sampling(temperature=ev.temperature),
                                rng=s_rng, batch_size=bs, repeats=k)
        s_sum = summarize([(_as_task(it), [e.reward for e in eps]) for it, eps in zip(items, sampled)], ks=ks)
        result["sampled"] = s_sum
        for grp, st in s_sum.items():
            for key, v in st.items():
                if key != "n_tasks":
                    flat[f"eval/{grp}/{key}"] = v
        terms.update(e.termination for eps in sampled for e in eps)
    n_eps = max(sum(terms.values()), 1)
    flat.update({f"eval/termination/{t}": c / n_eps for t, c in sorted(terms.items())})
    result["flat"] = flat
    return result


def headline(result: dict) -> dict[str, float]:
    """The few numbers printed side by side (SFT-only vs after GRPO)."""
    f = result["flat"]
    keys = ["eval/all/greedy_pass@1", "eval/all/greedy_reward", "eval/all/reward_mean", "eval/all/pass@1"]
    keys += [k for k in sorted(f) if k.startswith("eval/all/pass@") or k.startswith("eval/all/pass^")]
    return {k: f[k] for k in dict.fromkeys(keys) if k in f}


def episode_for_failure(ep) -> dict:
    """A compact, JSON-able record of a failed episode for the flywheel (transcript + reward components)."""
    rec = ep.record
    msgs = getattr(rec, "messages", None)
    return {"termination": ep.termination, "reward": ep.reward, "components": ep.reward_components,
            "messages": msgs[-12:] if msgs else None}


__all__ = ["evaluate", "rollout_items", "headline", "episode_for_failure", "score_env"]
