"""Where a phase spends its time: a `jax.profiler` trace of sampler prefill, sampler decode or a GRPO train step,
reduced to the ops with the most self time (time inside an op minus the ops nested in it, e.g. a `while`
minus its body), so a missed target in docs/performance.md can point at the ops that explain it.

Device ops only: on GPU/TPU the kernels of the `/device:*` trace processes; on CPU the XLA ops that the
runtime's worker threads ran (HLO instruction names such as `ynn_fusion.2`, `dynamic-slice_bitcast_fusion`,
`while.4`). Python and runtime wrappers are left out. `kind` strips the instance number, so all dynamic-slice
copies add up in one row of the second table. The raw trace stays in --trace-dir for Perfetto / TensorBoard.

Prints one JSON line per op (top --top) and per kind, then two tables.
Usage: python benchmarks/profile_ops.py --phase decode [--moe] [--batch 8] [--preset Qwen3-1.7B --layers 4
       --dtype bfloat16] [--steps 5] [--trace-dir /tmp/agq_profile]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agq_jax.models import qwen3
from agq_jax.rollout.sampler import Sampler, SamplingParams

SMALL = dict(vocab_size=32768, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64)
SMALL_MOE = dict(SMALL, model_type="qwen3_moe", num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                 norm_topk_prob=True, moe_impl="tiled")
_WRAPPER = re.compile(r"^\$|::|\(|^ParseArguments$|^Thunk")


def _is_device_op(name: str, process: str) -> bool:
    if process.startswith("/device:"):
        return True  # GPU / TPU kernels
    return process.startswith("/host:CPU") and not _WRAPPER.search(name)


def op_self_times(trace_dir: str) -> dict[str, float]:
    """Self time (µs) per op name summed over the whole trace in `trace_dir` (the newest perfetto trace)."""
    paths = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and _is_device_op(e["name"], processes.get(e.get("pid"), "")):
            by_thread[(e["pid"], e.get("tid"))].append(e)
    total = collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[list] = []  # [end, name, self]
        for e in evs:
            start, dur = e["ts"], e.get("dur", 0)
            while stack and stack[-1][0] <= start:
                _, name, own = stack.pop()
                total[name] += own
            if stack:
                stack[-1][2] -= dur  # nested: not the parent's own time
            stack.append([start + dur, e["name"], dur])
        for _, name, own in stack:
            total[name] += own
    return dict(total)


def _model(args):
    if args.preset:
        cfg = qwen3.PRESETS[args.preset]
    else:
        cfg = qwen3.Qwen3Config(**(SMALL_MOE if args.moe else SMALL))
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    if args.moe_impl and cfg.is_moe:
        cfg = dataclasses.replace(cfg, moe_impl=args.moe_impl)
    dt = jnp.dtype(args.dtype)
    return cfg, qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt)


def phase_fn(args):
    """A zero-argument callable that runs the phase once and blocks on its result."""
    cfg, model = _model(args)
    rng = np.random.default_rng(0)
    if args.phase == "train":
        from agq_jax.rl.optim import OptimConfig
        from agq_jax.rl.step import LossConfig, StepConfig, Trainer
        b, t = args.batch, args.seq
        ids = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones((b, t), np.int32),
                 "loss_mask": (np.arange(t)[None] >= t // 4).repeat(b, 0).astype(np.float32),
                 "advantages": rng.normal(size=b).astype(np.float32)}
        tr = Trainer(model, OptimConfig(learning_rate=1e-5), LossConfig(logprob_chunk=128), StepConfig())
        lp, _ = tr.compute_logprobs(batch)
        batch["old_logprobs"] = lp * batch["loss_mask"]
        return lambda: jax.block_until_ready(tr.train_batch(batch))
    sampler = Sampler(model, pad_id=0, chunk_size=args.seq)
    state = nnx.state(model)
    prompts = rng.integers(1, cfg.vocab_size, (args.batch, args.seq)).tolist()
    max_len = args.seq + args.new_tokens

    def prefill():
        return jax.block_until_ready(sampler.append(state, sampler.init_cache(args.batch, max_len), prompts))
    if args.phase == "prefill":
        return prefill
    cache0, logits0 = prefill()
    params = SamplingParams(temperature=args.temperature, stop_ids=())

    def decode():
        cache = jax.tree.map(jnp.copy, cache0)  # decode donates its cache
        out = sampler.decode(state, cache, logits0, jax.random.key(0), params=params, max_new_tokens=args.new_tokens)
        return jax.block_until_ready(out.tokens)
    return decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=["prefill", "decode", "train"], default="decode")
    ap.add_argument("--moe", action="store_true", help="the small MoE shape (16 experts, top-4, tiled)")
    ap.add_argument("--preset", default=None, help="a qwen3.PRESETS name instead of the small shape")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--moe-impl", default=None, choices=["tiled", "ragged", "dense"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128, help="prompt length (prefill/decode) or train sequence length")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0, help="decode sampling temperature (0 = greedy)")
    ap.add_argument("--steps", type=int, default=3, help="profiled calls (after one warm-up call)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--trace-dir", default=None)
    args = ap.parse_args()

    fn = phase_fn(args)
    fn()  # compile + warm up outside the trace
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="agq_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            fn()
    ops = op_self_times(trace_dir)
    total = sum(ops.values()) or 1.0
    kinds = collections.Counter()
    for name, us in ops.items():
        kinds[re.sub(r"\.\d+$", "", name)] += us
    meta = {"phase": args.phase, "model": args.preset or ("small-moe" if args.moe else "small"),
            "temperature": args.temperature if args.phase == "decode" else None,
            "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "device": jax.devices()[0].device_kind,
            "trace_dir": trace_dir}
    top_ops = sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]
    top_kinds = kinds.most_common(args.top)
    for what, rows in (("op", top_ops), ("kind", top_kinds)):
        for name, us in rows:
            print(json.dumps({"bench": "profile", what: name, "ms_per_call": round(us / 1e3 / args.steps, 3),
                              "share": round(us / total, 4), **meta}))
    print(f"\n{args.phase}: {total / 1e3 / args.steps:.2f} ms of device-op time per call ({meta['model']}, "
          f"batch {args.batch}, {args.dtype}, {meta['device']}); trace in {trace_dir}")
    for title, rows in (("op", top_ops), ("kind", top_kinds)):
        print(f"\n{title:<44} {'ms/call':>9} {'share':>7}")
        for name, us in rows:
            print(f"{name[:44]:<44} {us / 1e3 / args.steps:>9.3f} {us / total:>7.1%}")


if __name__ == "__main__":
    main()
