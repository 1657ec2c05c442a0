"""Token log-probs and entropy from final hidden states without materialising [B, T, V] logits.

The sequence is cut into chunks of `chunk_size` positions; each chunk's logits ([B, C, V], fp32
accumulation) are made, reduced to (log-prob of the next token, entropy) and dropped. The chunk
function is rematerialised (`jax.checkpoint`) so the backward pass also holds one chunk at a time.

Alignment: `logp[:, t]` is log p(input_ids[:, t] | input_ids[:, <t]); column 0 has no prefix and is 0.
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
                        with_entropy: bool = True):
    """hidden [B, T, H] (final-normed), unembed [H, V], input_ids [B, T] -> (logp [B, T], entropy [B, T]).

    Both outputs are token aligned (column t scores token t); column 0 is 0. Entropy at column t is the
    entropy of the distribution that produced token t. `temperature` must match the sampler's."""
    if hidden.ndim != 3 or input_ids.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {hidden.shape} must be [B, T, H] with input_ids {input_ids.shape} = [B, T]")
    if unembed.shape[0] != hidden.shape[-1]:
        raise ValueError(f"unembed {unembed.shape} must be [H={hidden.shape[-1]}, V]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, t, _ = hidden.shape
    h = hidden[:, :-1]
    targets = input_ids[:, 1:].astype(jnp.int32)
    n = t - 1
    c = max(1, min(chunk_size, n))
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    w = unembed.astype(hidden.dtype)
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
        lp, ent = lp[:, :n], ent[:, :n]
    else:
        lp, ent = jax.lax.map(one, (hc, tc))
        lp = lp.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :n]
        ent = ent.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :n]
    zero = jnp.zeros((b, 1), jnp.float32)
    return jnp.concatenate([zero, lp], axis=1), jnp.concatenate([zero, ent], axis=1)


def full_logprobs_reference(logits, input_ids, temperature: float = 1.0):
    """Unchunked oracle from full logits [B, T, V] (tests only; same alignment as above)."""
    z = logits[:, :-1].astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(z, axis=-1)
    lp = jnp.take_along_axis(logp_all, input_ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    ent = -(jnp.exp(logp_all) * logp_all).sum(-1)
    zero = jnp.zeros((z.shape[0], 1), jnp.float32)
    return jnp.concatenate([zero, lp], 1), jnp.concatenate([zero, ent], 1)
