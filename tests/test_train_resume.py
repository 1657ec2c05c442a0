"""Resume after a kill: a driver stopped mid-round (after a GRPO step that is not a checkpoint boundary)
and resumed by fresh objects logs exactly the metrics (rewards, losses, evals) of an uninterrupted run.
With the KL term on, the reference (the policy right after SFT) must come back too: rebuilt from the
initial weights instead, the resumed KL values differ."""
import json
import os

import pytest

from _train_tiny import action_tokenizer, learning_task, load_tiny_config, run_config, system_prompts


def _config(run_dir, kl_coef=0.0):
    cfg = load_tiny_config()
    cfg.run_dir = run_dir
    cfg.rounds = 1
    cfg.sft.update(enabled=True, rounds="first", steps=2, batch_size=4, learning_rate=3e-3)
    cfg.rl.update(steps_per_round=3, tasks_per_step=2, group_size=4, mini_batch_tasks=1, ppo_epochs=2,
                  max_refill_batches=1, kl_coef=kl_coef,
                  dynamic_sampling=not kl_coef)  # KL on every group: the re-run step has a non-zero KL
    cfg.eval.update(k=2, greedy_pass1=True, batch_size=8, after_sft=True)
    cfg.checkpoint.update(every_steps=2, keep=2)  # async (load_tiny_config): saves overlap the next rollouts
    cfg.export.every_round = False
    return run_config(cfg)


def _items():
    from agq_jax.driver.data import AGENTIC, Item, make_world, verify_gold
    from agq_jax.envs.worlds.generator import generate_task

    task, actions, words = learning_task()
    other = generate_task("retail", "refusal", seed=1)
    world = make_world(run_config(load_tiny_config()).env, scripted=True)
    train = [Item(AGENTIC, t.id, t) for t in (task, other)]
    for it in train:
        it.gold = verify_gold(it, world)
    held = [Item(AGENTIC, t.id, t) for t in (generate_task("retail", "legal", 5, split="heldout"),)]
    prompts = system_prompts([it.obj for it in train + held])
    return action_tokenizer(actions + list(other.gold_replies), words, prompts), train, held


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(l) for l in f]
    for r in recs:  # wall-clock timings differ between runs; everything else must match exactly
        r["metrics"] = {k: v for k, v in r["metrics"].items() if not k.startswith("perf/")}
    return recs


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, kl_coef):
    from agq_jax.driver import Driver, StopRequested

    tok, train, held = _items()
    full_dir, killed_dir = str(tmp_path / "full"), str(tmp_path / "killed")
    Driver(_config(full_dir, kl_coef), tokenizer=tok, train_items=train, heldout_items=held).run()
    # units: sft 1-2, boundary 3, grpo 4-6 (checkpoints at 3 and 5: grpo steps 0 and 2), round end 7
    with pytest.raises(StopRequested):
        Driver(_config(killed_dir, kl_coef), tokenizer=tok, train_items=train, heldout_items=held,
               stop_after=6).run()
    assert max(r["global_step"] for r in _records(killed_dir)) == 6
    resumed = Driver(_config(killed_dir, kl_coef), tokenizer=tok, train_items=train, heldout_items=held)
    assert resumed.meta["global_step"] == 5 and resumed.meta["phase"] == "grpo"  # restored mid-round
    resumed.run()
    full, again = _records(full_dir), _records(killed_dir)
    assert [r["global_step"] for r in full] == list(range(1, 8)) and len(again) == len(full)
    kinds = [r["kind"] for r in full]
    assert kinds.count("grpo") == 3 and kinds.count("sft") == 2 and kinds.count("eval") == 2
    for a, b in zip(full, again):
        assert a == b, (a, b)
    grpo = [r["metrics"] for r in full if r["kind"] == "grpo"]
    assert all("train/loss" in m and "rollout/reward_mean" in m for m in grpo)
    if kl_coef:  # the KL term is live: the policy moves away from the reference within the first step
        assert max(m["train/kl"] for m in grpo) > 0, [m["train/kl"] for m in grpo]
