"""Rollouts: the jitted KV-cache sampler and multi-turn token-in/token-out episodes against envs."""
from agq_jax.rollout.multiturn import (Episode, RolloutBatch, RolloutConfig, default_score, pack_episodes,
                                       run_rollouts)
from agq_jax.rollout.sampler import (DEFAULT_STOP_IDS, FINISH_REASONS, DecodeOutput, GenerateResult, Sampler,
                                     SamplingParams, bucket_length, sample_from_logits)

__all__ = ["Sampler", "SamplingParams", "DecodeOutput", "GenerateResult", "DEFAULT_STOP_IDS", "FINISH_REASONS",
           "bucket_length", "sample_from_logits", "Episode", "RolloutBatch", "RolloutConfig", "run_rollouts",
           "pack_episodes", "default_score"]
