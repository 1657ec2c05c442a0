"""Multi-process rollouts (`driver.policy.Policy.rollouts` when `jax.process_count() > 1`).

Every process builds the same envs from the same items; process p resets and steps only the contiguous slice `row_bounds(n, P)[p]` of them,
then the finished episodes are gathered so every process returns the same full `RolloutBatch`, in env order.
- Sampling runs in rollout groups (`rollout.placement`): the driver's mesh spans all hosts, but episodes end
  at different turns on different hosts, so a global program would force every host to run every turn's
  decode in lockstep. Each group (one host, or the few hosts one copy of a large model spans) samples from
  its own copy of the weights in the compute dtype, split over its `tensor` x `expert` chips, made once per
  model version by one global program; a group's hosts run its programs together, each feeding its own rows.
- RNG: the sampler draws each token from one `[B, W]` Gumbel array per decode step whose row b is row
  `row_ids[b]` of one draw over the whole batch (`sampler.row_noise`; JAX's partitionable threefry makes
  element (row, j) a function of (key, row * W + j) alone). Process p passes its rows' places in the whole
  batch, so every row gets exactly the noise it gets in a one-process run: results do not depend on the
  number of processes or on the decode batches, and no process generates noise for rows it does not own.
- Gather (`jax.experimental.multihost_utils.process_allgather`): token ids, loss masks and both log-prob
  streams as `[rows_max, T_max]` arrays padded per process, plus the small per-episode metadata (reward and
  components, gates, termination, turn spans and finish reasons, the env record's dict) as JSON bytes.
  A process keeps its own `Episode` objects; others' are rebuilt (records via their `from_dict` / fields).
With one process `rollouts` is exactly the single-process call (no copies, no collectives).
"""
from __future__ import annotations

import json

import jax
import numpy as np


def row_bounds(n: int, processes: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) env rows of each process (the first n % P processes get one more)."""
    base, extra = divmod(n, processes)
    out, start = [], 0
    for p in range(processes):
        stop = start + base + (p < extra)
        out.append((start, stop))
        start = stop
    return out


_ARRAYS = (("token_ids", np.int32), ("loss_mask", np.int32), ("logprobs", np.float32), ("sample_logprobs", np.float32))


def _record_to_json(rec):
    if rec is None:
        return None
    from agq_jax.envs.reasoning import ReasoningRecord
    from agq_jax.envs.runtime import EpisodeRecord

    kind = {EpisodeRecord: "agentic", ReasoningRecord: "reasoning"}.get(type(rec))
    if kind is None:
        raise TypeError(f"gather_episodes: cannot send an episode record of type {type(rec).__name__}")
    return {"kind": kind, "data": rec.to_dict()}


def _record_from_json(d):
    if d is None:
        return None
    from agq_jax.envs.reasoning import ReasoningRecord
    from agq_jax.envs.runtime import EpisodeRecord

    return EpisodeRecord.from_dict(d["data"]) if d["kind"] == "agentic" else ReasoningRecord(**d["data"])


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"gather_episodes: episode metadata value of type {type(x).__name__} is not JSON-able")


def _allgather(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def gather_episodes(local: list, bounds: list[tuple[int, int]]) -> list:
    """Every process's episodes (its rows `bounds[p]`), on every process, in global row order (collective)."""
    from agq_jax.rollout.multiturn import Episode

    me = jax.process_index()
    if len(local) != bounds[me][1] - bounds[me][0]:
        raise ValueError(f"gather_episodes: {len(local)} local episodes for rows {bounds[me]}")
    rows = max(b - a for a, b in bounds)
    lens = np.zeros((rows,), np.int32)
    lens[:len(local)] = [len(e.token_ids) for e in local]
    meta = json.dumps([{"task_id": e.task_id, "group_id": e.group_id, "prompt_len": e.prompt_len,
                        "turn_spans": e.turn_spans, "num_turns": e.num_turns, "termination": e.termination,
                        "overlong": e.overlong, "reward": e.reward, "reward_components": e.reward_components,
                        "reward_gates": e.reward_gates, "turn_finish": e.turn_finish,
                        "record": _record_to_json(e.record)} for e in local], default=_json_default).encode()
    all_lens = _allgather(lens)  # [P, rows]
    meta_lens = _allgather(np.asarray([len(meta)], np.int64))[:, 0]
    t = max(int(all_lens.max()), 1)
    buf = np.zeros((int(meta_lens.max()),), np.uint8)
    buf[:len(meta)] = np.frombuffer(meta, np.uint8)
    arrays = {}
    for name, dtype in _ARRAYS:
        a = np.zeros((rows, t), dtype)
        for i, e in enumerate(local):
            a[i, :len(e.token_ids)] = getattr(e, name)
        arrays[name] = a
    metas = _allgather(buf)
    arrays = {name: _allgather(a) for name, a in arrays.items()}
    out = []
    for p, (a, b) in enumerate(bounds):
        if p == me:
            out += local
            continue
        infos = json.loads(bytes(metas[p, :int(meta_lens[p])]).decode())
        for i, info in enumerate(infos):
            k = int(all_lens[p, i])
            seq = {name: arrays[name][p, i, :k].tolist() for name, _ in _ARRAYS}
            out.append(Episode(task_id=info["task_id"], group_id=info["group_id"], prompt_len=info["prompt_len"],
                               turn_spans=[tuple(s) for s in info["turn_spans"]], num_turns=info["num_turns"],
                               termination=info["termination"], overlong=info["overlong"], reward=info["reward"],
                               reward_components=info["reward_components"], reward_gates=info["reward_gates"],
                               turn_finish=info["turn_finish"], record=_record_from_json(info["record"]), **seq))
        if len(infos) != b - a:
            raise RuntimeError(f"gather_episodes: process {p} sent {len(infos)} episodes for rows [{a}, {b})")
    return out
