"""Jitted batched sampler: chunk prefill into a preallocated KV cache, then a device-side decode loop.

Why this shape: RL rollouts are dominated by decode, so the whole decode loop (sample → append to cache →
next logits) runs inside one `jax.lax.while_loop`, with no host round trip per token. The model is passed
as `nnx.split` state (an argument, not a baked-in constant), so fresh weights after a train step reuse
the same executable. One executable per (batch, cache length, chunk length) bucket and sampling config.

Log-probabilities: every sampled token gets two numbers.
- `logprobs`: log softmax of the raw (temperature-1, unfiltered) logits at the token. This is the
  policy's log-probability, what the trainer recomputes, and what GRPO uses as `old_logprobs` unless
  temperature scaling / truncation is declared part of the policy.
- `sample_logprobs`: log-probability under the distribution actually sampled from (temperature-scaled,
  top-k / top-p truncated; 0.0 for greedy). Useful for exact importance weights vs the behaviour policy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agq_jax.tokenizer import QWEN3

DEFAULT_STOP_IDS = QWEN3.stop_ids

# finish reasons (int codes on device, names on host)
RUNNING, STOP, MAX_NEW_TOKENS, CACHE_FULL = 0, 1, 2, 3
FINISH_REASONS = {RUNNING: "running", STOP: "stop", MAX_NEW_TOKENS: "max_new_tokens", CACHE_FULL: "cache_full"}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (hashable: one compile per distinct setting).

    temperature 0 means greedy; top_k 0 means no top-k; top_p 1.0 means no nucleus truncation.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple[int, ...] = DEFAULT_STOP_IDS

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class DecodeOutput(NamedTuple):
    """Device arrays from one decode call ([B, max_new] buffers are right-padded with pad_id / 0)."""

    tokens: jax.Array  # [B, N] int32
    logprobs: jax.Array  # [B, N] f32, raw temperature-1 policy log-probs
    sample_logprobs: jax.Array  # [B, N] f32, under the sampling distribution used
    num_tokens: jax.Array  # [B] int32 tokens generated (stop token included)
    finish_reason: jax.Array  # [B] int32 codes, see FINISH_REASONS
    cache: Any  # KVCache with every sampled token appended
    logits: jax.Array  # [B, V] f32 next-token logits after the last appended token


@dataclasses.dataclass
class GenerateResult:
    """Host-side result of `Sampler.generate` (numpy)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    sample_logprobs: np.ndarray
    num_tokens: np.ndarray
    finish_reason: list[str]

    def row(self, b: int) -> list[int]:
        return self.tokens[b, : self.num_tokens[b]].tolist()


def _filtered_candidates(logits: jax.Array, params: SamplingParams):
    """Temperature-scaled candidate logits and their vocab ids; truncated entries are -inf."""
    scaled = logits / params.temperature
    if params.top_k > 0:
        vals, idx = jax.lax.top_k(scaled, min(params.top_k, scaled.shape[-1]))
    elif params.top_p < 1.0:
        vals, idx = jax.lax.top_k(scaled, scaled.shape[-1])  # full descending sort
    else:
        return scaled, None
    if params.top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        vals = jnp.where(mass_before < params.top_p, vals, -jnp.inf)  # the top token always survives
    return vals, idx


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first index of the maximum) as a max and a min reduce: XLA:CPU runs
    argmax's variadic (value, index) reduce ~3.5x slower (0.55 vs 0.16 ms on [8, 32768]), once per decoded
    token. A row without a maximum (NaN) gives the last index instead of the NaN's."""
    n = x.shape[-1]
    hit = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(hit, jnp.arange(n, dtype=jnp.int32), n), axis=-1), n - 1)


def _mul_wide(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(high, low) uint32 words of the 64-bit product of uint32 `a` and `b` (16-bit limbs: no uint64 needed)."""
    m16 = jnp.uint32(0xFFFF)
    a0, a1, b0, b1 = a & m16, a >> 16, b & m16, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> 16) + (p01 & m16) + (p10 & m16)
    return p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16), (p00 & m16) | (mid << 16)


def _row_bits(key, bit_width, shape):
    """Threefry bits of one row of a [rows, *shape] draw: key data (k0, k1, row). Element j gets the counter
    row * size + j, what JAX's partitionable threefry gives element (row, j) of the whole draw."""
    from jax.extend.random import threefry2x32_p

    if bit_width not in (8, 16, 32):
        raise TypeError(f"row noise: bit width {bit_width} not in 8/16/32")
    size = math.prod(shape)
    hi0, lo0 = _mul_wide(key[2], jnp.uint32(size))
    lo = jax.lax.iota(jnp.uint32, size).reshape(shape) + lo0  # wraps mod 2**32: carry into the high word
    hi = jnp.broadcast_to(hi0 + (lo < lo0).astype(jnp.uint32), shape)
    b1, b2 = threefry2x32_p.bind(key[0], key[1], hi, lo)
    bits = b1 ^ b2
    return bits if bit_width == 32 else bits.astype(jnp.uint16 if bit_width == 16 else jnp.uint8)


def _unsupported(*_, **__):
    raise NotImplementedError("row keys only draw bits (seed / split / fold_in the plain threefry key)")


_ROW_IMPL = None


def row_noise(rng: jax.Array, row_ids: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Gumbel noise [B, W] whose row b is row `row_ids[b]` of `jax.random.gumbel(rng, (R, W))` for any R:
    an episode's noise depends on its row in the whole rollout batch, not on how rows are split into decode
    batches or over processes (multi-host rollouts equal one process; `Policy.rollouts`)."""
    global _ROW_IMPL
    if _ROW_IMPL is None:
        from jax.extend.random import define_prng_impl

        _ROW_IMPL = define_prng_impl(key_shape=(3,), seed=_unsupported, split=_unsupported, random_bits=_row_bits,
                                     fold_in=_unsupported, name="threefry2x32_row", tag="fry_row")
    if not jax.config.jax_threefry_partitionable:
        raise RuntimeError("per-row sampling noise needs jax_threefry_partitionable=True (JAX's default)")
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jnp.asarray(rng, jnp.uint32)
    if data.shape != (2,):
        raise ValueError(f"row_noise: expected one threefry2x32 key (key data (2,)), got {data.shape}")
    keys = jnp.concatenate([jnp.broadcast_to(data, (shape[0], 2)), row_ids.astype(jnp.uint32)[:, None]], axis=1)
    keys = jax.random.wrap_key_data(keys, impl=_ROW_IMPL)
    return jax.vmap(lambda k: jax.random.gumbel(k, shape[1:], dtype))(keys)


def sample_from_logits(logits: jax.Array, rng: jax.Array, params: SamplingParams, row_ids: jax.Array | None = None):
    """Sample one token per row. Returns (token [B] int32, raw logprob [B], sampling logprob [B]).
    `row_ids` [B]: each row's index in the whole rollout batch (its noise, `row_noise`); default 0..B-1."""
    logits = logits.astype(jnp.float32)
    raw_logp = jax.nn.log_softmax(logits, axis=-1)
    if params.greedy:
        tok = first_argmax(logits)
        lp = jnp.take_along_axis(raw_logp, tok[:, None], axis=-1)[:, 0]
        return tok, lp, jnp.zeros_like(lp)
    cand, idx = _filtered_candidates(logits, params)
    if row_ids is None:
        row_ids = jnp.arange(cand.shape[0], dtype=jnp.int32)
    j = first_argmax(cand + row_noise(rng, row_ids, cand.shape, cand.dtype))  # = jax.random.categorical(rng, cand)
    samp_lp = jnp.take_along_axis(jax.nn.log_softmax(cand, axis=-1), j[:, None], axis=-1)[:, 0]
    tok = j if idx is None else jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0]
    tok = tok.astype(jnp.int32)
    lp = jnp.take_along_axis(raw_logp, tok[:, None], axis=-1)[:, 0]
    return tok, lp, samp_lp


def _hidden_to_logits(model, hidden: jax.Array) -> jax.Array:
    """[B, H] -> [B, V] f32 through the LM head (never builds [B, T, V])."""
    w = model.unembed()
    return jnp.dot(hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _merge(graphdef, state):
    """The model inside jit; weights split per layer (CPU, `Sampler._state`) run the unrolled layer loop."""
    from agq_jax.models import qwen3

    return qwen3.merge_split(graphdef, state) if _is_split(state) else nnx.merge(graphdef, state)


def _is_split(state) -> bool:
    return any(isinstance(x, tuple) for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, tuple)))


def _prefill(graphdef, state, cache, ids, mask, prev_logits):
    model = _merge(graphdef, state)
    hidden, cache, _ = model.hidden_states(ids, attention_mask=mask, cache=cache)
    last = jnp.clip(mask.sum(-1) - 1, 0, ids.shape[1] - 1)
    h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    logits = _hidden_to_logits(model, h_last)
    return cache, jnp.where(mask.any(-1)[:, None], logits, prev_logits)  # empty rows keep their logits


def _decode(graphdef, state, cache, logits, rng, active, row_budget, row_ids, capacity, *, params, max_new, pad_id):
    model = _merge(graphdef, state)
    batch = logits.shape[0]
    stop_ids = jnp.asarray(params.stop_ids if params.stop_ids else (-1,), jnp.int32)
    full_at_start = active & (cache.lengths >= capacity)
    no_budget = active & (row_budget <= 0)
    init = dict(
        step=jnp.int32(0),
        cache=cache,
        logits=logits.astype(jnp.float32),
        rng=rng,
        tokens=jnp.full((batch, max_new), pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new), jnp.float32),
        sample_logprobs=jnp.zeros((batch, max_new), jnp.float32),
        num=jnp.zeros((batch,), jnp.int32),
        done=~active | full_at_start | no_budget,
        reason=jnp.where(full_at_start, CACHE_FULL, jnp.where(no_budget, MAX_NEW_TOKENS, RUNNING)).astype(jnp.int32),
    )

    def cond(c):
        return (c["step"] < max_new) & ~jnp.all(c["done"])

    def body(c):
        rng, sub = jax.random.split(c["rng"])
        live = ~c["done"]
        tok, lp, slp = sample_from_logits(c["logits"], sub, params, row_ids)
        tok = jnp.where(live, tok, pad_id)
        col = (0, c["step"])
        tokens = jax.lax.dynamic_update_slice(c["tokens"], tok[:, None], col)
        logprobs = jax.lax.dynamic_update_slice(c["logprobs"], jnp.where(live, lp, 0.0)[:, None], col)
        slogprobs = jax.lax.dynamic_update_slice(c["sample_logprobs"], jnp.where(live, slp, 0.0)[:, None], col)
        num = c["num"] + live.astype(jnp.int32)
        # Every sampled token (the stop token too) goes into the cache, so a later turn continues from it.
        hidden, cache, _ = model.hidden_states(tok[:, None], attention_mask=live[:, None].astype(jnp.int32),
                                               cache=c["cache"])
        new_logits = _hidden_to_logits(model, hidden[:, 0])
        is_stop = live & jnp.isin(tok, stop_ids)
        hit_max = live & (num >= jnp.minimum(row_budget, max_new))
        is_full = live & (cache.lengths >= capacity)
        reason = jnp.where(is_stop, STOP,
                           jnp.where(hit_max, MAX_NEW_TOKENS, jnp.where(is_full, CACHE_FULL, c["reason"])))
        return dict(step=c["step"] + 1, cache=cache, logits=new_logits, rng=rng, tokens=tokens, logprobs=logprobs,
                    sample_logprobs=slogprobs, num=num, done=c["done"] | is_stop | hit_max | is_full,
                    reason=reason.astype(jnp.int32))

    out = jax.lax.while_loop(cond, body, init)
    return DecodeOutput(out["tokens"], out["logprobs"], out["sample_logprobs"], out["num"], out["reason"],
                        out["cache"], out["logits"])


def bucket_length(n: int, minimum: int = 16, multiple: int = 256) -> int:
    """Round a length up to a compile bucket: powers of two up to `multiple`, then multiples of it."""
    n = max(int(n), 1)
    b = minimum
    while b < n and b < multiple:
        b *= 2
    if b >= n:
        return b
    return -(-n // multiple) * multiple


class Sampler:
    """Batched prefill/decode over a KV cache for one model architecture (its `nnx` graphdef).

    Pass the live model (or its `nnx.state`) to each call: weights are arguments, so a train step's new
    weights never trigger a recompile. With `mesh`, the batch dimension of every input and of the cache
    is sharded over the mesh's batch axes (`sharding.batch_axes`; the batch must be divisible by their product).

    A mesh over several processes (a rollout group spanning hosts, `rollout.placement`): every call takes and
    returns *this process's rows* (the global batch is the processes' rows in process order, each on its own
    chips), the processes call the same programs in lockstep, and `lockstep_max` is how they agree on the
    host-side loop bounds (turns, prefill chunks).

    Token budget vs cache size: a cache for `max_len` tokens is allocated with `chunk_size` extra slots,
    so a padded prefill chunk never runs past the end of the buffer; decoding stops at `max_len`.
    """

    def __init__(self, model: nnx.Module, *, mesh=None, pad_id: int = QWEN3.pad, cache_dtype=None,
                 chunk_size: int = 256):
        self.graphdef, state = nnx.split(model)
        self.cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
        if self.cfg is None:
            raise ValueError("Sampler: model has no `.config` (needed for qwen3.init_cache)")
        self.mesh = mesh
        self.pad_id = int(pad_id)
        self.chunk_size = int(chunk_size)
        if cache_dtype is None:
            floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
            cache_dtype = getattr(model, "dtype", None) or (floats[0] if floats else jnp.float32)
        self.cache_dtype = cache_dtype
        self._prefill = jax.jit(_prefill, static_argnums=(0,), donate_argnums=(2,))
        self._decode = jax.jit(_decode, static_argnums=(0,), static_argnames=("params", "max_new", "pad_id"),
                               donate_argnums=(2,))
        self.processes = len({d.process_index for d in mesh.devices.flat}) if mesh is not None else 1
        self._lockstep = None  # the jitted max over the processes of a multi-process mesh
        from agq_jax.models import qwen3

        self._split = qwen3.split_weights_for_inference() and hasattr(self.cfg, "num_hidden_layers")
        self._split_cache: tuple = ((), None)  # (source leaves, their per-layer split): one weight version

    # ---- helpers -------------------------------------------------------------------------------------
    def _state(self, model_or_state):
        """The weights as the jitted calls take them: on CPU split per layer (qwen3.split_weights_for_inference),
        once per weight version (a train step's new weights are split again on their first use)."""
        state = model_or_state
        if isinstance(model_or_state, nnx.Module):
            graphdef, state = nnx.split(model_or_state)
            if graphdef != self.graphdef:
                raise ValueError("Sampler: the model's graph structure differs from the one the sampler was built for")
        if not self._split or state is self._split_cache[1]:
            return state
        from agq_jax.models import qwen3

        leaves = jax.tree.leaves(state)
        src, split = self._split_cache
        if len(src) != len(leaves) or any(a is not b for a, b in zip(src, leaves)):
            split = qwen3.split_layer_stacks(state)
            self._split_cache = (tuple(leaves), split)
        return split

    @property
    def batch_multiple(self) -> int:
        """This process's row count must be a multiple of this (the batch axes' shards on its chips)."""
        if self.mesh is None:
            return 1
        from agq_jax.models import sharding

        shards = int(np.prod([self.mesh.shape[a] for a in sharding.batch_axes(self.mesh)]))
        if shards % self.processes:
            raise ValueError(f"Sampler: {shards} batch shards cannot be split evenly over {self.processes} processes "
                             f"(mesh {dict(self.mesh.shape)}): rows must be split over the axis that spans hosts")
        return shards // self.processes

    def padded_batch(self, n: int) -> int:
        """Rows this process passes for its `n` episodes: a batch multiple, the same on every process of the mesh."""
        n = int(self.lockstep_max([n])[0])
        return max(-(-n // self.batch_multiple), 1) * self.batch_multiple

    def lockstep_max(self, values) -> np.ndarray:
        """The elementwise maximum of `values` (ints) over the mesh's processes: what they agree on before a
        program they run together (one process: `values` itself)."""
        values = np.asarray(values, np.int32).reshape(-1)
        if self.processes == 1:
            return values
        if self._lockstep is None:
            from jax.sharding import Mesh, PartitionSpec as P

            devices = sorted(self.mesh.devices.flat, key=lambda d: (d.process_index, d.id))
            procs = Mesh(np.array(devices, dtype=object).reshape(self.processes, -1), ("p", "c"))
            self._lockstep = (jax.sharding.NamedSharding(procs, P("p")),
                              jax.jit(lambda x: x.max(0), out_shardings=jax.sharding.NamedSharding(procs, P())))
        sharding, reduce = self._lockstep
        per_chip = np.broadcast_to(values, (self.mesh.devices.size // self.processes, values.size))
        out = reduce(jax.make_array_from_process_local_data(sharding, per_chip[:1]))
        return np.asarray(out.addressable_data(0))

    def _shard_batch(self, x, batch_dim: int = 0):
        """Place this process's rows (host or device array) with the batch dim over the mesh's batch axes."""
        if self.mesh is None:
            return jnp.asarray(x)
        from agq_jax.models import sharding

        shape = list(np.shape(x))
        shape[batch_dim] *= self.processes
        logical = [None] * len(shape)
        logical[batch_dim] = "batch"
        target = jax.sharding.NamedSharding(self.mesh, sharding.logical_to_pspec(logical, shape, self.mesh))
        if self.processes == 1:
            return jax.device_put(x, target)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.sharding.is_equivalent_to(target, x.ndim):
                raise ValueError(f"Sampler: a global array sharded {x.sharding} where {target} was expected")
            return x
        return jax.make_array_from_process_local_data(target, np.asarray(x), tuple(shape))

    def to_host(self, *arrays) -> tuple[np.ndarray, ...]:
        """This process's rows of batch-sharded results, as numpy (all rows on a one-process mesh)."""
        if self.processes == 1:
            return tuple(np.asarray(a) for a in jax.device_get(arrays))
        from jax.experimental import multihost_utils

        out = []
        for a in arrays:
            local = multihost_utils.global_array_to_host_local_array(a, self.mesh, a.sharding.spec)
            out.append(np.asarray(jax.device_get(local)))
        return tuple(out)

    def _mesh_ctx(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def init_cache(self, batch: int, max_len: int):
        """A fresh cache holding `max_len` tokens for this process's `batch` rows (+ `chunk_size` slack),
        batch-sharded under the mesh."""
        from agq_jax.models import qwen3

        if batch % self.batch_multiple:
            raise ValueError(f"Sampler.init_cache: batch {batch} not divisible by the data-parallel size "
                             f"{self.batch_multiple}")
        cache = qwen3.init_cache(self.cfg, batch * self.processes, int(max_len) + self.chunk_size, self.cache_dtype,
                                 mesh=self.mesh)
        return cache._replace(lengths=self._shard_batch(np.zeros((batch,), np.int32)))

    # ---- device calls --------------------------------------------------------------------------------
    def prefill(self, model, cache, ids, mask, prev_logits=None):
        """Append chunk `ids [B, T]` (valid tokens left-aligned, `mask` marks them) at each row's cache length.

        Returns (cache, logits [B, V] f32 at each row's last valid chunk token; rows with an all-zero mask
        keep `prev_logits`). The cache argument is donated. T must be <= chunk_size.
        """
        ids = np.asarray(ids, np.int32)
        mask = np.asarray(mask, np.int32)
        if ids.shape != mask.shape or ids.ndim != 2:
            raise ValueError(f"Sampler.prefill: ids {ids.shape} and mask {mask.shape} must be equal [B, T]")
        if ids.shape[1] > self.chunk_size:
            raise ValueError(f"Sampler.prefill: chunk of {ids.shape[1]} tokens > chunk_size {self.chunk_size}; "
                             "use append()")
        if prev_logits is None:
            prev_logits = np.zeros((ids.shape[0], self.cfg.vocab_size), np.float32)
        with self._mesh_ctx():
            return self._prefill(self.graphdef, self._state(model), cache, self._shard_batch(ids),
                                 self._shard_batch(mask), self._shard_batch(prev_logits))

    def append(self, model, cache, rows: Sequence[Sequence[int]], logits=None):
        """Append ragged token rows (one per batch row, may be empty) in chunks of <= chunk_size.

        Returns (cache, logits [B, V]) where a row's logits follow its last appended token (unchanged for
        empty rows). Chunk widths are bucketed so few shapes get compiled.
        """
        state = self._state(model)
        batch = len(rows)
        longest = int(self.lockstep_max([max((len(r) for r in rows), default=0)])[0])
        if logits is None:
            logits = np.zeros((batch, self.cfg.vocab_size), np.float32)
        for start in range(0, longest, self.chunk_size):
            width = min(self.chunk_size, bucket_length(longest - start, multiple=self.chunk_size))
            ids = np.full((batch, width), self.pad_id, np.int32)
            mask = np.zeros((batch, width), np.int32)
            for b, r in enumerate(rows):
                piece = r[start: start + width]
                ids[b, : len(piece)] = piece
                mask[b, : len(piece)] = 1
            cache, logits = self.prefill(state, cache, ids, mask, logits)
        return cache, logits

    def decode(self, model, cache, logits, rng, *, params: SamplingParams, max_new_tokens: int,
               max_len: int | None = None, active=None, row_budget=None, row_ids=None) -> DecodeOutput:
        """Sample up to `max_new_tokens` per row starting from `logits`, appending to `cache` (donated).

        A row stops at a stop id, at `row_budget[b]` tokens (default max_new_tokens), or when its cache
        holds `max_len` tokens (default: the physical size minus slack). `active [B]` picks the rows to
        decode (others emit nothing). `row_ids [B]`: each row's index in the whole rollout batch, which picks
        its sampling noise (`row_noise`; default 0..B-1).
        """
        batch = logits.shape[0] // self.processes
        capacity = (cache.max_len - self.chunk_size) if max_len is None else int(max_len)
        active = np.ones((batch,), bool) if active is None else np.asarray(active, bool)
        budget = np.full((batch,), max_new_tokens, np.int32) if row_budget is None else np.asarray(row_budget, np.int32)
        row_ids = np.arange(batch, dtype=np.int32) if row_ids is None else np.asarray(row_ids, np.int32)
        with self._mesh_ctx():
            return self._decode(self.graphdef, self._state(model), cache, logits, rng, self._shard_batch(active),
                                self._shard_batch(budget), self._shard_batch(row_ids), jnp.int32(capacity),
                                params=params, max_new=int(max_new_tokens), pad_id=self.pad_id)

    def generate(self, model, prompts: Sequence[Sequence[int]], *, params: SamplingParams, max_new_tokens: int,
                 rng: jax.Array, max_len: int | None = None) -> GenerateResult:
        """One-shot generation for ragged token-id prompts; the batch and lengths are padded to buckets."""
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("Sampler.generate: need a non-empty list of non-empty prompts")
        n = len(prompts)
        batch = self.padded_batch(n)
        longest = max(len(p) for p in prompts)
        max_len = max_len or bucket_length(longest + max_new_tokens)
        if longest >= max_len:
            raise ValueError(f"Sampler.generate: prompt of {longest} tokens leaves no room in max_len {max_len}")
        state = self._state(model)
        rows = [list(p) for p in prompts] + [[self.pad_id]] * (batch - n)  # dummy rows: one pad token
        cache, logits = self.append(state, self.init_cache(batch, max_len), rows)
        out = self.decode(state, cache, logits, rng, params=params, max_new_tokens=max_new_tokens, max_len=max_len,
                          active=np.arange(batch) < n)
        host = self.to_host(out.tokens, out.logprobs, out.sample_logprobs, out.num_tokens, out.finish_reason)
        toks, lps, slps, num, reason = (a[:n] for a in host)
        return GenerateResult(toks, lps, slps, num, [FINISH_REASONS[int(r)] for r in reason])
