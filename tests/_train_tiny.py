"""Shared pieces of the driver tests: an action-level tokenizer over one procedural task and a tiny config.

Why an action-level vocabulary: GRPO from a random init only learns when a random policy sometimes earns
reward. A word-level tokenizer whose only output tokens are Qwen3's 26 added tokens, [UNK] and a handful
of whole agent replies (the task's gold replies plus wrong ones) makes each turn a ~1-in-40 choice, so a
random policy scores ~0 and GRPO has a signal. Everything else is the real thing: the env, the scripted
user, the state-backed tools, the scorer, the sampler, the multi-turn rollouts and the GRPO trainer.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def action_tokenizer(actions: list[str], words: list[str] = (), phrases: list[str] = ()):
    """Word-level: [UNK], `words` (so env turns are legible), Qwen3's added tokens, whole `phrases` (the
    tasks' system prompts, one token each: a ~400-token prompt would spread a random init's attention so
    thin that no turn could tell its own context apart), then whole replies."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from agq_jax import tokenizer as qtok

    vocab = {"[UNK]": 0}
    for w in ("system", "user", "assistant", *words):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    for content, special in qtok.ADDED_TOKENS:
        tk.add_special_tokens([AddedToken(content, normalized=False, special=special)]) if special else \
            tk.add_tokens([AddedToken(content, normalized=False, special=False)])
    tk.add_tokens([AddedToken(a, normalized=False, special=False) for a in (*phrases, *actions)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = qtok.QWEN3_CHAT_TEMPLATE
    return tok


def system_prompts(tasks) -> list[str]:
    """The system message each task's env opens with (tools block included)."""
    from agq_jax.envs import make_env

    return [make_env(t).reset()[0]["content"] for t in tasks]


def learning_task():
    """One level-0 legal retail task (5 gold replies: ask, look up, confirm, refund, close) and its actions."""
    from agq_jax.envs.worlds.generator import counterfactual_replies, generate_task

    import re

    task = generate_task("retail", "legal", seed=1)
    wrong = ["Sorry, I can't help with that request.", "Goodbye.", counterfactual_replies(task, "hack")[1]]
    env_text = " ".join(m["content"] for m in task.gold_trajectory if m["role"] in ("user", "tool"))
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", env_text)))
    return task, list(task.gold_replies) + wrong, words


def load_tiny_config():
    """A tiny model's ConfigDict (tests change fields, then `run_config(c)` makes the typed config)."""
    from agq_jax.run_config import defaults

    c = defaults()
    c.name = "test"
    c.verbose = False
    c.mesh.enabled = False
    c.model.overrides = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                             max_position_embeddings=1024, rope_theta=10000.0, initializer_range=0.02)
    c.tokenizer.kind = "procedural"
    c.rollout.update(max_len=640, max_new_tokens_per_turn=1, enable_thinking=False, max_workers=4,
                     stop_on_tool_call=False, chunk_size=128)
    c.env.update(max_agent_turns=6, max_user_turns=6)
    c.eval.update(k=0, greedy_pass1=False, batch_size=32, after_sft=False)
    c.checkpoint.update(every_steps=2, keep=3, async_save=True)
    c.rl.update(tasks_per_step=4, group_size=8, mini_batch_tasks=4, ppo_epochs=1, max_refill_batches=0,
                logprob_chunk=256)
    c.optim.update(learning_rate=1e-2, weight_decay=0.0, max_grad_norm=1.0)
    c.rounds = 1
    return c


def run_config(c):
    from agq_jax.run_config import RunConfig

    return RunConfig.from_configdict(c)
