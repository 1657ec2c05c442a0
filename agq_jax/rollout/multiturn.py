"""Multi-turn token-in/token-out rollouts: a batch of episodes decodes together against step envs.

Why token-in/token-out: re-rendering and re-tokenizing a conversation is not guaranteed to reproduce the
ids the policy sampled (BPE merges across turn boundaries, the Qwen3 template strips earlier reasoning),
so the trainer would score tokens the policy never produced. Here the training sequence is built only
by appending: the rendered prompt, then per turn the sampled ids (loss_mask 1, sampler log-probs kept)
and the environment's turns rendered as a token suffix (loss_mask 0). The KV cache is appended the same
way, so every turn continues decoding without recomputing the prefix.

Per turn: one prefill of every row's new tokens (ragged, chunked), one device decode loop, one host
sync; then all envs whose row is still alive step concurrently (a thread pool: teachers may be HTTP).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from agq_jax import tokenizer as qtok
from agq_jax.envs.protocol import StepEnv
from agq_jax.rollout.sampler import CACHE_FULL, FINISH_REASONS, STOP, Sampler, SamplingParams

OVERLONG = "overlong"  # our termination when the token budget (max_len) ends an episode
MAX_TURNS = "max_turns"


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """max_len: tokens per episode (prompt + all replies + all env turns; the KV cache size).
    max_new_tokens_per_turn: cap on one reply (None: the rest of the budget); a reply cut by this cap
    is still sent to the env, a reply cut by max_len ends the episode as overlong.
    max_response_tokens: cap on the tokens after the prompt (replies + env turns; the reference's 10,000);
    reaching it ends the episode as overlong, like max_len. None: max_len alone.
    max_turns: safety cap on policy replies (the env's own limits normally end episodes first)."""

    max_len: int = 4096
    max_new_tokens_per_turn: Optional[int] = None
    max_response_tokens: Optional[int] = None
    max_turns: int = 64
    enable_thinking: bool = True
    max_workers: int = 32

    def __post_init__(self):
        if self.max_len < 2:
            raise ValueError(f"RolloutConfig.max_len must be >= 2, got {self.max_len}")
        if self.max_new_tokens_per_turn is not None and self.max_new_tokens_per_turn < 1:
            raise ValueError(f"RolloutConfig.max_new_tokens_per_turn must be >= 1, got {self.max_new_tokens_per_turn}")
        if self.max_response_tokens is not None and self.max_response_tokens < 1:
            raise ValueError(f"RolloutConfig.max_response_tokens must be >= 1, got {self.max_response_tokens}")

    @property
    def max_policy_tokens(self) -> int:
        """The most sampled (loss) tokens an episode can hold: every reply is after the prompt, at most
        max_turns of them, each at most max_new_tokens_per_turn long. The train step's LM-head bound."""
        per_turn = min(self.max_new_tokens_per_turn or self.max_len, self.max_len)
        return min(self.max_response_tokens or self.max_len, self.max_len, self.max_turns * per_turn)


@dataclasses.dataclass
class Episode:
    """One finished episode. All token lists have equal length; logprobs[t] scores token_ids[t]
    (0.0 where loss_mask is 0)."""

    task_id: str
    group_id: int
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]  # raw temperature-1 policy log-probs from the sampler
    sample_logprobs: list[float]  # under the (temperature / top-k / top-p) distribution sampled from
    prompt_len: int
    turn_spans: list[tuple[int, int]]  # [start, end) of each policy reply in token_ids
    num_turns: int
    termination: str
    overlong: bool
    reward: float = 0.0
    reward_components: dict = dataclasses.field(default_factory=dict)
    reward_gates: dict = dataclasses.field(default_factory=dict)
    turn_finish: list[str] = dataclasses.field(default_factory=list)  # sampler finish reason per reply
    record: Any = None  # the env's EpisodeRecord (transcript, tool calls, final state)

    @property
    def response_length(self) -> int:
        """Tokens after the prompt (policy replies and env turns)."""
        return len(self.token_ids) - self.prompt_len

    @property
    def num_policy_tokens(self) -> int:
        return int(sum(self.loss_mask))


@dataclasses.dataclass
class RolloutBatch:
    """Episodes in env order; `pad_id` is the rollout tokenizer's pad id (what `pack` pads with)."""

    episodes: list[Episode]
    pad_id: Optional[int] = None

    def __len__(self):
        return len(self.episodes)

    @property
    def rewards(self) -> np.ndarray:
        return np.asarray([e.reward for e in self.episodes], np.float32)

    @property
    def group_ids(self) -> np.ndarray:
        return np.asarray([e.group_id for e in self.episodes], np.int32)

    def metrics(self) -> dict[str, float]:
        """Scalars for logging: reward mean and components, lengths, turns, terminations, the envs' counters."""
        eps = self.episodes
        out: dict[str, float] = {
            "rollout/reward_mean": float(self.rewards.mean()),
            "rollout/response_length_mean": float(np.mean([e.response_length for e in eps])),
            "rollout/policy_tokens_mean": float(np.mean([e.num_policy_tokens for e in eps])),
            "rollout/turns_mean": float(np.mean([e.num_turns for e in eps])),
            "rollout/overlong_frac": float(np.mean([e.overlong for e in eps])),
        }
        for key in sorted({k for e in eps for k in e.reward_components}):
            vals = [e.reward_components[key] for e in eps if key in e.reward_components]
            out[f"reward/{key}"] = float(np.mean(vals))
        for term, n in Counter(e.termination for e in eps).items():
            out[f"termination/{term}"] = n / len(eps)
        # the envs' own counts (teacher calls, malformed / failed teacher replies, tool errors): batch totals
        counts = sum((Counter(getattr(e.record, "counters", None) or {}) for e in eps), Counter())
        out.update({f"env/{k}": float(v) for k, v in sorted(counts.items())})
        return out

    def pack(self, *, pad_id: Optional[int] = None, pad_to_multiple: int = 64, max_len: int | None = None,
             logprob_source: str = "policy") -> dict[str, np.ndarray]:
        """`pack_episodes` with the batch's own tokenizer pad id unless `pad_id` is given."""
        return pack_episodes(self.episodes, pad_id=self.pad_id if pad_id is None else pad_id, pad_to_multiple=pad_to_multiple, max_len=max_len,
                             logprob_source=logprob_source)


def pack_episodes(episodes: Sequence[Episode], *, pad_id: Optional[int] = None, pad_to_multiple: int = 64,
                  max_len: int | None = None, logprob_source: str = "policy") -> dict[str, np.ndarray]:
    """Right-pad episodes into the training batch (see docs/ARCHITECTURE.md "Rollout contract").

    Token arrays [N, T] (T rounded up to `pad_to_multiple`, or exactly `max_len`): input_ids int32,
    attention_mask int32, loss_mask float32, old_logprobs float32 (token aligned; `logprob_source`
    "policy" = temperature-1 log-probs, "sampling" = under the sampling distribution). Per-row [N]:
    rewards float32, group_ids int32, truncated bool (overlong), response_lengths int32, num_turns int32.
    `pad_id` None means Qwen3's `<|endoftext|>`; pass the tokenizer's for another vocabulary (padding is
    attention-masked, so the id only has to be in range).
    """
    if pad_id is None:
        pad_id = qtok.QWEN3.pad
    if not episodes:
        raise ValueError("pack_episodes: no episodes")
    if logprob_source not in ("policy", "sampling"):
        raise ValueError(f"pack_episodes: logprob_source must be 'policy' or 'sampling', got {logprob_source!r}")
    lengths = [len(e.token_ids) for e in episodes]
    for i, e in enumerate(episodes):
        for name in ("loss_mask", "logprobs", "sample_logprobs"):
            if len(getattr(e, name)) != lengths[i]:
                raise ValueError(f"episode {i} ({e.task_id}): len({name})={len(getattr(e, name))} "
                                 f"!= len(token_ids)={lengths[i]}")
    t = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
    if max_len is not None:
        if max(lengths) > max_len:
            raise ValueError(f"pack_episodes: episode of {max(lengths)} tokens exceeds max_len {max_len}")
        t = max_len
    n = len(episodes)
    out = {"input_ids": np.full((n, t), pad_id, np.int32), "attention_mask": np.zeros((n, t), np.int32),
           "loss_mask": np.zeros((n, t), np.float32), "old_logprobs": np.zeros((n, t), np.float32)}
    for i, e in enumerate(episodes):
        k = lengths[i]
        out["input_ids"][i, :k] = e.token_ids
        out["attention_mask"][i, :k] = 1
        out["loss_mask"][i, :k] = e.loss_mask
        out["old_logprobs"][i, :k] = e.logprobs if logprob_source == "policy" else e.sample_logprobs
    out["rewards"] = np.asarray([e.reward for e in episodes], np.float32)
    out["group_ids"] = np.asarray([e.group_id for e in episodes], np.int32)
    out["truncated"] = np.asarray([e.overlong for e in episodes], bool)
    out["response_lengths"] = np.asarray([e.response_length for e in episodes], np.int32)
    out["num_turns"] = np.asarray([e.num_turns for e in episodes], np.int32)
    return out


def default_score(env: StepEnv) -> tuple[float, dict, dict]:
    """Reward of a finished episode: the env's own `reward()`."""
    r = env.reward()
    return float(r.total), dict(r.components), dict(r.gates)


def _finish_env(env: StepEnv, termination) -> None:
    """End an env that is still running (our token budget or turn cap ran out after its step), so its
    record carries a termination and a final state for scoring."""
    if not env.done:
        env.finish(termination)


class _Row:
    """Host-side state of one episode while it runs."""

    def __init__(self, env, group_id: int):
        self.env, self.group_id = env, group_id
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.lp: list[float] = []
        self.slp: list[float] = []
        self.pending: list[int] = []  # tokens to prefill before the next decode
        self.spans: list[tuple[int, int]] = []
        self.turn_finish: list[str] = []
        self.alive = True
        self.closed = True  # the last policy reply ended with <|im_end|>
        self.termination: str | None = None
        self.overlong = False
        self.prompt_len = 0
        self.limit = 0  # the row's token budget: min(max_len, prompt + max_response_tokens)

    def add_env_tokens(self, ids: list[int]):
        self.ids += ids
        self.mask += [0] * len(ids)
        self.lp += [0.0] * len(ids)
        self.slp += [0.0] * len(ids)
        self.pending = list(ids)

    def end(self, termination: str, overlong: bool = False):
        self.alive, self.termination, self.overlong = False, termination, overlong
        self.pending = []


def _reply_text(tok, sampled: list[int], closing: tuple[int, ...]) -> str:
    """The reply the env sees: decoded sampled ids without a closing <|im_end|>/<|endoftext|> (`closing`)."""
    if sampled and sampled[-1] in closing:
        sampled = sampled[:-1]
    return tok.decode(sampled, skip_special_tokens=False)


def run_rollouts(sampler: Sampler, model, envs: Sequence[StepEnv], tokenizer, *, params: SamplingParams,
                 config: RolloutConfig = RolloutConfig(), rng: jax.Array, group_ids: Sequence[int] | None = None,
                 score_fn: Callable[[Any], tuple[float, dict, dict]] | None = default_score,
                 executor: cf.Executor | None = None, row0: int = 0) -> RolloutBatch:
    """Run one episode per env (fresh, not yet reset) to the end; returns them scored, in env order.

    `row0`: the first env's row in the whole rollout batch (env i samples with the noise of row row0 + i).
    On a sampler whose mesh spans processes every process of it calls this together with its own envs
    (possibly none): the turns run until no process has a live row."""
    if not envs and sampler.processes == 1:
        raise ValueError("run_rollouts: no envs")
    n = len(envs)
    group_ids = list(range(n)) if group_ids is None else list(group_ids)
    if len(group_ids) != n:
        raise ValueError(f"run_rollouts: {len(group_ids)} group_ids for {n} envs")
    own_pool = executor is None
    pool = executor or cf.ThreadPoolExecutor(max_workers=max(1, min(config.max_workers, n)))
    try:
        return _run(sampler, model, list(envs), tokenizer, params, config, rng, group_ids, score_fn, pool, row0)
    finally:
        if own_pool:
            pool.shutdown(wait=True)


def _run(sampler, model, envs, tok, params, config, rng, group_ids, score_fn, pool, row0) -> RolloutBatch:
    from agq_jax.envs.runtime import Termination

    n = len(envs)
    ids = qtok.SpecialIds.of(tok)  # asked of the tokenizer: a procedural vocabulary has its own ids
    im_end, closing = ids.im_end, (ids.im_end, ids.endoftext)
    rows = [_Row(env, g) for env, g in zip(envs, group_ids)]
    first_messages = list(pool.map(lambda env: env.reset(), envs))
    for row, msgs in zip(rows, first_messages):
        tools = None if row.env.embed_tools else (row.env.tool_schemas or None)
        prompt = qtok.encode_chat(tok, msgs, tools, add_generation_prompt=True, enable_thinking=config.enable_thinking)
        too_long = len(prompt) >= config.max_len  # no room to reply: an overlong episode holding the prompt's
        prompt = prompt[:config.max_len - 1]       # first tokens (no loss on them; batches keep max_len)
        row.add_env_tokens(prompt)
        row.prompt_len = len(prompt)
        row.limit = min(config.max_len, len(prompt) + (config.max_response_tokens or config.max_len))
        if too_long:
            _finish_env(row.env, Termination.MAX_TOKENS)
            row.end(OVERLONG, overlong=True)

    state = sampler._state(model)
    batch = sampler.padded_batch(n)
    per_turn = min(config.max_new_tokens_per_turn or config.max_len, config.max_len)
    cache = sampler.init_cache(batch, config.max_len)
    row_ids = row0 + np.arange(batch, dtype=np.int32)
    logits = None
    while sampler.lockstep_max([any(r.alive for r in rows)])[0]:
        rng, turn_rng = jax.random.split(rng)
        chunks = [r.pending if r.alive else [] for r in rows] + [[]] * (batch - n)
        cache, logits = sampler.append(state, cache, chunks, logits)
        active = np.array([r.alive for r in rows] + [False] * (batch - n))
        budget = np.array([min(per_turn, r.limit - len(r.ids)) if r.alive else 0 for r in rows]
                          + [0] * (batch - n), np.int32)
        out = sampler.decode(state, cache, logits, turn_rng, params=params, max_new_tokens=per_turn,
                             max_len=config.max_len, active=active, row_budget=budget, row_ids=row_ids)
        cache, logits = out.cache, out.logits
        toks, lps, slps, num, reason = sampler.to_host(out.tokens, out.logprobs, out.sample_logprobs, out.num_tokens,
                                                       out.finish_reason)

        stepping = []  # (row index, reply text, num tokens, truncated)
        for i, r in enumerate(rows):
            if not r.alive:
                continue
            k = int(num[i])
            sampled = toks[i, :k].tolist()
            start = len(r.ids)
            r.ids += sampled
            r.mask += [1] * k
            r.lp += lps[i, :k].tolist()
            r.slp += slps[i, :k].tolist()
            r.spans.append((start, len(r.ids)))
            code = int(reason[i])
            r.turn_finish.append(FINISH_REASONS[code])
            out_of_budget = code == CACHE_FULL or len(r.ids) >= r.limit
            stepping.append((i, _reply_text(tok, sampled, closing), k, out_of_budget))
            r.closed = code == STOP and bool(sampled) and sampled[-1] == im_end

        results = list(pool.map(lambda item: rows[item[0]].env.step(item[1], num_tokens=item[2], truncated=item[3]),
                                stepping))
        for (i, _, _, truncated), res in zip(stepping, results):
            r = rows[i]
            if truncated:
                r.end(OVERLONG, overlong=True)
                continue
            if res.done:
                r.end(res.termination.value if res.termination is not None else "done")
                continue
            if len(r.spans) >= config.max_turns:
                _finish_env(r.env, Termination.MAX_AGENT_TURNS)
                r.end(MAX_TURNS)
                continue
            suffix = qtok.encode_env_turns(tok, res.new_messages, enable_thinking=config.enable_thinking,
                                           after_im_end=r.closed)
            if len(r.ids) + len(suffix) >= r.limit:  # no room for the env turn plus one policy token
                _finish_env(r.env, Termination.MAX_TOKENS)
                r.end(OVERLONG, overlong=True)
                continue
            r.add_env_tokens(suffix)

    scores = list(pool.map(score_fn, envs)) if score_fn is not None else [(0.0, {}, {})] * n
    episodes = []
    for r, (total, comps, gates) in zip(rows, scores):
        rec = r.env.record
        episodes.append(Episode(
            task_id=r.env.task_id, group_id=r.group_id, token_ids=r.ids,
            loss_mask=r.mask, logprobs=r.lp, sample_logprobs=r.slp, prompt_len=r.prompt_len, turn_spans=r.spans,
            num_turns=len(r.spans), termination=r.termination or "done", overlong=r.overlong, reward=total,
            reward_components=comps, reward_gates=gates, turn_finish=r.turn_finish, record=rec))
    return RolloutBatch(episodes, pad_id=ids.pad)
