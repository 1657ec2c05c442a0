"""Training batches: validation, collation of variable-length episodes, advantages, row selection.

A batch is a dict of host (numpy) arrays, all token aligned with `input_ids`:
  input_ids [B, T] int, attention_mask [B, T] (1 = real token), loss_mask [B, T] (1 = policy token),
  GRPO only: old_logprobs [B, T] float (sampler log-prob of token t, 0 where unused), advantages [B];
  optional: ref_logprobs [B, T].
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from agq_jax.rl import algo

TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask", "old_logprobs", "ref_logprobs")
REQUIRED = {
    "grpo": ("input_ids", "attention_mask", "loss_mask", "old_logprobs", "advantages"),
    "sft": ("input_ids", "attention_mask", "loss_mask"),
}


def validate_batch(batch: Mapping[str, np.ndarray], stage: str = "grpo") -> tuple[int, int]:
    """Check keys and shapes; returns (B, T). Raises ValueError naming the offending key."""
    if stage not in REQUIRED:
        raise ValueError(f"stage must be one of {sorted(REQUIRED)}, got {stage!r}")
    missing = [k for k in REQUIRED[stage] if k not in batch]
    if missing:
        raise ValueError(f"{stage} batch is missing keys {missing}; has {sorted(batch)}")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"batch['input_ids'] must be [B, T], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"batch['input_ids'] must be integer, got {ids.dtype}")
    b, t = ids.shape
    for k in TOKEN_KEYS:
        if k in batch and np.shape(batch[k]) != (b, t):
            raise ValueError(f"batch[{k!r}] has shape {np.shape(batch[k])}, expected [B, T] = {(b, t)}")
    if "advantages" in batch and np.shape(batch["advantages"]) != (b,):
        raise ValueError(f"batch['advantages'] has shape {np.shape(batch['advantages'])}, expected [B] = ({b},)")
    lm = np.asarray(batch["loss_mask"])
    if np.any(lm * (1 - np.asarray(batch["attention_mask"])) != 0):
        raise ValueError("batch['loss_mask'] is 1 on a padding position (attention_mask == 0)")
    return b, t


def collate(samples: Sequence[Mapping[str, Sequence]], pad_id: int, *, pad_to_multiple: int = 8,
            max_len: int | None = None) -> dict[str, np.ndarray]:
    """Right-pad episodes {token_ids, loss_mask, [logprobs]} into a batch (see module docstring).

    `logprobs[t]` must score `token_ids[t]` (token aligned, as the sampler returns them)."""
    if not samples:
        raise ValueError("collate: no samples")
    lens = []
    for i, s in enumerate(samples):
        n = len(s["token_ids"])
        for k in ("loss_mask", "logprobs"):
            if k in s and len(s[k]) != n:
                raise ValueError(f"sample {i}: len({k})={len(s[k])} != len(token_ids)={n}")
        lens.append(n)
    t = max(lens) if max_len is None else max_len
    if max(lens) > t:
        raise ValueError(f"collate: longest sample has {max(lens)} tokens > max_len={t}")
    t = -(-t // pad_to_multiple) * pad_to_multiple
    b = len(samples)
    out = {"input_ids": np.full((b, t), pad_id, np.int32),
           "attention_mask": np.zeros((b, t), np.int32),
           "loss_mask": np.zeros((b, t), np.float32)}
    has_lp = all("logprobs" in s for s in samples)
    if has_lp:
        out["old_logprobs"] = np.zeros((b, t), np.float32)
    for i, (s, n) in enumerate(zip(samples, lens)):
        out["input_ids"][i, :n] = s["token_ids"]
        out["attention_mask"][i, :n] = 1
        out["loss_mask"][i, :n] = s["loss_mask"]
        if has_lp:
            out["old_logprobs"][i, :n] = s["logprobs"]
    out["loss_mask"][:, 0] = 0.0  # the first token has no prefix to be scored under
    return out


def attach_advantages(batch: dict, rewards, estimator: str = "grpo", **kwargs) -> dict:
    """rewards [P, G] for rows ordered group-major (row = p * G + g) -> batch['advantages'] [B]."""
    r = np.asarray(rewards, np.float32)
    b = np.shape(batch["input_ids"])[0]
    if r.ndim != 2 or r.size != b:
        raise ValueError(f"rewards shape {r.shape} must be [P, G] with P*G = batch size {b}")
    adv = np.asarray(algo.compute_advantages(r, estimator, **kwargs), np.float32).reshape(-1)
    return {**batch, "advantages": adv}


def select_rows(batch: Mapping[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    """Rows `idx` of every per-row array (scalars/metadata are passed through)."""
    b = np.shape(batch["input_ids"])[0]
    return {k: (np.asarray(v)[idx] if np.ndim(v) >= 1 and np.shape(v)[0] == b else v) for k, v in batch.items()}


def concat_batches(batches: Sequence[Mapping[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """Stack batches with possibly different T (right-padded to the longest)."""
    t = max(np.shape(bt["input_ids"])[1] for bt in batches)
    keys = set(batches[0])
    out: dict[str, list] = {k: [] for k in keys}
    for bt in batches:
        if set(bt) != keys:
            raise ValueError(f"concat_batches: key sets differ: {sorted(keys)} vs {sorted(bt)}")
        pad = t - np.shape(bt["input_ids"])[1]
        for k in keys:
            v = np.asarray(bt[k])
            if k in TOKEN_KEYS and pad:
                v = np.pad(v, ((0, 0), (0, pad)), constant_values=pad_id if k == "input_ids" else 0)
            out[k].append(v)
    return {k: np.concatenate(v, axis=0) for k, v in out.items()}
