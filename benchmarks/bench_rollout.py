"""Rollouts end to end on procedural worlds: episodes/s, tokens/s, and where the wall time goes.

The demo's setup (configs/tiny.py): procedural level-0 tasks with the scripted user and state-backed tools, a
procedural BPE vocabulary (trained here into a temp dir, not timed), the tiny random-init Qwen3, the driver's
sampling (temperature 1, stops on <|im_end|> and </tool_call>). A random policy writes mostly malformed
replies, so episodes end on the env's malformed / turn limits: the per-token and per-turn costs are the
demo's, the episode lengths are not a trained policy's.

Time shares (instrumented from outside, agq_jax.rollout.multiturn is not modified):
  model     Sampler.append (prefill of new turns) + Sampler.decode, synchronised on their outputs
  env       the executor's map calls of env.reset / env.step (threads; wall time of each map)
  score     the executor's map of the reward function
  tokenize  encode_chat / encode_env_turns / decoding the reply text
  host      the rest of run_rollouts (bookkeeping, device_get of sampled tokens, python loops)
One warm-up rollout (compiles) runs before the measured ones.

Usage: python benchmarks/bench_rollout.py [--envs 16] [--max-len 1024] [--max-new 96] [--turns 8] [--repeats 2]
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from agq_jax import tokenizer as qtok
from agq_jax.models import qwen3
from agq_jax.models.config import ATTENTION_IMPLS
from agq_jax.rollout import multiturn
from agq_jax.rollout.multiturn import RolloutConfig, run_rollouts
from agq_jax.rollout.sampler import Sampler, SamplingParams

TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True)


class Clock:
    """Accumulated wall seconds per bucket."""

    def __init__(self):
        self.t = collections.Counter()
        self.calls = collections.Counter()

    def wrap(self, bucket, fn, sync=False):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if sync:
                out = jax.block_until_ready(out)
            self.t[bucket] += time.perf_counter() - t0
            self.calls[bucket] += 1
            return out
        return timed


class TimedSampler:
    """Forwards to a Sampler; its prefill (append) and decode calls are timed to completion."""

    def __init__(self, sampler: Sampler, clock: Clock):
        self._s = sampler
        self.append = clock.wrap("model_prefill", sampler.append, sync=True)
        self.decode = clock.wrap("model_decode", sampler.decode, sync=True)

    def __getattr__(self, name):
        return getattr(self._s, name)


class TimedExecutor(cf.ThreadPoolExecutor):
    """A thread pool whose map is timed as a whole (wall time, however many threads ran)."""

    def __init__(self, clock: Clock, score_fn, **kw):
        super().__init__(**kw)
        self.clock, self.score_fn = clock, score_fn

    def map(self, fn, *iterables, **kw):
        t0 = time.perf_counter()
        out = list(super().map(fn, *iterables, **kw))
        self.clock.t["score" if fn is self.score_fn else "env"] += time.perf_counter() - t0
        return iter(out)


def build(args, tmp):
    from agq_jax.driver.data import score_env
    from agq_jax.driver.vocab import procedural_corpus
    from agq_jax.tokenizer import SpecialIds
    from agq_jax.tokenizer_procedural import train_procedural_tokenizer

    t0 = time.perf_counter()
    tok = train_procedural_tokenizer(procedural_corpus(), args.vocab, os.path.join(tmp, "tok"))
    tok_s = time.perf_counter() - t0
    ids = SpecialIds.of(tok)
    cfg = qwen3.Qwen3Config(**TINY, vocab_size=-(-len(tok) // 64) * 64, bos_token_id=None,
                            eos_token_id=(ids.im_end, ids.endoftext), pad_token_id=ids.pad,
                            attention_impl=args.attention_impl)
    model = qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    sampler = Sampler(model, pad_id=ids.pad, chunk_size=args.chunk)
    params = SamplingParams(temperature=1.0, stop_ids=ids.stop_ids)
    return tok, tok_s, model, sampler, params, score_env


def make_envs(n, seed, turns):
    from agq_jax.envs import EpisodeLimits, make_env
    from agq_jax.envs.worlds.generator import generate_tasks

    tasks = generate_tasks(max(1, n // 4), seed=seed)
    limits = EpisodeLimits(max_agent_turns=turns, max_user_turns=turns)
    return [make_env(tasks[i // 4 % len(tasks)], user="scripted", tools="auto", limits=limits) for i in range(n)]


def one_rollout(args, tok, model, sampler, params, score_fn, seed):
    clock = Clock()
    originals = (qtok.encode_chat, qtok.encode_env_turns, multiturn._reply_text)
    qtok.encode_chat = clock.wrap("tokenize", originals[0])
    qtok.encode_env_turns = clock.wrap("tokenize", originals[1])
    multiturn._reply_text = clock.wrap("tokenize", originals[2])
    envs = make_envs(args.envs, seed, args.turns)
    config = RolloutConfig(max_len=args.max_len, max_new_tokens_per_turn=args.max_new, max_turns=args.turns + 1,
                           enable_thinking=False, max_workers=args.workers)
    pool = TimedExecutor(clock, score_fn, max_workers=args.workers)
    try:
        t0 = time.perf_counter()
        batch = run_rollouts(TimedSampler(sampler, clock), model, envs, tok, params=params, config=config,
                             rng=jax.random.key(seed), group_ids=[i // 4 for i in range(args.envs)],
                             score_fn=score_fn, executor=pool)
        wall = time.perf_counter() - t0
    finally:
        qtok.encode_chat, qtok.encode_env_turns, multiturn._reply_text = originals
        pool.shutdown(wait=True)
    return batch, wall, clock


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envs", type=int, default=16, help="episodes per rollout batch (groups of 4 per task)")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-new", type=int, default=96, help="max new tokens per agent turn")
    ap.add_argument("--turns", type=int, default=8, help="max agent (and user) turns")
    ap.add_argument("--chunk", type=int, default=256, help="Sampler chunk_size")
    ap.add_argument("--attention-impl", default="auto", choices=list(ATTENTION_IMPLS),
                    help="auto: on CPU the sampler attends block by block up to the longest row (xla: whole buffer)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok, tok_s, model, sampler, params, score_fn = build(args, tmp)
    one_rollout(args, tok, model, sampler, params, score_fn, seed=1000)  # compiles
    env = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "cpus": os.cpu_count(),
           "machine": platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2), "dtype": "float32",
           "model": {**TINY, "vocab_size": model.config.vocab_size}, "tokenizer_train_s": round(tok_s, 1)}
    rows = []
    for rep in range(args.repeats):
        batch, wall, clock = one_rollout(args, tok, model, sampler, params, score_fn, seed=rep)
        eps = batch.episodes
        total_tokens = sum(len(e.token_ids) for e in eps)
        policy_tokens = sum(e.num_policy_tokens for e in eps)
        shares = {k: clock.t[k] for k in ("model_prefill", "model_decode", "env", "score", "tokenize")}
        shares["host"] = max(0.0, wall - sum(shares.values()))
        rows.append({"bench": "rollout", "repeat": rep, "episodes": len(eps), "max_len": args.max_len, "attention_impl": args.attention_impl,
                     "max_new_per_turn": args.max_new, "wall_s": round(wall, 3),
                     "episodes_per_s": round(len(eps) / wall, 3),
                     "policy_tokens_per_s": round(policy_tokens / wall, 1),
                     "all_tokens_per_s": round(total_tokens / wall, 1),
                     "mean_turns": round(float(np.mean([e.num_turns for e in eps])), 2),
                     "mean_len": round(total_tokens / len(eps), 1),
                     "decode_calls": clock.calls["model_decode"], "prefill_calls": clock.calls["model_prefill"],
                     "terminations": dict(collections.Counter(e.termination for e in eps)),
                     **{f"share_{k}": round(v / wall, 3) for k, v in shares.items()}, **env})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'rep':>3} {'eps':>4} {'wall s':>7} {'eps/s':>6} {'pol tok/s':>9} {'all tok/s':>9} "
          f"{'prefill':>7} {'decode':>7} {'env':>6} {'score':>6} {'tok':>6} {'host':>6}")
    for r in rows:
        print(f"{r['repeat']:>3} {r['episodes']:>4} {r['wall_s']:>7.2f} {r['episodes_per_s']:>6.2f} "
              f"{r['policy_tokens_per_s']:>9.0f} {r['all_tokens_per_s']:>9.0f} {r['share_model_prefill']:>7.1%} "
              f"{r['share_model_decode']:>7.1%} {r['share_env']:>6.1%} {r['share_score']:>6.1%} "
              f"{r['share_tokenize']:>6.1%} {r['share_host']:>6.1%}")


if __name__ == "__main__":
    main()
