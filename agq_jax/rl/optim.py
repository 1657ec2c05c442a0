"""Optimizer: optax AdamW with linear warmup, cosine / constant / linear / wsd decay and global-norm clipping.

Mixed precision is a model choice: build the model with `param_dtype=float32, dtype=bfloat16` and the
optimizer moments and master weights stay fp32 while matmuls run in bf16; `mu_dtype` can shrink the
first moment further. Gradient accumulation is done by the train step (an explicit scan over
micro-batches with exact token normalisation), so it is not wrapped here.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

from agq_jax.run_config.schema import DECAYS  # the one list of schedule names (the run config validates with it)

# "wsd" (warmup-stable-decay): the full rate until the last WSD_DECAY_FRACTION of the steps, then linear to
# the floor. Why: a phase change that happens late in training (the tiny demo model learning to copy ids,
# somewhere between SFT steps ~150 and ~350 depending on the seed) still gets the full rate, where a cosine
# has already decayed it and freezes the run half-way.
WSD_DECAY_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6
    warmup_steps: int = 0
    decay: str = "constant"           # "constant" | "cosine" | "linear" | "wsd" (see WSD_DECAY_FRACTION)
    total_steps: int = 1000           # optimizer steps, for cosine / linear decay
    min_lr_ratio: float = 0.0         # final lr = learning_rate * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0  # None disables clipping
    mu_dtype: str | None = None        # e.g. "bfloat16"; None = param dtype

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"OptimConfig.decay must be one of {DECAYS}, got {self.decay!r}")
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise ValueError(f"OptimConfig: need warmup_steps >= 0 and total_steps > 0, got "
                             f"{self.warmup_steps} / {self.total_steps}")
        if self.learning_rate < 0:
            raise ValueError(f"OptimConfig.learning_rate must be >= 0, got {self.learning_rate}")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then the chosen decay to lr * min_lr_ratio."""
    lr, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.decay == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "wsd":
        tail = max(int(round(decay_steps * WSD_DECAY_FRACTION)), 1)
        after = optax.join_schedules([optax.constant_schedule(lr), optax.linear_schedule(lr, end, tail)],
                                     [decay_steps - tail])
    else:
        after = optax.linear_schedule(lr, end, decay_steps)
    if cfg.warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, lr, cfg.warmup_steps)
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def _decay_mask(params):
    """No weight decay on vectors (norm scales, biases), as usual for transformers."""
    import jax
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    chain = []
    if cfg.max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    chain.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask,
                             mu_dtype=jnp.dtype(cfg.mu_dtype) if cfg.mu_dtype else None))
    return optax.chain(*chain)
