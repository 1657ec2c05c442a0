"""Exact resume: a run SIGKILLed right after an async save, restored into fresh objects, continues
to the same params / metrics / RNG as a run that was never killed."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS, KILL_AFTER, B, T, VOCAB = 4, 1, 8, 16, 128


def build_trainer():
    from flax import nnx
    from agq_jax.models import qwen3
    from agq_jax.rl.optim import OptimConfig
    from agq_jax.rl.step import LossConfig, StepConfig, Trainer
    cfg = qwen3.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    return Trainer(model, OptimConfig(learning_rate=3e-3, warmup_steps=2, decay="cosine", total_steps=20),
                   LossConfig(logprob_chunk=8, kl_coef=0.1), StepConfig(ppo_epochs=2, mini_batch_size=4), seed=7)


def run_steps(trainer, start, stop, mngr=None, kill_after=None):
    """Data position `p` -> batch from seed p; advantages drawn from the trainer's checkpointed RNG."""
    from agq_jax.rl.checkpoint import save_trainer
    history = []
    for pos in range(start, stop):
        rng = np.random.default_rng(pos)
        ids = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32),
                 "loss_mask": (np.arange(T)[None] >= 4).repeat(B, 0).astype(np.float32)}
        lp, _ = trainer.compute_logprobs(batch)
        batch["old_logprobs"] = (lp * batch["loss_mask"]).astype(np.float32)
        batch["advantages"] = np.asarray(jax.random.normal(trainer.split_rng(), (B,)), np.float32)
        history.append(trainer.train_batch(batch))
        if mngr is not None:
            save_trainer(mngr, trainer, {"round": 0, "data_position": pos + 1})
            if pos == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # while the async save may still be writing
    return history


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    from agq_jax.rl.checkpoint import CheckpointManager, restore_trainer
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, __file__, str(ckpt)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    reference = build_trainer()
    ref_hist = run_steps(reference, 0, STEPS)

    resumed = build_trainer()  # fresh model, optimizer and manager objects
    with CheckpointManager(ckpt, max_to_keep=2) as mngr:
        steps = mngr.all_steps()
        assert 1 <= len(steps) <= 2 and max(steps) <= 4 * (KILL_AFTER + 1)  # keep-N, never a partial dir
        meta = restore_trainer(mngr, resumed)
    pos = meta["data_position"]
    assert 1 <= pos <= KILL_AFTER + 1 and int(resumed.state.step) == 4 * pos  # 2 epochs x 2 mini-batches
    hist = run_steps(resumed, pos, STEPS)
    for a, b in zip(ref_hist[pos:], hist):
        assert a == b  # bit-identical metrics
    for a, b in zip(jax.tree.leaves(reference.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(reference.ref_params), jax.tree.leaves(resumed.ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_checks_structure_and_metadata(tmp_path):
    from agq_jax.rl.checkpoint import CheckpointManager
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(4)}
    with CheckpointManager(tmp_path, async_save=False, max_to_keep=2) as mngr:
        for s in (1, 2, 3):
            mngr.save(s, {"train": tree}, {"round": s, "note": "x"})
        mngr.wait()
        assert mngr.all_steps() == [2, 3]
        got, meta = mngr.restore({"train": tree})
        assert meta == {"round": 3, "note": "x"}
        np.testing.assert_array_equal(got["train"]["w"], tree["w"])
        with pytest.raises(ValueError, match="does not match the target structure"):
            mngr.restore({"train": {"w": tree["w"], "other": tree["step"]}})
        with pytest.raises(KeyError, match="no tree 'ref'"):
            mngr.restore({"ref": tree})
        with pytest.raises(ValueError, match="JSON"):
            mngr.save(4, {"train": tree}, {"bad": object()})
    assert json.loads((tmp_path / "3" / "meta" / "metadata").read_text())["user"]["round"] == 3



def test_restore_subtree_reads_only_the_named_leaves(tmp_path):
    """An export restores a trainer state's params alone (abstract targets, no optimizer moments read) and
    a target that is not the saved model is refused, naming the leaf."""
    from flax import nnx

    from agq_jax.rl.checkpoint import CheckpointManager, save_trainer
    trainer = build_trainer()
    run_steps(trainer, 0, 1)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainer.state.params)
    with CheckpointManager(tmp_path, async_save=False) as mngr:
        save_trainer(mngr, trainer)
        got = mngr.restore_subtree("train", ".params", abstract)
        assert isinstance(got, nnx.State)
        for a, b in zip(jax.tree.leaves(trainer.state.params), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        with pytest.raises(ValueError, match=r"has no leaf \.params\['w'\]"):
            mngr.restore_subtree("train", ".params", {"w": jax.ShapeDtypeStruct((2,), np.float32)})
        with pytest.raises(KeyError, match="no tree 'kl_reference'"):
            mngr.restore_subtree("kl_reference", ".params", abstract)


if __name__ == "__main__":  # the worker that gets killed
    from agq_jax.rl.checkpoint import CheckpointManager
    run_steps(build_trainer(), 0, STEPS, CheckpointManager(sys.argv[1], max_to_keep=2), kill_after=KILL_AFTER)
    sys.exit(3)  # not reached
