"""Compile time against the number of layers: scanned layers (cfg.scan_layers=True, one lax.scan per run of
same-kind layers) against a python loop over the same stacked params (scan_layers=False), same run.

For each depth it lowers and compiles a forward+backward of a next-token loss (--forward: also the forward), and
reports seconds and the ratio to the 1-layer compile of the same variant. Scanned compile time should stay
flat with depth; unrolled grows about linearly. Shape: a small dense Qwen3 (compile time barely depends on
the widths), fp32; pass --moe for a small MoE shape (tiled experts on CPU).

Usage: python benchmarks/bench_compile.py [--layers 1 4 16] [--seq 128] [--batch 2] [--moe] [--no-unrolled]
       [--forward] [--remat full]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from agq_jax.models import qwen3

DENSE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=1024)
MOE = dict(DENSE, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
           norm_topk_prob=True)


def compile_seconds(cfg, batch, seq, grad: bool):
    """(lower seconds, compile seconds) of a fresh jitted function for cfg."""
    model = qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jnp.zeros((batch, seq), jnp.int32)

    def loss(st):
        logits = nnx.merge(graphdef, st)(ids).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    fn = jax.jit(jax.value_and_grad(loss)) if grad else jax.jit(lambda st: nnx.merge(graphdef, st)(ids).logits)
    t0 = time.perf_counter()
    lowered = fn.lower(state)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("--no-unrolled", action="store_true", help="only the scanned variant")
    ap.add_argument("--forward", action="store_true", help="also compile the forward alone")
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    args = ap.parse_args()
    env = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "cpus": os.cpu_count(),
           "machine": platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2), "dtype": "float32",
           "batch": args.batch, "seq": args.seq, "remat": args.remat}
    shape = dict(MOE, moe_impl="tiled") if args.moe else dict(DENSE)
    rows, base = [], {}
    variants = [True] if args.no_unrolled else [True, False]
    for what in (("forward", "fwd_bwd") if args.forward else ("fwd_bwd",)):
        for scan in variants:
            for layers in args.layers:
                cfg = qwen3.Qwen3Config(**shape, num_hidden_layers=layers, scan_layers=scan, remat=args.remat)
                lower_s, compile_s = compile_seconds(cfg, args.batch, args.seq, what == "fwd_bwd")
                total = lower_s + compile_s
                base.setdefault((what, scan), total)
                rows.append({"bench": "compile", "what": what, "scan_layers": scan, "layers": layers,
                             "moe": args.moe, "lower_s": round(lower_s, 3), "compile_s": round(compile_s, 3),
                             "total_s": round(total, 3), "ratio_vs_fewest_layers": round(total / base[(what, scan)], 2),
                             **env})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'what':<8} {'scan':>5} {'layers':>6} {'lower s':>8} {'compile s':>9} {'total s':>8} {'x fewest':>9}")
    for r in rows:
        print(f"{r['what']:<8} {str(r['scan_layers']):>5} {r['layers']:>6} {r['lower_s']:>8.2f} {r['compile_s']:>9.2f} "
              f"{r['total_s']:>8.2f} {r['ratio_vs_fewest_layers']:>9.2f}")


if __name__ == "__main__":
    main()
