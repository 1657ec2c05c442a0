"""Token log-probs and entropy from final hidden states without materialising [B, T, V] logits.

The sequence is cut into chunks of `chunk_size` positions; each chunk's logits ([B, C, V], fp32
accumulation) are made, reduced to (log-prob of the next token, entropy) and dropped. The chunk
function is rematerialised (`jax.checkpoint`) so the backward pass also holds one chunk at a time.

Alignment: `logp[:, t]` is log p(input_ids[:, t] | input_ids[:, <t]); column 0 has no prefix and is 0.

Scoring only the loss positions (`score_mask`, `max_scored`): in a tool-use episode most of a row is prompt
and environment turns, and the policy's own tokens are a bounded few (the rollout's turn and token limits);
the LM head (hidden x vocabulary, 151,936 columns for Qwen3) then runs on those `max_scored` positions per
row instead of all T, and the results are scattered back into [B, T] (other columns 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_stats(h, w, targets, temperature):
    """h [B, C, H], w [H, V], targets [B, C] -> (logp [B, C], entropy [B, C]) in fp32."""
    logits = jnp.einsum("bch,hv->bcv", h, w, preferred_element_type=jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - lse[..., None])
    ent = lse - (probs * logits).sum(axis=-1)
    return tgt - lse, ent


def next_token_logprobs(hidden, unembed, input_ids, *, chunk_size: int = 512, temperature: float = 1.0,
                        with_entropy: bool = True, score_mask=None, max_scored: int = 0):
    """hidden [B, T, H] (final-normed), unembed [H, V], input_ids [B, T] -> (logp [B, T], entropy [B, T]).

    Both outputs are token aligned (column t scores token t); column 0 is 0. Entropy at column t is the
    entropy of the distribution that produced token t. `temperature` must match the sampler's.
    With `score_mask` [B, T] and 0 < `max_scored` < T - 1, only the columns where the mask is > 0 are
    scored (the first `max_scored` of them per row: the caller guarantees no row has more); the rest are 0."""
    if hidden.ndim != 3 or input_ids.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {hidden.shape} must be [B, T, H] with input_ids {input_ids.shape} = [B, T]")
    if unembed.shape[0] != hidden.shape[-1]:
        raise ValueError(f"unembed {unembed.shape} must be [H={hidden.shape[-1]}, V]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, t, _ = hidden.shape
    w = unembed.astype(hidden.dtype)
    if score_mask is not None and 0 < max_scored < t - 1:
        if score_mask.shape != (b, t):
            raise ValueError(f"score_mask {score_mask.shape} must be [B, T] = {(b, t)}")
        scored = (score_mask > 0).at[:, 0].set(False)
        # the scored columns first, in order (a stable sort of a boolean key); the tail holds unscored ones
        cols = jnp.argsort(~scored, axis=1, stable=True)[:, :max_scored].astype(jnp.int32)
        keep = jnp.take_along_axis(scored, cols, axis=1)
        h = jnp.take_along_axis(hidden, jnp.maximum(cols - 1, 0)[..., None], axis=1)
        targets = jnp.take_along_axis(input_ids, cols, axis=1).astype(jnp.int32)
        lp, ent = _chunked_stats(h, w, targets, chunk_size, temperature, with_entropy)
        rows = jnp.arange(b)[:, None]
        zeros = jnp.zeros((b, t), jnp.float32)  # cols are distinct per row: a set, not an add
        return (zeros.at[rows, cols].set(jnp.where(keep, lp, 0.0)),
                zeros.at[rows, cols].set(jnp.where(keep, ent, 0.0)))
    lp, ent = _chunked_stats(hidden[:, :-1], w, input_ids[:, 1:].astype(jnp.int32), chunk_size, temperature,
                             with_entropy)
    zero = jnp.zeros((b, 1), jnp.float32)
    return jnp.concatenate([zero, lp], axis=1), jnp.concatenate([zero, ent], axis=1)


def _chunked_stats(h, w, targets, chunk_size: int, temperature: float, with_entropy: bool):
    """h [B, N, H] (the states that predict `targets` [B, N]) -> (logp, entropy) [B, N], chunk by chunk."""
    b, n, _ = h.shape
    c = max(1, min(chunk_size, n))
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [n_chunks, B, C, ...] so lax.map walks the sequence one chunk at a time
    hc = h.reshape(b, n_chunks, c, -1).swapaxes(0, 1)
    tc = targets.reshape(b, n_chunks, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        hx, tx = args
        lp, ent = _chunk_stats(hx, w, tx, temperature)
        if not with_entropy:
            ent = jnp.zeros_like(lp)
        return lp, ent

    if n_chunks == 1:
        lp, ent = one((hc[0], tc[0]))
        return lp[:, :n], ent[:, :n]
    lp, ent = jax.lax.map(one, (hc, tc))
    return (lp.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :n],
            ent.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :n])


def full_logprobs_reference(logits, input_ids, temperature: float = 1.0):
    """Unchunked oracle from full logits [B, T, V] (tests only; same alignment as above)."""
    z = logits[:, :-1].astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(z, axis=-1)
    lp = jnp.take_along_axis(logp_all, input_ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    ent = -(jnp.exp(logp_all) * logp_all).sum(-1)
    zero = jnp.zeros((z.shape[0], 1), jnp.float32)
    return jnp.concatenate([zero, lp], 1), jnp.concatenate([zero, ent], 1)
