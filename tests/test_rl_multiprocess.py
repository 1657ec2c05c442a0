"""Two CPU processes on localhost (jax.distributed + gloo collectives), each feeding half of the batch,
take the same GRPO steps as one process with the whole batch (the loss-positions-only LM head included)."""
import json
import os

import numpy as np
import pytest

from _multiprocess import init_worker, start_workers, wait_workers

B, T, VOCAB, ROUNDS = 8, 16, 128, 2


def build(mesh=None):
    from flax import nnx
    from agq_jax.models import qwen3
    from agq_jax.models.sharding import shard_model
    from agq_jax.rl.optim import OptimConfig
    from agq_jax.rl.step import LossConfig, StepConfig, Trainer
    cfg = qwen3.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    if mesh is not None:
        model = shard_model(model, mesh)
    # scored_tokens 12: round 0's rows hold at most 12 loss tokens (the LM head runs on those), round 1 has a
    # row of 13 on process 0 only, and both processes must then agree to score every position
    return Trainer(model, OptimConfig(learning_rate=3e-3), LossConfig(logprob_chunk=8, scored_tokens=12),
                   StepConfig(ppo_epochs=2, mini_batch_size=4, micro_batch_size=2), mesh=mesh)


def global_batch(r: int):
    rng = np.random.default_rng(100 + r)
    lens = rng.integers(T // 2, T + 1, B)
    am = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    return {"input_ids": (rng.integers(0, VOCAB, (B, T)) * am).astype(np.int32), "attention_mask": am,
            "loss_mask": (am * (np.arange(T)[None] >= 3)).astype(np.float32),
            "advantages": rng.normal(size=B).astype(np.float32),
            "noise": (0.05 * rng.normal(size=(B, T))).astype(np.float32)}


def run(trainer, select=dict):
    """ROUNDS rollout batches (`select`: this process's rows of the global batch); old log-probs = the
    trainer's own (perturbed like a bf16 sampler)."""
    out = []
    for r in range(ROUNDS):
        batch = select(global_batch(r))
        lp, _ = trainer.compute_logprobs(batch)
        batch["old_logprobs"] = ((lp + batch.pop("noise")) * batch["loss_mask"]).astype(np.float32)
        out.append(trainer.train_batch(batch))
    return out


def test_two_process_step_equals_one_process(tmp_path):
    wait_workers(start_workers(__file__, tmp_path, devices_per_process=1), timeout_s=600)

    single = build()
    expected = run(single)
    got = [json.loads((tmp_path / f"metrics{i}.json").read_text()) for i in range(2)]
    assert got[0] == got[1]  # both processes report the same global metrics
    for e, g in zip(expected, got[0]):
        for k in ("loss", "pg_loss", "grad_norm", "tokens", "entropy", "logprob_diff", "clip_frac"):
            assert g[k] == pytest.approx(e[k], rel=1e-4, abs=1e-6), k
    params = np.load(tmp_path / "params.npz")
    import jax
    for i, leaf in enumerate(jax.tree.leaves(single.state.params)):
        np.testing.assert_allclose(params[f"p{i}"], np.asarray(leaf), atol=2e-5)


if __name__ == "__main__":  # one of the two worker processes
    pid, out = init_worker()
    import jax
    from jax.experimental import multihost_utils
    from agq_jax.models.sharding import MeshConfig, make_mesh
    assert jax.process_count() == 2 and jax.device_count() == 2
    mesh = make_mesh(MeshConfig(data=1, fsdp=2))  # batch and params both split across the processes
    with jax.set_mesh(mesh):
        trainer = build(mesh)
    half = B // 2  # every process holds the whole batch (gathered rollouts); local_rows picks its half
    picked = trainer.local_rows(global_batch(0))
    assert all(np.array_equal(picked[k], v[pid * half:(pid + 1) * half]) for k, v in global_batch(0).items())
    metrics = run(trainer, trainer.local_rows)
    with open(os.path.join(out, f"metrics{pid}.json"), "w") as f:
        json.dump(metrics, f)
    leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(trainer.state.params)]
    if pid == 0:
        np.savez(os.path.join(out, "params.npz"), **{f"p{i}": a for i, a in enumerate(leaves)})
    jax.distributed.shutdown()
