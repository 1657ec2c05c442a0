"""`python -m agq_jax.train --config=configs/tiny.py` shrunk to a few steps: two flywheel rounds (offline
procedural data, failures -> harder variants), SFT, GRPO, evals; writes checkpoints, metrics JSONL,
TensorBoard events and per-round HF exports that transformers loads and generates with."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OVERRIDES = [
    "--config.rounds=2", "--config.sft.steps=2", "--config.sft.batch_size=2", "--config.rl.steps_per_round=1",
    "--config.rl.tasks_per_step=2", "--config.rl.group_size=2", "--config.rl.mini_batch_tasks=2",
    "--config.data.heldout_tasks=2", "--config.eval.k=1", "--config.eval.batch_size=4",
    "--config.rollout.max_len=768", "--config.rollout.max_new_tokens_per_turn=12", "--config.env.max_agent_turns=3",
    "--config.synth.agentic.num_procedural=4", "--config.synth.agentic.procedural_per_round=1",
    "--config.checkpoint.every_steps=1", "--config.verbose=False",
    "--config.model.overrides.hidden_size=32", "--config.model.overrides.intermediate_size=64",
    "--config.model.overrides.num_hidden_layers=1", "--config.model.overrides.num_attention_heads=2",
    "--config.model.overrides.num_key_value_heads=1",
]


def test_train_cli_tiny_two_rounds(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", "agq_jax.train", "--config=configs/tiny.py",
                           f"--config.run_dir={run_dir}", *OVERRIDES], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert set(out["evals"]) == {"round0_sft", "round0", "round1"}
    recs = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [r["kind"] for r in recs] == ["sft", "sft", "eval", "grpo", "eval", "grpo", "eval"]
    assert all(r["global_step"] == i + 1 for i, r in enumerate(recs))
    grpo = recs[3]["metrics"]
    for key in ("rollout/reward_mean", "train/loss", "grpo/zero_variance_frac", "perf/tokens_per_s"):
        assert key in grpo, sorted(grpo)
    assert os.listdir(run_dir / "checkpoints") and os.listdir(run_dir / "tensorboard")
    # the flywheel ran twice: round 1's dataset was built from round 0's failures
    man1 = json.load(open(run_dir / "data" / "round_1" / "manifest.json"))
    assert man1["round"] == 1 and "n_failures_in" in man1
    # the last export loads in transformers and generates with the run's own tokenizer and chat template
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = out["export"]
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi, I need help with my order."}],
                                  add_generation_prompt=True, enable_thinking=False, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5 or tok.convert_tokens_to_ids("<|im_end|>") in gen[0, ids.shape[1]:].tolist()
