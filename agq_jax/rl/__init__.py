"""GRPO for agq-jax: registered advantage / policy-loss / aggregation / KL functions, chunked log-probs,
the optimizer, the jitted train step and orbax checkpoints.

Batch convention (see `batch.py`): right-padded `[B, T]` arrays token aligned with `input_ids`;
`old_logprobs[b, t]` is the sampler's log-prob of `input_ids[b, t]`; `loss_mask` is 1 on policy tokens.

    from agq_jax.rl import Trainer, OptimConfig, LossConfig, StepConfig, CheckpointManager
    tr = Trainer(model, OptimConfig(learning_rate=1e-6), LossConfig(), StepConfig(ppo_epochs=1, mini_batch_size=16),
                 mesh=mesh)
    metrics = tr.train_batch(batch)               # GRPO: μ epochs × mini-batches, one optimizer step each
    metrics = tr.train_batch(sft_batch, stage="sft")
    policy = tr.model()                           # NNX module for the sampler (re-fetch after each update)
"""
from agq_jax.rl import algo
from agq_jax.rl.batch import attach_advantages, collate, concat_batches, select_rows, validate_batch
from agq_jax.rl.checkpoint import CheckpointManager, restore_trainer, save_trainer
from agq_jax.rl.logprobs import next_token_logprobs
from agq_jax.rl.optim import OptimConfig, make_optimizer, make_schedule
from agq_jax.rl.step import LossConfig, StepConfig, Trainer, TrainState

__all__ = ["algo", "attach_advantages", "collate", "concat_batches", "select_rows", "validate_batch",
           "CheckpointManager", "restore_trainer", "save_trainer", "next_token_logprobs", "OptimConfig",
           "make_optimizer", "make_schedule", "LossConfig", "StepConfig", "Trainer", "TrainState"]
