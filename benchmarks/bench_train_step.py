"""GRPO train-step throughput (policy tokens/s and processed tokens/s) on a small dense and a small MoE Qwen3.

Reference measured in the same run on the same model and batch: a plain next-token cross-entropy step that
materialises the full [B, T, V] logits (the usual SFT step). `ratio_vs_ref` = GRPO step time / reference time
shows what the chunked log-probs + PPO/GSPO loss + metrics cost.

MFU: model FLOPs = 6 × active params × tokens + causal attention (12 · layers · heads · head_dim · T² · B / 2),
over two peaks: `mfu_measured` = over the FLOP/s of a large matmul in the compute dtype measured in the same
run on the same device (what this device actually sustains), and `mfu_nominal` = over the datasheet peak
(H100/H200 bf16 dense 989 TFLOP/s; --peak_tflops overrides; none on CPU). Peak device memory comes from
`device.memory_stats()` where the backend has it (GPU/TPU); on CPU the process max RSS is reported instead.

Loss positions only (`--policy_tokens N`): a tool-use row is mostly prompt and environment turns; with N
policy tokens per row the `ppo_clip+scored` row runs the step with LossConfig.scored_tokens = N (the LM head
on those positions only, as the driver does) and `ratio_vs_every` = its time / the every-position ppo_clip
step's, same model and batch; its model FLOPs leave out the LM head on the unscored positions.

Shapes: `dense`, `moe` (small CPU shapes, the default), `tiny` (configs/tiny.py's model), and the real
architectures `Qwen3-1.7B`, `Qwen3-8B`, `Qwen3-30B-A3B` (all 128 experts, top-8) — use --layers to cut depth.
Usage: python benchmarks/bench_train_step.py [--models dense --batch 8 --seq 256 --iters 3 --chunk 128]
  GPU:  --models Qwen3-1.7B --dtype bfloat16 --batch 8 --seq 4096 --remat dots
        --models Qwen3-8B --layers 8 --dtype bfloat16 ...   --models Qwen3-30B-A3B --layers 4 --dtype bfloat16 ...
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from agq_jax.models import attention, moe, qwen3
from agq_jax.models.config import ATTENTION_IMPLS
from agq_jax.rl.optim import OptimConfig
from agq_jax.rl.step import LossConfig, StepConfig, Trainer

SHAPES = {
    "dense": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "moe": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, model_type="qwen3_moe", num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True, tie_word_embeddings=False),
}


TINY = dict(vocab_size=1536, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=10000.0)
NOMINAL_PEAK_TFLOPS = {"bfloat16": {"H100": 989.0, "H200": 989.0, "A100": 312.0}}


def model_config(name: str, layers: int, t: int, args) -> qwen3.Qwen3Config:
    """A named shape with the run's training-side choices; --layers cuts depth (0 = the shape's own)."""
    if name in qwen3.PRESETS:
        cfg = qwen3.PRESETS[name]
    elif name == "tiny":
        cfg = qwen3.Qwen3Config(**TINY)
    elif name in SHAPES:
        cfg = qwen3.Qwen3Config(**SHAPES[name])
    else:
        raise SystemExit(f"--models: unknown shape {name!r}; choose from {sorted(SHAPES) + ['tiny'] + sorted(qwen3.PRESETS)}")
    moe_impl = moe.resolve_moe_impl(args.moe_impl)  # reported resolved
    return cfg.replace(num_hidden_layers=layers or cfg.num_hidden_layers, max_position_embeddings=max(t, 128),
                       attention_impl=args.attention_impl, moe_impl=moe_impl, remat=args.remat)


def measured_peak_tflops(dtype, n: int, iters: int = 3) -> float:
    """Achieved TFLOP/s of an [n,n]@[n,n] matmul in `dtype` on the default device (best of `iters`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def nominal_peak_tflops(dtype_name: str):
    kind = jax.devices()[0].device_kind
    for key, peak in NOMINAL_PEAK_TFLOPS.get(dtype_name, {}).items():
        if key in kind:
            return peak
    return None


def peak_memory() -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_device_mem_gib": round(stats["peak_bytes_in_use"] / 2 ** 30, 3)}
    return {"host_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)}


def active_params(cfg: qwen3.Qwen3Config) -> int:
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    attn = h * cfg.head_dim * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    ffn = cfg.moe_intermediate_size * cfg.num_experts_per_tok if cfg.is_moe else cfg.intermediate_size
    mlp = 3 * h * ffn
    router = h * cfg.num_experts if cfg.is_moe else 0
    return layers * (attn + mlp + router) + h * cfg.vocab_size  # LM head (embedding lookup is free)


def step_flops(cfg, b, t) -> float:
    """Model FLOPs of one update, counted as the AOT tool counts them (parameters + causal attention)."""
    from agq_jax.aot.plan import model_flops

    return model_flops(cfg, active_params(cfg), b, t)[0]


def make_batch(cfg, b, t, policy_tokens=0, seed=0):
    """Random rows whose last `policy_tokens` positions are the loss tokens (0: the last 3/4 of the row)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    lm = (np.arange(t)[None] >= t - (policy_tokens or t - t // 4)).repeat(b, 0).astype(np.float32)
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


def bench(name, b, t, iters, chunk, args, peaks):
    cfg = model_config(name, args.layers, t, args)
    dtype, pdtype = jnp.dtype(args.dtype), jnp.dtype(args.param_dtype)
    model = qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=pdtype)
    rows = []
    # reference: plain CE step on full logits, same optimizer
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-5)
    opt = tx.init(params)
    batch = make_batch(cfg, b, t, args.policy_tokens)
    ids = jnp.asarray(batch["input_ids"])

    @jax.jit
    def ref_step(params, opt):
        def loss(p):
            logits = nnx.merge(graphdef, p)(ids).logits
            lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))  # noqa: the usual full-logits CE
            return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()
        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    state = [params, opt]

    def run_ref():
        state[0], state[1] = ref_step(*state)
        jax.block_until_ready(state[0])
    t_ref = timed(run_ref, iters)

    n_policy = int(batch["loss_mask"][0, 1:].sum())
    variants = [("ppo_clip", 0), ("gspo", 0)] + ([("ppo_clip", n_policy)] if n_policy < t - 1 else [])
    for loss_name, scored in variants:
        agg = "token-mean" if loss_name == "ppo_clip" else "seq-mean-token-mean"
        tr = Trainer(nnx.clone(model), OptimConfig(learning_rate=1e-5),
                     LossConfig(policy_loss=loss_name, loss_agg=agg, logprob_chunk=chunk, scored_tokens=scored),
                     StepConfig())
        lp, _ = tr.compute_logprobs(batch)
        gb = {**batch, "old_logprobs": lp * batch["loss_mask"]}
        t_step = timed(lambda: tr.train_batch(gb), iters)
        flops = step_flops(cfg, b, t) - (6 * cfg.hidden_size * cfg.vocab_size * b * (t - 1 - scored) if scored else 0)
        tflops = flops / t_step / 1e12
        row = {"bench": "train_step", "model": name, "loss": loss_name + ("+scored" if scored else ""),
               "batch": b, "seq": t, "scored_tokens": scored,
               "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "moe": cfg.is_moe,
               "experts": f"{cfg.num_experts_per_tok}/{cfg.num_experts}" if cfg.is_moe else None,
               "dtype": args.dtype, "param_dtype": args.param_dtype, "attention_impl": cfg.attention_impl,
               "attention_resolved": attention.resolve_attention_impl(cfg.attention_impl, t, t, causal=True),
               "moe_impl": cfg.moe_impl if cfg.is_moe else None, "remat": cfg.remat,
               "vocab": cfg.vocab_size, "chunk": chunk, "active_params": active_params(cfg),
               "step_s": round(t_step, 4), "tokens_per_s": round(b * t / t_step, 1),
               "policy_tokens_per_s": round(float(batch["loss_mask"][:, 1:].sum()) / t_step, 1),
               "model_tflops_per_s": round(tflops, 4), "step_model_tflop": round(flops / 1e12, 4),
               "peak_measured_tflops": round(peaks["measured"], 4),
               "mfu_measured": round(tflops / peaks["measured"], 4),
               "ref_ce_step_s": round(t_ref, 4), "ratio_vs_ref": round(t_step / t_ref, 3),
               "ratio_vs_every": round(t_step / rows[0]["step_s"], 3) if scored else None,
               "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "host": platform.machine(),
               "load_avg_1m": round(os.getloadavg()[0], 2), **peak_memory()}
        if peaks["nominal"]:
            row["peak_nominal_tflops"] = peaks["nominal"]
            row["mfu_nominal"] = round(tflops / peaks["nominal"], 4)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--policy_tokens", type=int, default=0,
                    help="loss tokens per row (0: the last 3/4); < seq-1 adds the ppo_clip+scored row")
    ap.add_argument("--peak_tflops", type=float, default=0.0,
                    help="nominal device peak for mfu_nominal (default: 989 on H100/H200 in bf16; none on CPU)")
    ap.add_argument("--matmul", type=int, default=0, help="matmul size of the measured peak (0: 2048 CPU, 8192 else)")
    ap.add_argument("--models", default="dense", help="comma-separated shapes (dense, moe, tiny, Qwen3-1.7B, ...)")
    ap.add_argument("--layers", type=int, default=0, help="cut every shape to this many layers (0 = its own)")
    ap.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on GPU/TPU)")
    ap.add_argument("--param_dtype", default="float32")
    ap.add_argument("--attention_impl", default="auto", choices=list(ATTENTION_IMPLS))
    ap.add_argument("--moe_impl", default="auto", choices=["auto", "ragged", "tiled", "dense"])
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    args = ap.parse_args()
    n = args.matmul or (2048 if jax.default_backend() == "cpu" else 8192)
    peaks = {"measured": measured_peak_tflops(jnp.dtype(args.dtype), n),
             "nominal": args.peak_tflops or nominal_peak_tflops(args.dtype)}
    print(json.dumps({"bench": "train_step_peak", "matmul": n, "dtype": args.dtype,
                      "device": jax.devices()[0].device_kind, "measured_tflops": round(peaks["measured"], 4),
                      "nominal_tflops": peaks["nominal"]}), flush=True)
    rows = []
    for name in args.models.split(","):
        rows += bench(name, args.batch, args.seq, args.iters, args.chunk, args, peaks)
    for r in rows:
        print(json.dumps(r))
    print(f"\n{'model':>13} {'loss':>15} {'B×T':>10} {'step s':>8} {'tok/s':>9} {'policy tok/s':>13} "
          f"{'TFLOP/s':>8} {'MFU meas':>8} {'MFU nom':>8} {'CE ref s':>9} {'ratio':>6} {'vs every':>8}")
    for r in rows:
        nom = f"{r['mfu_nominal']:>8.3f}" if "mfu_nominal" in r else f"{'-':>8}"
        print(f"{r['model']:>13} {r['loss']:>15} {r['batch']:>4}×{r['seq']:<5} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>9.0f} {r['policy_tokens_per_s']:>13.0f} {r['model_tflops_per_s']:>8.3f} "
              f"{r['mfu_measured']:>8.3f} {nom} {r['ref_ce_step_s']:>9.3f} {r['ratio_vs_ref']:>6.2f} "
              f"{r['ratio_vs_every'] or '-':>8}")
    print(f"dtype {args.dtype}, device {jax.devices()[0].device_kind}, measured {args.dtype} matmul peak "
          f"{peaks['measured']:.3f} TFLOP/s, nominal {peaks['nominal'] or '-'}")


if __name__ == "__main__":
    main()
