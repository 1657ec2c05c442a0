"""GRPO train-step throughput (policy tokens/s and processed tokens/s) on a small dense and a small MoE Qwen3.

Reference measured in the same run on the same model and batch: a plain next-token cross-entropy step that
materialises the full [B, T, V] logits (the usual SFT step). `ratio_vs_ref` = GRPO step time / reference time
shows what the chunked log-probs + PPO/GSPO loss + metrics cost. Model FLOPs use 6 × active params × tokens
(+ attention); pass --peak_tflops for MFU on an accelerator.
Usage: python benchmarks/bench_train_step.py [--batch 8 --seq 256 --iters 5 --chunk 128 --peak_tflops 0]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from agq_jax.models import qwen3
from agq_jax.rl.optim import OptimConfig
from agq_jax.rl.step import LossConfig, StepConfig, Trainer

SHAPES = {
    "dense": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "moe": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, model_type="qwen3_moe", num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True, tie_word_embeddings=False),
}


def active_params(cfg: qwen3.Qwen3Config) -> int:
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    attn = h * cfg.head_dim * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    ffn = cfg.moe_intermediate_size * cfg.num_experts_per_tok if cfg.is_moe else cfg.intermediate_size
    mlp = 3 * h * ffn
    router = h * cfg.num_experts if cfg.is_moe else 0
    return layers * (attn + mlp + router) + h * cfg.vocab_size  # LM head (embedding lookup is free)


def step_flops(cfg, b, t) -> float:
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * t * t * b / 2  # causal
    return 6.0 * active_params(cfg) * b * t + attn


def make_batch(cfg, b, t, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    lm = (np.arange(t)[None] >= t // 4).repeat(b, 0).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones((b, t), np.int32), "loss_mask": lm,
            "advantages": rng.normal(size=b).astype(np.float32)}


def timed(fn, iters):
    """Median seconds per call after one compile/warm-up call (median: the host may be shared)."""
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(name, b, t, iters, chunk, peak):
    cfg = qwen3.Qwen3Config(**SHAPES[name], max_position_embeddings=max(t, 128))
    model = qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    rows = []
    # reference: plain CE step on full logits, same optimizer
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-5)
    opt = tx.init(params)
    batch = make_batch(cfg, b, t)
    ids = jnp.asarray(batch["input_ids"])

    @jax.jit
    def ref_step(params, opt):
        def loss(p):
            logits = nnx.merge(graphdef, p)(ids).logits
            lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
            return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()
        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    state = [params, opt]

    def run_ref():
        state[0], state[1] = ref_step(*state)
        jax.block_until_ready(state[0])
    t_ref = timed(run_ref, iters)

    for loss_name in ("ppo_clip", "gspo"):
        agg = "token-mean" if loss_name == "ppo_clip" else "seq-mean-token-mean"
        tr = Trainer(nnx.clone(model), OptimConfig(learning_rate=1e-5),
                     LossConfig(policy_loss=loss_name, loss_agg=agg, logprob_chunk=chunk), StepConfig())
        lp, _ = tr.compute_logprobs(batch)
        gb = {**batch, "old_logprobs": lp * batch["loss_mask"]}
        t_step = timed(lambda: tr.train_batch(gb), iters)
        flops = step_flops(cfg, b, t)
        row = {"bench": "train_step", "model": name, "loss": loss_name, "batch": b, "seq": t,
               "vocab": cfg.vocab_size, "chunk": chunk, "active_params": active_params(cfg),
               "step_s": round(t_step, 4), "tokens_per_s": round(b * t / t_step, 1),
               "policy_tokens_per_s": round(float(batch["loss_mask"][:, 1:].sum()) / t_step, 1),
               "model_tflops_per_s": round(flops / t_step / 1e12, 4),
               "ref_ce_step_s": round(t_ref, 4), "ratio_vs_ref": round(t_step / t_ref, 3),
               "device": jax.devices()[0].device_kind, "host": platform.machine()}
        if peak:
            row["mfu"] = round(flops / t_step / 1e12 / peak, 4)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (e.g. 989 for H100 bf16)")
    ap.add_argument("--models", default="dense,moe")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        rows += bench(name, args.batch, args.seq, args.iters, args.chunk, args.peak_tflops)
    for r in rows:
        print(json.dumps(r))
    print(f"\n{'model':>6} {'loss':>9} {'B×T':>9} {'step s':>8} {'tok/s':>9} {'policy tok/s':>13} "
          f"{'TFLOP/s':>8} {'CE ref s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:>6} {r['loss']:>9} {r['batch']:>4}×{r['seq']:<4} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>9.0f} {r['policy_tokens_per_s']:>13.0f} {r['model_tflops_per_s']:>8.3f} "
              f"{r['ref_ce_step_s']:>9.3f} {r['ratio_vs_ref']:>6.2f}")


if __name__ == "__main__":
    main()
