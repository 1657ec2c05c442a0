"""Released AgenticQwen tasks trained on end to end in the paper's world: the driver loads them from a
`data.task_files` file, and every episode runs with the loopback teacher as mock user, mock tools and rubric
judge under the reference protocol and gate, through GRPO steps, a checkpoint and an HF export."""
import json
import os

import numpy as np

from _train_tiny import action_tokenizer, learning_task, load_tiny_config, run_config, system_prompts

IDS = ("fd7529dc-7cf3-43b3-892e-c1ac455e4f27-7",)   # refuse a simulation on an invalid event (one lookup first)


def _setup(tmp_path, demo_path):
    from agq_jax.envs import reference
    from agq_jax.envs.importers import load_demo_records
    from agq_jax.envs.probes import probe_replies
    from agq_jax.envs.runtime import tools_block

    raw = [r for r in json.load(open(demo_path)) if r["id"] in IDS]
    (tmp_path / "tasks.json").write_text(json.dumps(raw))
    tasks, _ = load_demo_records(raw)
    gold = [r for t in tasks for r in reference.gold_for(t, "reference")]
    wrong = [r for t in tasks for k in ("refuse", "nothing", "hack") for r in probe_replies(t, k, "reference")]
    phrases = []
    for t in tasks:   # the system prompt and the opening are one token each (see _train_tiny)
        phrases += [reference.render_system(t, tools_block(t)), reference.render_opening(t)]
    return tasks, action_tokenizer(sorted(set(gold + wrong)), phrases=phrases)   # no words: most samples are actions


def test_imported_tasks_train_in_the_teacher_world(tmp_path, demo_path):
    from agq_jax.driver import Driver

    tasks, tok = _setup(tmp_path, demo_path)
    c = load_tiny_config()
    c.run_dir = str(tmp_path / "run")
    c.data.update(task_files=(str(tmp_path / "tasks.json"),), heldout_tasks=0)
    c.synth.agentic.update(num_procedural=0, procedural_per_round=0)
    # the reference protocol; the default gate (with the reference's, a random policy that never answers scores 0)
    c.env.update(user="teacher", tools="teacher", judge="teacher", protocol="reference", max_agent_turns=8,
                 max_user_turns=8)
    c.teachers.default.update(base_url="loopback", model="loopback-teacher", timeout_s=30.0, backoff_s=0.01)
    c.rl.update(steps_per_round=2, tasks_per_step=1, group_size=8, mini_batch_tasks=1, reward="rubric")
    c.checkpoint.every_steps = 1
    drv = Driver(run_config(c), tokenizer=tok)
    out = drv.run()
    stats = drv.teachers.stats_dict()
    recs = [json.loads(line) for line in open(os.path.join(c.run_dir, "metrics.jsonl"))]
    grpo = [r["metrics"] for r in recs if r["kind"] == "grpo"]
    assert len(grpo) == 2
    for m in grpo:   # the rubric judge, the lookup sub-goal and the required refusal scored every episode
        for key in ("reward/subgoal/judge", "reward/subgoal/refused", "reward/diag/gate_clean_end"):
            assert key in m, sorted(m)
        # a step whose only group has no signal (equal rewards) takes no optimizer step (and its loss is 0)
        assert (m["grpo/valid_groups"] > 0) == (m["train/optimizer_steps"] > 0)
        assert np.isfinite(m["train/loss"])
    assert max(m["rollout/reward_std"] for m in grpo) > 0.0      # a group with a signal
    for role in ("mock_user", "judge"):   # the teachers played the world (this task's calls are all pinned
        assert stats[role]["calls"] > 0, stats   # returns, so the mock tool answers them: tests/test_envs_world.py)
    # the episodes' own teacher counts reach the step metrics (malformed / failed replies would show there too)
    assert sum(m.get("env/mock_user/calls", 0.0) for m in grpo) > 0
    man = json.load(open(os.path.join(c.run_dir, "data", "round_0", "manifest.json")))
    assert man["mode"] == "teacher"
    assert os.listdir(os.path.join(c.run_dir, "checkpoints")) and out["export"]



def test_episodes_the_world_broke_are_not_trained_on(tmp_path):
    """The mock user's teacher fails mid-run (a server that is up but answers every request with HTTP 500):
    every episode that meets it ends in `error`. Such a group is neither a training signal nor a flywheel
    failure, and a step whose groups all broke takes no optimizer step (AdamW's momentum would otherwise move
    the weights on a zero gradient)."""
    from agq_jax.driver import Driver
    from data_synth.loopback_teacher import start_loopback_teacher

    from agq_jax.driver.data import AGENTIC, Item

    task, actions, words = learning_task()   # a procedural task: a plain reply is a message to the user
    c = load_tiny_config()
    c.run_dir = str(tmp_path / "run")
    c.env.user = "teacher"
    c.rl.update(steps_per_round=1, tasks_per_step=2, group_size=4, mini_batch_tasks=1)
    tok = action_tokenizer(actions, words, system_prompts([task]))
    with start_loopback_teacher(malformed_rate=1.0, malformed_kinds=("http_500",)) as down:
        c.teachers.mock_user.update(base_url=down.base_url, model="loopback-teacher", max_retries=1,
                                    backoff_s=0.01)
        drv = Driver(run_config(c), tokenizer=tok, train_items=[Item(AGENTIC, task.id, task)], heldout_items=[])
        drv.run()
    recs = [json.loads(line) for line in open(os.path.join(c.run_dir, "metrics.jsonl"))]
    (m,) = [r["metrics"] for r in recs if r["kind"] == "grpo"]
    assert m["termination/error"] > 0 and m["grpo/error_groups"] == 2.0 and m["grpo/valid_groups"] == 0.0
    assert m["train/optimizer_steps"] == 0.0 and m["train/skipped_steps"] == 2.0 and m["train/loss"] == 0.0
    assert "train/entropy" not in m   # nothing was measured
    assert int(drv.trainer.state.step) == 0   # no SFT in this config: the weights are the initial ones
    failures = os.path.join(c.run_dir, "failures", "round_1.jsonl")
    assert not os.path.exists(failures) or not open(failures).read().strip()   # not the flywheel's input
