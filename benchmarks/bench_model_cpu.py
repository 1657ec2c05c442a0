"""Model speed on CPU: agq_jax vs transformers (torch CPU) on the same random Qwen3, measured in the same run.

Prefill: one forward over [batch, prompt_len] (tokens/s = batch * prompt_len / time).
Decode: greedy generation of `new_tokens` after the prompt with a KV cache, prefill included on both sides
(agq_jax: jitted prefill + jitted one-token step with argmax on device, jax.jit over the weights as the
Sampler passes them — on CPU split per layer, `qwen3.split_layer_stacks`; transformers: `generate`, sdpa).
The two sides are timed alternately (--repeats each, same thread count: torch's intra-op threads = the cores
XLA:CPU uses); the ratio is of the best times, and the spread (median / best) of each side is printed too.
A ratio on one CPU does not carry to another (oneDNN/MKL vs XLA:CPU kernels differ per ISA), so every line
states the CPU model, its vector ISA flags, both sides' thread counts and the scheduling of the process.
Run it on an idle host: with other processes on the cores, torch's OpenMP threads (libgomp) stall at each
barrier and transformers gets 10-20x slower at 2 threads while XLA:CPU loses far less, which inflates the
ratio. On a shared host `chrt -f 1 python benchmarks/bench_model_cpu.py ...` gives the process the cores for
its ~1 minute (real-time class; the kernel still leaves others 5%); the table warns when the host was busy.
Prints one JSON line per measurement, then a table with the ratio agq_jax / transformers (target >= 1.0).
`gemm` rows time one jitted XLA:CPU dot against torch's matmul (MKL) on the model's own weight shapes
(MLP up projection, LM head) at the rows a phase feeds them (decode 1 / 8, prefill batch x prompt): the
library gap under the model ratios, which moves with the CPU.

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


EXPERTS, TOP_K = 16, 4  # the MoE shape of --moe


def build(args, out_dir):
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                  num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                  num_key_value_heads=max(1, args.hidden // 128), head_dim=64, max_position_embeddings=4096,
                  tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    if args.moe:
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                          moe_intermediate_size=args.hidden // 2, norm_topk_prob=True)
        hf = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    hf.save_pretrained(out_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa")
    hf.eval()
    return hf, qwen3.from_pretrained(out_dir, dtype=jnp.float32, moe_impl=args.moe_impl)


def cpu_info() -> dict:
    """CPU model, vector ISA flags, thread counts and scheduling: what a CPU ratio depends on."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = val.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")) or f in ("f16c", "sse4_2"))
    policy = {os.SCHED_OTHER: "other", os.SCHED_FIFO: "fifo", os.SCHED_RR: "rr"}.get(os.sched_getscheduler(0), "?")
    return {"cpu": model, "isa": " ".join(isa), "amx": any(f.startswith("amx") for f in flags),
            "cpus": os.cpu_count(),
            # XLA:CPU sizes its intra-op pool to the schedulable CPUs, torch's OpenMP default is the same count
            "xla_threads": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "torch_version": torch.__version__,
            "jax_version": jax.__version__, "transformers_version": transformers.__version__,
            "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
            "torch_onednn": torch.backends.mkldnn.is_available(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax_backend": jax.default_backend(), "sched": policy, "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


LOADED_WARNING = (
    "WARNING: the host was busy (1-min load {load} on {cpus} cpus before the run, scheduling {sched}).\n"
    "Under competing load torch's OpenMP threads stall at every barrier (measured 10-20x slower at 2 threads\n"
    "on a 2-core Xeon), so the ratio flatters agq_jax. Measure on an idle host, or give this process the\n"
    "cores: `chrt -f 1 python ...`.")


def best_of_pair(fn_a, fn_b, repeats):
    """Wall times of each side, measured alternately (a-b, then b-a: the order alternates too) so a slow spell
    of the host hits both alike; returns (times_a, times_b)."""
    fn_a(), fn_b()  # warm-up / compile
    times = ([], [])
    for r in range(repeats):
        order = ((fn_a, times[0]), (fn_b, times[1]))
        for fn, ts in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return times


# jax.jit over (static graphdef, weights) as agq_jax.rollout.Sampler runs the model: nnx.jit re-walks the module
# graph in Python on every call (measured ~40 ms per call here, 8x a whole MoE decode step), which would make
# this a benchmark of the call wrapper rather than of the model.
def _merge(graphdef, state):
    return qwen3.merge_split(graphdef, state) if SPLIT else nnx.merge(graphdef, state)


SPLIT = qwen3.split_weights_for_inference()  # what the Sampler does on this backend


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return _merge(graphdef, state)(ids).logits


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _step(graphdef, state, ids, cache):
    """Prefill (ids [B,T]) or one decode step (ids [B,1]): greedy next token and the updated cache."""
    out = _merge(graphdef, state)(ids, cache=cache)
    return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.cache


def inference_state(model):
    """(graphdef, weights as the Sampler passes them): split per layer once, outside the timed calls."""
    graphdef, state = nnx.split(model)
    return graphdef, jax.block_until_ready(qwen3.split_layer_stacks(state) if SPLIT else state)


def agq_generate(model, ids, new_tokens, weights=None):
    graphdef, state = weights or inference_state(model)
    cache = qwen3.init_cache(model.config, ids.shape[0], ids.shape[1] + new_tokens, jnp.float32)
    tok, cache = _step(graphdef, state, ids, cache)
    toks = [tok]
    for _ in range(new_tokens - 1):
        tok, cache = _step(graphdef, state, tok[:, None], cache)
        toks.append(tok)
    return np.stack(jax.device_get(toks), 1)


_matmul = jax.jit(jnp.matmul)


def gemm_rows(args, repeats):
    """(name, rows, flops, agq times, torch times) of single fp32 matmuls, the two libraries interleaved."""
    rng, out, k, tokens = np.random.RandomState(1), [], args.hidden, max(args.batches) * args.prompt_len
    mlp = (("expert_up", k // 2, tokens * TOP_K // EXPERTS)  # an expert's share of a batch's rows
           if args.moe else ("mlp_up", k * 3, tokens))
    for name, n, rows in (mlp, ("lm_head", args.vocab, tokens)):
        w = rng.randn(k, n).astype(np.float32)
        w_j, w_t = jnp.asarray(w), torch.from_numpy(w)
        for m in sorted({1, 8, rows}):
            x = rng.randn(m, k).astype(np.float32)
            x_j, x_t = jnp.asarray(x), torch.from_numpy(x)
            t_agq, t_hf = best_of_pair(lambda: _matmul(x_j, w_j).block_until_ready(), lambda: x_t @ w_t,
                                       max(repeats, 20))  # microseconds each: more calls for a stable best
            out.append((f"gemm {name}", m, 2 * m * k * n, t_agq, t_hf))
    return out


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
    ap.add_argument("--no-gemm", action="store_true", help="skip the single-matmul reference rows")
    ap.add_argument("--no-split", action="store_true",
                    help="pass the stacked weights (scanned layers) even on CPU: the path before the split")
    args = ap.parse_args()
    global SPLIT
    SPLIT = SPLIT and not args.no_split
    load0 = round(os.getloadavg()[0], 2)
    if torch.get_num_threads() != len(os.sched_getaffinity(0)):
        print(f"note: torch uses {torch.get_num_threads()} threads, XLA:CPU {len(os.sched_getaffinity(0))}")

    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build(args, tmp)
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

        weights = inference_state(ours)
        graphdef, state = weights
        t_agq, t_hf = best_of_pair(lambda: _forward(graphdef, state, ids_j).block_until_ready(), hf_fwd,
                                   args.repeats)
        rows.append(("prefill", batch, batch * args.prompt_len, t_agq, t_hf))

        def hf_gen():
            with torch.no_grad():
                return hf.generate(ids_t, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False)[:, args.prompt_len:].numpy()

        assert (agq_generate(ours, ids_j, args.new_tokens, weights) == hf_gen()).mean() > 0.9  # same greedy tokens
        t_agq, t_hf = best_of_pair(lambda: agq_generate(ours, ids_j, args.new_tokens, weights), hf_gen, args.repeats)
        rows.append(("decode", batch, batch * args.new_tokens, t_agq, t_hf))
    gemms = [] if args.no_gemm else gemm_rows(args, args.repeats)

    model = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "moe": args.moe,
             "moe_impl": args.moe_impl if args.moe else None,
             "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    env = dict(cpu_info(), load_avg_1m_start=load0)
    for phase, batch, tokens, t_agq, t_hf in rows:
        a, r = tokens / min(t_agq), tokens / min(t_hf)
        print(json.dumps({"bench": "model_cpu", "phase": phase, "batch": batch, "agq_tok_s": round(a, 1),
                          "transformers_tok_s": round(r, 1), "ratio": round(a / r, 3),
                          "ratio_of_medians": round(float(np.median(t_hf) / np.median(t_agq)), 3),
                          "agq_median_over_best": round(float(np.median(t_agq) / min(t_agq)), 3),
                          "transformers_median_over_best": round(float(np.median(t_hf) / min(t_hf)), 3),
                          "repeats": len(t_agq), "split_layer_weights": SPLIT, **model, **env}))
    for name, m, flops, t_agq, t_hf in gemms:
        print(json.dumps({"bench": "model_cpu", "phase": name, "rows": m, "flops": flops,
                          "agq_us": round(min(t_agq) * 1e6, 2), "transformers_us": round(min(t_hf) * 1e6, 2),
                          "agq_gflop_s": round(flops / min(t_agq) / 1e9, 3),
                          "transformers_gflop_s": round(flops / min(t_hf) / 1e9, 3),
                          "ratio": round(min(t_hf) / min(t_agq), 3), "repeats": len(t_agq), **model, **env}))
    print(f"\n{env['cpu']} ({env['cpus']} cpus; threads xla {env['xla_threads']} / torch {env['torch_threads']}; "
          f"load {env['load_avg_1m_start']} -> {env['load_avg_1m']}; sched {env['sched']}, nice {env['nice']})"
          f"\nISA: {env['isa']}{'' if env['amx'] else ' (no AMX)'}\njax {env['jax_version']}, torch "
          f"{env['torch_version']} ({env['torch_blas']}), transformers {env['transformers_version']}"
          f"{'; XLA_FLAGS ' + env['xla_flags'] if env['xla_flags'] else ''}")
    if env["sched"] == "other" and load0 > 0.5:  # the load before our own threads ran
        print(LOADED_WARNING.format(load=load0, cpus=env["cpus"], sched=env["sched"]))
    print(f"\n{'phase':<8} {'batch':>5} {'agq_jax tok/s':>14} {'transformers tok/s':>19} {'ratio':>6} "
          f"{'ratio of medians':>17} {'spread agq / hf':>16}")
    for phase, batch, tokens, t_agq, t_hf in rows:
        a, r = tokens / min(t_agq), tokens / min(t_hf)
        spread = f"{np.median(t_agq) / min(t_agq):.2f} / {np.median(t_hf) / min(t_hf):.2f}"
        print(f"{phase:<8} {batch:>5} {a:>14.1f} {r:>19.1f} {a / r:>6.2f} "
              f"{np.median(t_hf) / np.median(t_agq):>17.2f} {spread:>16}")
    if gemms:
        print(f"\n{'one fp32 matmul':<16} {'rows':>5} {'XLA:CPU GFLOP/s':>16} {'torch GFLOP/s':>14} {'ratio':>6}")
        for name, m, flops, t_agq, t_hf in gemms:
            print(f"{name:<16} {m:>5} {flops / min(t_agq) / 1e9:>16.1f} {flops / min(t_hf) / 1e9:>14.1f} "
                  f"{min(t_hf) / min(t_agq):>6.2f}")


if __name__ == "__main__":
    main()
