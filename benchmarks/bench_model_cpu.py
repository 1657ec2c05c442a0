"""Model speed on CPU: agq_jax vs transformers (torch CPU) on the same random Qwen3, measured in the same run.

Prefill: one forward over [batch, prompt_len] (tokens/s = batch * prompt_len / time).
Decode: greedy generation of `new_tokens` after the prompt with a KV cache, prefill included on both sides
(agq_jax: jitted prefill + jitted one-token step with argmax on device, jax.jit over the split weights as the
Sampler runs it; transformers: `generate`, sdpa attention). The two sides are timed alternately, best of --repeats each.
Prints one JSON line per measurement, then a table with the ratio agq_jax / transformers (target >= 1.0).

Usage: python benchmarks/bench_model_cpu.py [--hidden 512] [--layers 4] [--batches 1 8] [--moe [--moe-impl tiled]]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from agq_jax.models import qwen3


def build(args, out_dir):
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                  num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                  num_key_value_heads=max(1, args.hidden // 128), head_dim=64, max_position_embeddings=4096,
                  tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    if args.moe:
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=16, num_experts_per_tok=4,
                                          moe_intermediate_size=args.hidden // 2, norm_topk_prob=True)
        hf = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    hf.save_pretrained(out_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa")
    hf.eval()
    return hf, qwen3.from_pretrained(out_dir, dtype=jnp.float32, moe_impl=args.moe_impl)


def best_of_pair(fn_a, fn_b, repeats):
    """Min wall time of each, measured alternately so a slow spell of the host hits both sides alike."""
    fn_a(), fn_b()  # warm-up / compile
    times = ([], [])
    for _ in range(repeats):
        for fn, ts in zip((fn_a, fn_b), times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return min(times[0]), min(times[1])


# jax.jit over (static graphdef, weights) as agq_jax.rollout.Sampler runs the model: nnx.jit re-walks the module
# graph in Python on every call (measured ~40 ms per call here, 8x a whole MoE decode step), which would make
# this a benchmark of the call wrapper rather than of the model.
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _step(graphdef, state, ids, cache):
    """Prefill (ids [B,T]) or one decode step (ids [B,1]): greedy next token and the updated cache."""
    out = nnx.merge(graphdef, state)(ids, cache=cache)
    return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.cache


def agq_generate(model, ids, new_tokens):
    graphdef, state = nnx.split(model)
    cache = qwen3.init_cache(model.config, ids.shape[0], ids.shape[1] + new_tokens, jnp.float32)
    tok, cache = _step(graphdef, state, ids, cache)
    toks = [tok]
    for _ in range(new_tokens - 1):
        tok, cache = _step(graphdef, state, tok[:, None], cache)
        toks.append(tok)
    return np.stack(jax.device_get(toks), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("--moe-impl", default="tiled", choices=["tiled", "ragged", "dense"],
                    help="expert computation (ragged_dot is lowered densely by XLA:CPU; tiled is the CPU choice)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build(args, tmp)
    env = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
           "load_avg_1m": os.getloadavg()[0]}
    rows = []
    rng = np.random.RandomState(0)
    for batch in args.batches:
        ids = rng.randint(0, args.vocab, (batch, args.prompt_len))
        ids_j, ids_t = jnp.asarray(ids, jnp.int32), torch.tensor(ids)
        # correctness guard: the two models must agree before their speeds are compared
        ref = hf(ids_t[:, :16]).logits.detach().numpy()
        assert np.abs(np.asarray(ours(ids_j[:, :16]).logits) - ref).max() < 1e-3

        def hf_fwd():
            with torch.no_grad():
                hf(ids_t)

        graphdef, state = nnx.split(ours)
        t_agq, t_hf = best_of_pair(lambda: _forward(graphdef, state, ids_j).block_until_ready(), hf_fwd,
                                   args.repeats)
        rows.append(("prefill", batch, batch * args.prompt_len / t_agq, batch * args.prompt_len / t_hf))

        def hf_gen():
            with torch.no_grad():
                return hf.generate(ids_t, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False)[:, args.prompt_len:].numpy()

        assert (agq_generate(ours, ids_j, args.new_tokens) == hf_gen()).mean() > 0.9  # same greedy tokens
        t_agq, t_hf = best_of_pair(lambda: agq_generate(ours, ids_j, args.new_tokens), hf_gen, args.repeats)
        rows.append(("decode", batch, batch * args.new_tokens / t_agq, batch * args.new_tokens / t_hf))

    model = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "moe": args.moe,
             "moe_impl": args.moe_impl if args.moe else None,
             "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    for phase, batch, agq, ref in rows:
        print(json.dumps({"bench": "model_cpu", "phase": phase, "batch": batch, "agq_tok_s": round(agq, 1),
                          "transformers_tok_s": round(ref, 1), "ratio": round(agq / ref, 3), **model, **env}))
    print(f"\n{'phase':<8} {'batch':>5} {'agq_jax tok/s':>14} {'transformers tok/s':>19} {'ratio':>6}")
    for phase, batch, agq, ref in rows:
        print(f"{phase:<8} {batch:>5} {agq:>14.1f} {ref:>19.1f} {agq / ref:>6.2f}")


if __name__ == "__main__":
    main()
