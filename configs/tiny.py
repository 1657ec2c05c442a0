"""The embedded default behind `make demo`: the whole flywheel on a 2-core CPU in ~15 minutes.

Procedural worlds at difficulty level 0 (offline, no teacher), a tiny Qwen3, a short SFT warm start on
verified gold trajectories, then GRPO rounds with flywheel expansion (failed training tasks come back
procedurally harder next round), a held-out evaluation after SFT and after every round, and an HF
export per round that transformers loads.

Vocabulary: tokenizer.kind="procedural" (a BPE trained on procedural-world text with Qwen3's added tokens
and chat template). With hidden 64 the real 151,936-row LM head costs ~2*64*151,936 = 19.4 MFLOP per token
against ~0.4 MFLOP for the two transformer layers (~50x), and its logits / Adam state dominate memory:
measured on this machine, a B=32 x 768-token GRPO update on the real vocabulary needed 12 GB and did not
finish in the time the procedural one took for the whole step (see README / the driver report).
"""
import importlib.util
import pathlib
import sys


def _base():
    name = "agq_jax_configs_base"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).resolve().with_name("base.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def get_config():
    c = _base().get_base_config()
    c.name = "tiny"
    c.seed = 0
    c.rounds = 2
    c.mesh.enabled = False                      # one CPU device

    c.model.overrides = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                             max_position_embeddings=2048, rope_theta=10000.0, initializer_range=0.02)
    c.tokenizer.kind = "procedural"
    c.tokenizer.vocab_size = 2048

    c.data.agentic_weight = 1.0
    c.data.reasoning_weight = 0.0
    c.data.heldout_tasks = 30                   # 6 domains x 5 branch types, held-out seeds

    c.synth.progress = False
    c.synth.agentic.num_procedural = 60         # round 0: every domain x branch twice
    c.synth.agentic.procedural_per_round = 12   # later rounds: fresh tasks + harder variants of failures
    c.synth.agentic.level = 0

    c.sft.enabled = True
    c.sft.rounds = "first"
    c.sft.steps = 60                            # deliberately short: GRPO has room to improve on it
    c.sft.batch_size = 16
    c.sft.learning_rate = 3e-3
    c.sft.warmup_steps = 10

    c.rl.steps_per_round = 10
    c.rl.tasks_per_step = 4
    c.rl.group_size = 8
    c.rl.mini_batch_size = 2                    # 2 optimizer steps per GRPO step
    c.rl.max_refill_batches = 1
    c.rl.temperature = 1.0
    c.optim.learning_rate = 3e-4
    c.optim.weight_decay = 0.0

    c.rollout.max_len = 1024
    c.rollout.max_new_tokens_per_turn = 96
    c.rollout.max_agent_turns = 8
    c.rollout.max_user_turns = 8
    c.rollout.enable_thinking = False
    c.rollout.max_workers = 8

    c.eval.k = 2
    c.eval.temperature = 1.0
    c.eval.batch_size = 32                      # = tasks_per_step x group_size: shares the sampler compile

    c.checkpoint.every_steps = 4
    c.checkpoint.keep = 2
    return c
