"""Multi-turn rollouts against real procedural mock-world envs with the real Qwen3 tokenizer.

The policy is a tiny random Qwen3 (real 151,936-row vocabulary) with a planted bigram path: after
"<|im_start|>assistant\\n" it says either "Could you check it?<|im_end|>" (the scripted user answers) or
"<tool_call>oops</tool_call>" (stops on </tool_call>; the env answers with a malformed-call tool turn),
so episodes really run several turns through both env-turn kinds. The layers stay random, so the
log-probs depend on the whole context and the full-forward comparison checks the KV continuation.
"""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agq_jax import tokenizer as qtok
from agq_jax.envs.rewards import score
from agq_jax.envs.runtime import EpisodeLimits, make_env
from agq_jax.envs.worlds.generator import generate_task
from agq_jax.models import qwen3
from agq_jax.rollout.multiturn import RolloutConfig, pack_episodes, run_rollouts
from agq_jax.rollout.sampler import Sampler, SamplingParams

DOMAINS = ("retail", "bank", "clinic", "library")
PARAMS = SamplingParams(temperature=0.7)  # the default stop ids: <|im_end|> and </tool_call>
CONFIG = RolloutConfig(max_len=1024, max_new_tokens_per_turn=16)


@pytest.fixture(scope="module")
def tok():
    return qtok.load_qwen3_tokenizer()


def plant_bigrams(model, edges: dict[int, list[int]], scale: float = 2.0):
    """Token t's embedding becomes a basis vector whose LM-head columns are its successors."""
    emb = np.array(model.embed_tokens[...])
    head = np.array(model.lm_head[...])
    for i, t in enumerate(sorted(edges)):
        emb[t] = 0.0
        emb[t, i] = 1.0
        for nxt in edges[t]:
            head[:, nxt] = 0.0
            head[i, nxt] = scale
    model.embed_tokens[...] = jnp.asarray(emb)
    model.lm_head[...] = jnp.asarray(head)


@pytest.fixture(scope="module")
def policy(tok):
    cfg = qwen3.Qwen3Config(vocab_size=qtok.MODEL_VOCAB_SIZE, hidden_size=64, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            initializer_range=0.02, tie_word_embeddings=False)
    model = qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    ask = tok.encode("Could you check it?", add_special_tokens=False) + [qtok.IM_END_ID]
    call = tok.encode("<tool_call>oops</tool_call>", add_special_tokens=False)
    newline = tok.encode("\n", add_special_tokens=False)[0]
    edges = {newline: [ask[0], call[0]]}
    for seq in (ask, call):
        edges.update({a: [b] for a, b in zip(seq, seq[1:])})
    plant_bigrams(model, edges)
    return model, Sampler(model, chunk_size=256)


class BarrierEnv:
    """A real env whose first step waits until every env of the batch is inside step() at once."""

    def __init__(self, env, barrier):
        self._env, self._barrier, self._first = env, barrier, True

    def step(self, reply, **kw):
        if self._first:
            self._first = False
            self._barrier.wait()  # raises BrokenBarrierError (timeout) if steps ran one after another
        return self._env.step(reply, **kw)

    def __getattr__(self, name):
        return getattr(self._env, name)


@nnx.jit
def _hidden(model, ids):
    return model.hidden_states(ids)[0]


def check_episode(tok, model, ep):
    """The training sequence is prompt + sampled ids + env suffixes, rebuilt from the env's own transcript."""
    rec = ep.record
    ids, mask = ep.token_ids, np.asarray(ep.loss_mask)
    assert len(ids) == len(mask) == len(ep.logprobs) == len(ep.sample_logprobs)
    assert ids[: ep.prompt_len] == qtok.encode_chat(tok, rec.messages[:2], None, add_generation_prompt=True)
    env_turns, current = [], None
    for m in rec.messages[2:]:  # group the env's messages that follow each assistant message
        if m["role"] == "assistant":
            current = []
            env_turns.append(current)
        else:
            current.append(m)
    assert len(ep.turn_spans) == ep.num_turns == len(rec.raw_replies) == len(env_turns)
    pos = ep.prompt_len
    for k, (a, b) in enumerate(ep.turn_spans):
        assert a == pos and b > a
        reply = ids[a:b]
        closed = reply[-1] == qtok.IM_END_ID
        assert tok.decode(reply[:-1] if closed else reply, skip_special_tokens=False) == rec.raw_replies[k]
        pos = b
        if k + 1 < len(ep.turn_spans):
            suffix = qtok.encode_env_turns(tok, env_turns[k], after_im_end=closed)
            assert ids[b: b + len(suffix)] == suffix
            pos = b + len(suffix)
    assert pos == len(ids)
    want_mask = np.zeros(len(ids), int)
    for a, b in ep.turn_spans:
        want_mask[a:b] = 1
    np.testing.assert_array_equal(mask, want_mask)
    assert np.all(np.asarray(ep.logprobs)[mask == 0] == 0.0)
    # sampler log-probs == log_softmax of one fresh full forward over the final sequence
    hidden = np.asarray(_hidden(model, jnp.asarray([ids], jnp.int32))[0], np.float64)
    pos_ = np.nonzero(mask)[0]
    logits = hidden[pos_ - 1] @ np.asarray(model.unembed(), np.float64)
    m = logits.max(-1, keepdims=True)
    lsm = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    want = lsm[np.arange(len(pos_)), np.asarray(ids)[pos_]]
    np.testing.assert_allclose(np.asarray(ep.logprobs)[pos_], want, atol=5e-5)
    return want


@pytest.fixture(scope="module")
def rollout(tok, policy):
    model, sampler = policy
    tasks = [generate_task(d, "legal", seed=1) for d in DOMAINS]
    barrier = threading.Barrier(len(tasks), timeout=60)
    envs = [BarrierEnv(make_env(t, limits=EpisodeLimits(max_agent_turns=k)), barrier)
            for t, k in zip(tasks, (2, 3, 4, 5))]
    batch = run_rollouts(sampler, model, envs, tok, params=PARAMS, config=CONFIG, rng=jax.random.key(0),
                         group_ids=[0, 0, 1, 1])
    return tasks, envs, batch


def test_multiturn_sequences_are_token_exact_with_policy_logprobs(tok, policy, rollout):
    model, _ = policy
    tasks, envs, batch = rollout
    assert [e.num_turns for e in batch.episodes] == [2, 3, 4, 5]  # episodes end at different turns
    assert all(e.termination == "max_agent_turns" and not e.overlong for e in batch.episodes)
    all_lp = []
    for ep in batch.episodes:
        all_lp.append(check_episode(tok, model, ep))
    finishes = {f for e in batch.episodes for f in e.turn_finish}
    assert finishes == {"stop"}
    texts = "".join(r for e in batch.episodes for r in e.record.raw_replies)
    assert "Could you check it?" in texts and "<tool_call>oops</tool_call>" in texts  # both env-turn kinds ran
    roles = {m["role"] for e in batch.episodes for m in e.record.messages}
    assert {"tool", "user", "assistant"} <= roles
    lp = np.concatenate(all_lp)
    chain = lp[lp > -0.3]  # the near-deterministic bigram steps: their log-prob still depends on context
    assert chain.max() - chain.min() > 3e-4


def test_rewards_come_from_env_scoring_and_pack(tok, rollout):
    tasks, envs, batch = rollout
    for task, ep in zip(tasks, batch.episodes):
        want = score(task, ep.record)
        assert ep.reward == want.total and ep.reward_components == want.components
        assert ep.task_id == task.id
    packed = batch.pack(pad_to_multiple=64)
    n, t = packed["input_ids"].shape
    assert n == 4 and t % 64 == 0 and t >= max(len(e.token_ids) for e in batch.episodes)
    for i, ep in enumerate(batch.episodes):
        k = len(ep.token_ids)
        assert packed["input_ids"][i, :k].tolist() == ep.token_ids
        assert np.all(packed["input_ids"][i, k:] == qtok.PAD_TOKEN_ID) and packed["attention_mask"][i].sum() == k
        np.testing.assert_array_equal(packed["loss_mask"][i, :k], ep.loss_mask)
        np.testing.assert_array_equal(packed["old_logprobs"][i, :k], np.float32(ep.logprobs))
        assert packed["response_lengths"][i] == k - ep.prompt_len
    np.testing.assert_array_equal(packed["group_ids"], [0, 0, 1, 1])
    np.testing.assert_array_equal(packed["rewards"], batch.rewards)
    from agq_jax.rl.batch import validate_batch
    assert validate_batch({**packed, "advantages": np.zeros(n, np.float32)}, "grpo") == (n, t)
    sampled = pack_episodes(batch.episodes, logprob_source="sampling", max_len=t)
    np.testing.assert_array_equal(sampled["old_logprobs"][0, : len(batch.episodes[0].token_ids)],
                                  np.float32(batch.episodes[0].sample_logprobs))
    metrics = batch.metrics()
    assert metrics["rollout/turns_mean"] == 3.5 and metrics["termination/max_agent_turns"] == 1.0
    with pytest.raises(ValueError, match="exceeds max_len"):
        pack_episodes(batch.episodes, max_len=16)


def test_token_budget_ends_episodes_as_overlong(tok, policy):
    model, sampler = policy
    tasks = [generate_task(d, "legal", seed=2) for d in DOMAINS]
    limits = EpisodeLimits(max_agent_turns=100, max_user_turns=100, max_consecutive_malformed=100)
    envs = [make_env(t, limits=limits) for t in tasks]
    batch = run_rollouts(sampler, model, envs, tok, params=PARAMS, config=CONFIG, rng=jax.random.key(1))
    for ep in batch.episodes:
        assert ep.overlong and ep.termination == "overlong" and ep.record.termination == "max_tokens"
        assert len(ep.token_ids) <= CONFIG.max_len and ep.num_turns > 3
        check_episode(tok, model, ep)
    assert batch.pack()["truncated"].all()


def test_response_token_cap_ends_episodes_as_overlong(tok, policy):
    """rollout.max_response_tokens (the reference's 10,000): once the tokens after the prompt reach the cap the
    episode ends as overlong, well inside max_len."""
    model, sampler = policy
    tasks = [generate_task(d, "legal", seed=2) for d in DOMAINS]
    limits = EpisodeLimits(max_agent_turns=100, max_user_turns=100, max_consecutive_malformed=100)
    cap = 120
    config = RolloutConfig(max_len=1024, max_new_tokens_per_turn=16, max_response_tokens=cap)
    batch = run_rollouts(sampler, model, [make_env(t, limits=limits) for t in tasks], tok, params=PARAMS,
                         config=config, rng=jax.random.key(1))
    for ep in batch.episodes:
        assert ep.overlong and ep.termination == "overlong" and ep.record.termination == "max_tokens"
        assert cap - 40 <= ep.response_length <= cap and len(ep.token_ids) < config.max_len - 200
        check_episode(tok, model, ep)
    # the train step's bound on loss tokens per row holds: here the response cap, then the turn cap
    assert config.max_policy_tokens == cap and all(sum(e.loss_mask) <= cap for e in batch.episodes)
    config = RolloutConfig(max_len=1024, max_new_tokens_per_turn=16, max_turns=3)
    batch = run_rollouts(sampler, model, [make_env(t, limits=limits) for t in tasks[:2]], tok, params=PARAMS,
                         config=config, rng=jax.random.key(2))
    assert config.max_policy_tokens == 3 * 16
    assert all(e.num_turns == 3 and 3 <= sum(e.loss_mask) <= 48 for e in batch.episodes)


def test_prompt_longer_than_the_budget_is_an_overlong_episode_without_loss(tok, policy):
    """A task whose prompt alone fills max_len ends at once as overlong, clipped to the budget with no policy
    token, so the batch still packs at max_len (an imported task longer than the config's budget)."""
    model, sampler = policy
    config = RolloutConfig(max_len=96, max_new_tokens_per_turn=16)
    envs = [make_env(generate_task(d, "legal", seed=3)) for d in DOMAINS[:2]]
    batch = run_rollouts(sampler, model, envs, tok, params=PARAMS, config=config, rng=jax.random.key(3))
    for ep in batch.episodes:
        assert ep.overlong and ep.num_turns == 0 and len(ep.token_ids) == 95 and sum(ep.loss_mask) == 0
        assert ep.record.termination == "max_tokens"
    assert batch.pack(max_len=96)["input_ids"].shape == (2, 96)


def test_reasoning_envs_roll_out_the_same_way(tok, policy):
    """The reasoning env (nudges as user turns, parse errors as tool turns) through the same loop."""
    from agq_jax.envs.reasoning import make_reasoning_env, score_reasoning
    from agq_jax.envs.reasoning_problems import ReasoningProblem

    model, sampler = policy
    problems = [ReasoningProblem(id=f"p{i}", question=f"What is {i} + {i}?", answer=str(2 * i), tools=[])
                for i in range(4)]
    envs = [make_reasoning_env(p, tools=None) for p in problems]
    batch = run_rollouts(sampler, model, envs, tok, params=PARAMS, config=CONFIG, rng=jax.random.key(2))
    for p, ep in zip(problems, batch.episodes):
        assert ep.task_id == p.id and ep.record.termination in ("malformed", "max_agent_turns")
        assert ep.reward == score_reasoning(p, ep.record).total == 0.0  # it never answers
        assert ep.num_turns >= 2
        check_episode(tok, model, ep)
