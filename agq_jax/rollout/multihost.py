"""Multi-process rollouts (`driver.policy.Policy.rollouts` when `jax.process_count() > 1`).

Every process builds the same envs from the same items; process p resets and steps only the contiguous slice `row_bounds(n, P)[p]` of them,
then the finished episodes are gathered so every process returns the same full `RolloutBatch`, in env order.
- Sampling runs process-locally: the driver's mesh spans all hosts, but episodes end at different turns on
  different hosts, so a global program would force every host to run every turn's decode in lockstep.
  Each host samples from its own copy of the weights in the compute dtype, split over its `tensor` x
  `expert` chips, made once per model version by one global program (`rollout.placement`), on a local mesh
  (data-parallel over the host's tensor groups).
- RNG: the sampler draws each token from one `[B, W]` Gumbel array per decode step. With JAX's
  partitionable threefry (the default) element (row, j) of that draw depends only on (key, row * W + j),
  so process p decodes its rows with a key of a row-offset PRNG implementation (`row_offset_key`): same
  threefry key, counters shifted by `start * W`. Every row then gets exactly the noise it gets in a
  one-process run of the whole batch: results do not depend on the number of processes, one process keeps
  today's bit-exact results, and no process generates noise for rows it does not own.
- Gather (`jax.experimental.multihost_utils.process_allgather`): token ids, loss masks and both log-prob
  streams as `[rows_max, T_max]` arrays padded per process, plus the small per-episode metadata (reward and
  components, gates, termination, turn spans and finish reasons, the env record's dict) as JSON bytes.
  A process keeps its own `Episode` objects; others' are rebuilt (records via their `from_dict` / fields).
With one process `rollouts` is exactly the single-process call (no copies, no collectives).
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
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


_OFFSET_IMPLS: dict = {}


def _offset_impl(offset: int):
    """Threefry with counters shifted by `offset` rows: `random_bits(key, w, (B, *rest))` equals rows
    [offset, offset + B) of the plain threefry draw of any larger leading dim (partitionable threefry)."""
    if offset in _OFFSET_IMPLS:
        return _OFFSET_IMPLS[offset]
    from jax.extend.random import define_prng_impl, threefry2x32_p, threefry_prng_impl as fry

    def random_bits(key, bit_width, shape):
        if bit_width not in (8, 16, 32, 64):
            raise TypeError(f"random_bits: bit width {bit_width} not in 8/16/32/64")
        if not shape:
            return fry.random_bits(key, bit_width, shape)
        size = math.prod(shape)
        first = offset * (size // shape[0])
        if size > 2**32:
            raise NotImplementedError(f"row-offset random bits of {size} elements (> 2**32)")
        lo = jax.lax.iota(jnp.uint32, size).reshape(shape) + jnp.uint32(first & 0xFFFFFFFF)  # wraps mod 2**32
        hi = jnp.uint32(first >> 32) + (lo < jnp.uint32(first & 0xFFFFFFFF)).astype(jnp.uint32)
        hi = jnp.broadcast_to(hi, shape)
        b1, b2 = threefry2x32_p.bind(key[0], key[1], hi, lo)
        if bit_width == 64:
            return (b1.astype(jnp.uint64) << jnp.uint64(32)) | b2.astype(jnp.uint64)
        bits = b1 ^ b2
        return bits if bit_width == 32 else bits.astype(jnp.uint16 if bit_width == 16 else jnp.uint8)

    impl = define_prng_impl(key_shape=(2,), seed=fry.seed, split=fry.split, random_bits=random_bits,
                            fold_in=fry.fold_in, name=f"threefry2x32_rows+{offset}", tag=f"fry+{offset}")
    _OFFSET_IMPLS[offset] = impl
    return impl


def row_offset_key(rng, offset: int):
    """`rng` for a slice of a batch starting at row `offset`: every random draw shaped (rows, ...) of the
    slice equals the matching rows of the whole batch's draw (see the module docstring). Offset 0 is `rng`."""
    if offset == 0:
        return rng
    if not jax.config.jax_threefry_partitionable:
        raise RuntimeError("multi-process rollouts need jax_threefry_partitionable=True (JAX's default)")
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if typed and str(jax.random.key_impl(rng)) != "threefry2x32":
        raise ValueError(f"multi-process rollouts need a threefry2x32 key, got {jax.random.key_impl(rng)}")
    data = jax.random.key_data(rng) if typed else jnp.asarray(rng, jnp.uint32)
    if data.shape != (2,):
        raise ValueError(f"row_offset_key: expected one key (key data shape (2,)), got {data.shape}")
    return jax.random.wrap_key_data(data, impl=_offset_impl(int(offset)))


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
