"""Multi-host rollouts: two CPU processes on localhost (jax.distributed), each stepping only its half of the
envs, return the same episodes as one process running the whole batch.

The policy is a tiny random Qwen3 built by the driver (`build_model`; in the workers, two CPU devices each,
sharded over the 4-device two-process mesh). Dense: each process samples on its own 2-device rollout group
with a padded batch. MoE with `rollout.expert_shards=4`: one rollout copy spans both processes (its experts
split over all 4 devices), so the two processes run the group's sampler programs together, each feeding its
own rows. The envs are real procedural mock-world tasks with the scripted user and state tools, the
tokenizer is the driver tests' word-level one (tests/_train_tiny.py) so prompts stay short.
"""
import json
import os

import numpy as np
import pytest

from _multiprocess import init_worker, start_workers, wait_workers

N_TASKS, GROUP = 4, 2
# (number of envs, sampling settings, rng seed): an even split and an uneven one with top-k.
CASES = [(N_TASKS * GROUP, dict(temperature=1.0), 11), (5, dict(temperature=0.8, top_k=5), 12)]


MOE = dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)


def setup(family: str = "dense"):
    """(config, tokenizer, tasks): identical on every process."""
    from _train_tiny import action_tokenizer, load_tiny_config, run_config, system_prompts
    from agq_jax.envs.worlds.generator import generate_tasks

    tasks = generate_tasks(N_TASKS, seed=5)
    words = sorted({w for t in tasks for m in t.gold_trajectory if m["role"] in ("user", "tool")
                    for w in m["content"].split()})
    actions = [r for t in tasks for r in t.gold_replies] + ["Goodbye.", "Sorry, I can't help with that."]
    tok = action_tokenizer(actions, words, system_prompts(tasks))
    cfg = load_tiny_config()
    cfg.model.overrides.update(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16)
    cfg.rollout.update(max_len=256, max_new_tokens_per_turn=3, chunk_size=64)
    cfg.env.update(max_agent_turns=4, max_user_turns=4)
    if family == "moe":
        cfg.model.overrides.update(MOE)
        cfg.rollout.expert_shards = 4  # one copy over both processes' 4 devices
    return run_config(cfg), tok, tasks


class CountingEnv:
    """Delegates to a real env and counts reset/step calls (which rows this process ran)."""

    def __init__(self, env):
        self._env, self.resets, self.steps = env, 0, 0

    def __getattr__(self, name):
        return getattr(self._env, name)

    def reset(self):
        self.resets += 1
        return self._env.reset()

    def step(self, *a, **kw):
        self.steps += 1
        return self._env.step(*a, **kw)


def run_cases(policy, tasks) -> dict:
    import jax

    from agq_jax.driver.data import AGENTIC, Item, make_env, make_world
    from agq_jax.rollout import SamplingParams

    out = {"cases": [], "steps": [], "resets": []}
    items = [Item(kind=AGENTIC, id=t.id, obj=t) for t in tasks]
    for n, sp, seed in CASES:
        world = make_world(policy.rc.env)
        envs = [CountingEnv(make_env(items[(i // GROUP) % len(items)], world)) for i in range(n)]
        batch = policy.rollouts(envs, params=SamplingParams(stop_ids=policy.stop_ids, **sp), rng=jax.random.key(seed),
                                group_ids=[i // GROUP for i in range(n)])
        out["cases"].append([episode_dict(e) for e in batch.episodes])
        out["steps"].append([e.steps for e in envs])
        out["resets"].append([e.resets for e in envs])
    return out


def episode_dict(e) -> dict:
    return {"task_id": e.task_id, "group_id": e.group_id, "token_ids": list(e.token_ids), "loss_mask": list(e.loss_mask),
            "logprobs": list(e.logprobs), "sample_logprobs": list(e.sample_logprobs), "prompt_len": e.prompt_len,
            "turn_spans": [list(s) for s in e.turn_spans], "num_turns": e.num_turns, "termination": e.termination,
            "overlong": e.overlong, "reward": e.reward, "reward_components": e.reward_components,
            "reward_gates": e.reward_gates, "turn_finish": e.turn_finish, "messages": e.record.messages,
            "record_type": type(e.record).__name__}


def test_row_noise_is_the_rows_of_the_whole_draw():
    """Per-row sampling noise: rows `row_ids` of one draw over the whole batch, for any subset, order and
    batch split (counters past 2**32 included), so an episode's noise follows its row in the whole batch."""
    import jax
    import jax.numpy as jnp

    from agq_jax.rollout.multihost import row_bounds
    from agq_jax.rollout.sampler import row_noise

    assert row_bounds(5, 2) == [(0, 3), (3, 5)] and row_bounds(1, 3) == [(0, 1), (1, 1), (1, 1)]
    key = jax.random.split(jax.random.key(3))[1]
    full = np.asarray(jax.random.gumbel(key, (9, 50)))
    for rows in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [4, 5, 6], [8, 2]):
        got = jax.jit(row_noise, static_argnums=(2, 3))(key, jnp.asarray(rows), (len(rows), 50), jnp.float32)
        np.testing.assert_array_equal(np.asarray(got), full[rows])
    # row * width > 2**32: the 64-bit counter row * width + j carries into its high word
    from jax.extend.random import threefry2x32_p

    from agq_jax.rollout.sampler import _row_bits

    width, row = 151_936, 30_000
    data = jax.random.key_data(key)
    got = _row_bits(jnp.concatenate([data, jnp.asarray([row], jnp.uint32)]), 32, (width,))
    counters = row * width + np.arange(width, dtype=np.int64)
    b1, b2 = threefry2x32_p.bind(data[0], data[1], jnp.asarray(counters >> 32, jnp.uint32),
                                 jnp.asarray(counters & 0xFFFFFFFF, jnp.uint32))
    assert counters[-1] > 2**32 and np.array_equal(np.asarray(got), np.asarray(b1 ^ b2))
    with pytest.raises(ValueError, match="threefry2x32"):
        row_noise(jax.random.key(0, impl="rbg"), jnp.arange(2), (2, 5), jnp.float32)


def test_decode_batches_give_the_episodes_of_one_batch():
    """rollout.decode_batch_size: decoding 3 episodes at a time gives the same episodes as all at once (each
    batch draws its rows' noise as those rows of the whole batch's draw: sampler.row_noise)."""
    from agq_jax.driver.build import build_model
    from agq_jax.driver.policy import Policy
    from agq_jax.tokenizer import SpecialIds

    rc, tok, tasks = setup()
    ids = SpecialIds.of(tok)
    model = build_model(rc, tok, ids)
    whole = Policy(rc, model, tok, ids)
    batched = Policy(rc.replace(**{"rollout.decode_batch_size": 3}), model, tok, ids)
    try:
        ref, got = run_cases(whole, tasks), run_cases(batched, tasks)
    finally:
        whole.close()
        batched.close()
    for c, (ra, ga) in enumerate(zip(ref["cases"], got["cases"])):
        assert len(ra) == len(ga)
        for i, (r, g) in enumerate(zip(ra, ga)):
            for key in ("logprobs", "sample_logprobs"):
                np.testing.assert_allclose(g.pop(key), r.pop(key), atol=1e-5, err_msg=f"case {c} row {i} {key}")
            assert g == r, f"case {c} row {i}"


@pytest.mark.parametrize("family", ["dense", "moe"], ids=["group-per-host", "group-spans-hosts"])
def test_two_process_rollouts_equal_one_process(tmp_path, family):
    procs = start_workers(__file__, tmp_path, devices_per_process=2, args=(family,))

    from agq_jax.driver.build import build_model
    from agq_jax.driver.policy import Policy
    from agq_jax.tokenizer import SpecialIds

    rc, tok, tasks = setup(family)
    ids = SpecialIds.of(tok)
    policy = Policy(rc, build_model(rc, tok, ids), tok, ids)  # one process, no mesh: the reference
    try:
        ref = run_cases(policy, tasks)
    finally:
        policy.close()

    wait_workers(procs, timeout_s=300)
    got = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]

    assert max(e["num_turns"] for case in ref["cases"] for e in case) >= 2  # real multi-turn episodes
    for c, (n, _, _) in enumerate(CASES):
        half = -(-n // 2)
        # each process reset and stepped exactly its own contiguous half of the envs
        for pid, (lo, hi) in enumerate([(0, half), (half, n)]):
            mine = np.arange(n)[lo:hi]
            assert [got[pid]["resets"][c][i] for i in range(n)] == [int(lo <= i < hi) for i in range(n)]
            assert all(got[pid]["steps"][c][i] >= 1 for i in mine)
            assert sum(got[pid]["steps"][c]) == sum(ref["steps"][c][i] for i in mine)
        assert got[0]["cases"][c] == got[1]["cases"][c]  # both processes hold the same full list
        assert len(got[0]["cases"][c]) == n
        for i, (r, g) in enumerate(zip(ref["cases"][c], got[0]["cases"][c])):
            for key in ("logprobs", "sample_logprobs"):
                np.testing.assert_allclose(g.pop(key), r.pop(key), atol=1e-5, err_msg=f"case {c} row {i} {key}")
            assert g == r, f"case {c} row {i}"


if __name__ == "__main__":  # one of the two worker processes
    import sys

    pid, out = init_worker()
    import jax

    from agq_jax.driver.build import build_model
    from agq_jax.driver.policy import Policy
    from agq_jax.tokenizer import SpecialIds
    from agq_jax.models.sharding import MeshConfig, make_mesh

    assert jax.process_count() == 2 and jax.device_count() == 4
    family = sys.argv[5]
    rc, tok, tasks = setup(family)
    ids = SpecialIds.of(tok)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4))  # the driver's layout: params split across all 4 devices
    policy = Policy(rc, build_model(rc, tok, ids, mesh), tok, ids, mesh)
    try:
        result = run_cases(policy, tasks)
        sampler = policy._local[1]
        if family == "dense":  # each process: its own 2-device group, rows split over its 2 copies
            assert sampler.processes == 1 and dict(sampler.mesh.shape) == dict(data=2, fsdp=1, tensor=1, expert=1)
        else:  # one group over both processes: experts and rows split over the 4 devices
            assert sampler.processes == 2 and dict(sampler.mesh.shape) == dict(data=1, fsdp=1, tensor=1, expert=4)
            up = policy._local[2]["blocks"][0]["layer"]["mlp"]["experts_up_proj"][...]  # [layers, experts, ...]
            assert up.sharding.spec[1] == "expert" and len(up.addressable_shards) == 2
            assert sampler.batch_multiple == 2
    finally:
        policy.close()
    with open(os.path.join(out, f"out{pid}.json"), "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()
