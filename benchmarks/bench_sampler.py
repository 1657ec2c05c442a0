"""Sampler speed: prefill and decode tokens/s at batch 1 and a larger batch, against the bandwidth roofline.

Decode is memory-bound: each step reads every weight once plus the live KV cache, so its ceiling is
    tokens/s = batch / ((weight bytes + KV bytes read) / bandwidth)
(`decode_roofline`, usable on any device: pass the HBM bandwidth, e.g. 3.35e12 for H100 SXM). On CPU
the bandwidth is measured in the same run (a large streaming multiply). A second reference in the same run
is cache-less generation (one full forward per new token), so the table shows what the KV cache buys.
On CPU a small model's weights partly stay in the last-level cache, so fractions above 1 are possible there;
the fraction is the figure of merit on accelerators.

Prints one JSON line per measurement, then a table.
Usage: python benchmarks/bench_sampler.py [--batches 1 16] [--prompt-len 128] [--new-tokens 64] [--moe]
       [--preset Qwen3-0.6B --dtype bfloat16 --bandwidth-gbs 3350]   # on an accelerator
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agq_jax.models import qwen3
from agq_jax.rollout.sampler import Sampler, SamplingParams


def param_counts(cfg) -> dict[str, int]:
    """Parameters read per decode step: 'dense' (non-expert, incl. LM head), 'expert' (one expert), counts."""
    h, n, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = h * n * d + 2 * h * kv * d + n * d * h + 2 * d + 2 * h  # q, k, v, o, q/k norms, 2 layer norms
    n_moe = cfg.num_moe_layers if cfg.is_moe else 0
    n_dense = cfg.num_hidden_layers - n_moe
    dense = cfg.num_hidden_layers * attn + n_dense * 3 * h * cfg.intermediate_size
    dense += n_moe * h * cfg.num_experts  # routers
    dense += h * cfg.vocab_size + h  # LM head (the tied embedding read as the head) + final norm
    expert = 3 * h * cfg.moe_intermediate_size if n_moe else 0
    return {"dense": dense, "expert": expert, "moe_layers": n_moe}


def decode_step_bytes(cfg, batch: int, context: int, weight_bytes: int = 2, kv_bytes: int = 2) -> float:
    """Bytes one decode step must read: all non-expert weights, the experts the batch touches (expected
    distinct experts per layer for uniform routing), and K and V of `context` tokens per row."""
    c = param_counts(cfg)
    weights = c["dense"]
    if c["moe_layers"]:
        e, k = cfg.num_experts, cfg.num_experts_per_tok
        touched = e * (1.0 - (1.0 - k / e) ** batch)
        weights += c["moe_layers"] * touched * c["expert"]
    kv = 2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * cfg.head_dim
    return weights * weight_bytes + kv * kv_bytes


def decode_roofline(cfg, batch: int, context: int, bandwidth_bytes_per_s: float, weight_bytes: int = 2,
                    kv_bytes: int = 2) -> float:
    """Upper bound on decode tokens/s (all rows) when every step is limited by memory bandwidth."""
    return batch * bandwidth_bytes_per_s / decode_step_bytes(cfg, batch, context, weight_bytes, kv_bytes)


def measure_bandwidth(nbytes: int = 1 << 28) -> float:
    """Streaming read+write bandwidth of the default device (bytes/s), best of 8; in place (donated), so no
    fresh-buffer page faults are timed."""
    f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x = f(jnp.ones((nbytes // 4,), jnp.float32)).block_until_ready()
    best = math.inf
    for _ in range(8):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _best(fn, repeats: int) -> float:
    fn()  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(cfg, dtype, batch: int, prompt_len: int, new_tokens: int, bandwidth: float, repeats: int,
          temperature: float = 0.0) -> list[dict]:
    model = qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    sampler = Sampler(model, pad_id=0, chunk_size=prompt_len)
    state = nnx.state(model)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, cfg.vocab_size, (batch, prompt_len)).tolist()
    params = SamplingParams(temperature=temperature, stop_ids=())
    max_len = prompt_len + new_tokens

    def prefill():
        cache, logits = sampler.append(state, sampler.init_cache(batch, max_len), prompts)
        return jax.block_until_ready((cache, logits))

    t_prefill = _best(prefill, repeats)
    cache0, logits0 = prefill()

    def decode():
        cache = jax.tree.map(jnp.copy, cache0)  # decode donates its cache
        out = sampler.decode(state, cache, logits0, jax.random.key(0), params=params, max_new_tokens=new_tokens)
        return jax.block_until_ready(out.tokens)

    copy_t = _best(lambda: jax.block_until_ready(jax.tree.map(jnp.copy, cache0)), repeats)
    t_decode = max(_best(decode, repeats) - copy_t, 1e-9)

    @nnx.jit
    def full_step(m, ids):  # the cache-less reference: a full forward for the next token
        return jnp.argmax(m(ids).logits[:, -1], -1)

    ref_steps = min(new_tokens, 8)
    ids0 = jnp.asarray(prompts, jnp.int32)

    def nocache():
        ids = ids0
        for _ in range(ref_steps):  # growing length: one compile per length, warmed up by _best
            ids = jnp.concatenate([ids, full_step(model, ids)[:, None].astype(jnp.int32)], axis=1)
        return jax.block_until_ready(ids)

    t_ref = _best(nocache, max(1, repeats // 2))
    wbytes = jnp.dtype(dtype).itemsize
    mean_ctx = prompt_len + new_tokens / 2
    roof = decode_roofline(cfg, batch, int(mean_ctx), bandwidth, wbytes, wbytes)
    decode_tps = batch * new_tokens / t_decode
    base = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": jnp.dtype(dtype).name,
            "temperature": temperature,
            "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size,
            "experts": f"{cfg.num_experts_per_tok}/{cfg.num_experts}" if cfg.is_moe else None,
            "device": jax.devices()[0].device_kind}
    return [
        {**base, "metric": "prefill_tok_s", "value": batch * prompt_len / t_prefill},
        {**base, "metric": "decode_tok_s", "value": decode_tps, "roofline_tok_s": roof,
         "fraction_of_roofline": decode_tps / roof,
         "step_bytes": decode_step_bytes(cfg, batch, int(mean_ctx), wbytes, wbytes),
         "bandwidth_bytes_s": bandwidth},
        {**base, "metric": "nocache_decode_tok_s", "value": batch * ref_steps / t_ref,
         "kv_cache_speedup": decode_tps / (batch * ref_steps / t_ref)},
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--preset", default=None, help="a qwen3.PRESETS name (accelerators); default: a small CPU model")
    ap.add_argument("--moe", action="store_true", help="the small CPU model as MoE (16 experts, top-4, moe_impl tiled)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="device bandwidth in GB/s (default: measured)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; rollouts sample at 1.0")
    args = ap.parse_args()
    if args.preset:
        cfg = qwen3.PRESETS[args.preset]
    else:
        moe = dict(model_type="qwen3_moe", num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                   norm_topk_prob=True, moe_impl="tiled") if args.moe else {}
        cfg = qwen3.Qwen3Config(vocab_size=32768, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=64, **moe)
    if args.layers:
        import dataclasses
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measure_bandwidth()
    print(json.dumps({"metric": "bandwidth_bytes_s", "value": bandwidth, "measured": args.bandwidth_gbs is None,
                      "platform": platform.processor() or platform.machine()}))
    rows = []
    for b in args.batches:
        for r in bench(cfg, jnp.dtype(args.dtype), b, args.prompt_len, args.new_tokens, bandwidth, args.repeats,
                       args.temperature):
            print(json.dumps(r))
            rows.append(r)
    print(f"\n{'batch':>5} {'metric':<22} {'tok/s':>12} {'roofline':>12} {'frac':>6} {'vs no-cache':>11}")
    for r in rows:
        roof = f"{r['roofline_tok_s']:12.0f}" if "roofline_tok_s" in r else " " * 12
        frac = f"{r['fraction_of_roofline']:6.2f}" if "fraction_of_roofline" in r else " " * 6
        spd = f"{r['kv_cache_speedup']:10.1f}x" if "kv_cache_speedup" in r else ""
        print(f"{r['batch']:>5} {r['metric']:<22} {r['value']:12.1f} {roof} {frac} {spd}")


if __name__ == "__main__":
    main()
