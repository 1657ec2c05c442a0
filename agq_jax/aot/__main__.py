"""Compile a config's TPU programs from a CPU host and check that they fit the slice.

    JAX_PLATFORMS=cpu .venv-tpu/bin/python -m agq_jax.aot --config=configs/30b_a3b.py:v5p-64 [--config.F=V ...]
    ... -m agq_jax.aot --config=configs/8b.py:v6e-32 --fit_decode_batch     # the largest rollout batch that fits
    make aot                                   # every TPU layout of the shipped configs

Needs libtpu (`make aot` builds .venv-tpu: .venv plus libtpu). The slice's devices come from
`jax.experimental.topologies.get_topology_desc` with the layout's `topology`; nothing runs on a TPU. Prints,
per program, per-device memory against HBM, FLOPs, collective bytes, a roofline time and the MFU it implies;
exits 1 when a program does not fit. Each program's figures are cached as JSON under --cache_dir/programs,
keyed by its lowered module, the devices, jax / libtpu versions and the accounting code (so a rerun lowers
every program, seconds, and compiles only what changed).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

GiB = 2**30


def run(spec: str, overrides=(), programs=("train", "logprobs", "reshard", "prefill", "decode"),
        cache_dir: str = "", log=print, rc=None, topology: str | None = None) -> dict:
    """Figures of one "configs/NAME.py:LAYOUT" spec; `rc` / `topology` replace the spec's RunConfig / its
    layout's topology (tests: a small model on a small slice). Every program is lowered (seconds); with
    `cache_dir` one whose lowered module, devices, compiler and accounting were compiled before is not
    compiled again (`programs.program_key`)."""
    from agq_jax.aot import layouts
    from agq_jax.run_config import load

    rc = rc if rc is not None else load(spec, overrides)
    topology = layouts.topology_of(spec) if topology is None else topology
    return layouts.compile_config(rc, topology, programs=programs, log=log, cache_dir=cache_dir or None)


def format_result(r: dict, top: int = 0) -> str:
    """The figures of `run` as a table; with `top`, each program's kernels with the most HBM bytes below it."""
    group = (f"rollout groups of {r['group_hosts']} hosts ({r['group_topology']})" if r["group_hosts"] > 1
             else f"rollouts on each host ({r['group_topology']})")
    lines = [f"{r['config']}:{r['layout']}  {r['topology']} ({r['devices']} x {r['chip']}, {r['processes']} hosts), "
             f"mesh {r['mesh']}, {group} mesh {r['group_mesh']}, rollouts per host {r['host_rows']} in "
             f"{r['decode_rounds']} batch(es) of {r['decode_batch']}; train state "
             f"{r['train_state_bytes'] / GiB:.1f} GiB/device",
             f"  {'program':<9} {'args':>8} {'temps':>8} {'outputs':>8} {'+resident':>9} {'total':>8} {'of HBM':>7} "
             f"{'TFLOP':>9} {'coll GB':>8} {'roofline':>10} {'bound':>10} {'MFU':>6} {'6ND':>6}  fits"]
    for name, p in r["programs"].items():
        if "error" in p:
            lines.append(f"  {name:<9} does not compile: {p['error']}")
            continue
        lines.append(
            f"  {name:<9} {p['arguments'] / GiB:8.2f} {p['temporaries'] / GiB:8.2f} {p['outputs'] / GiB:8.2f} "
            f"{p['resident_bytes'] / GiB:9.2f} {p['total_bytes'] / GiB:8.2f} {p['total_bytes'] / r['hbm_bytes']:7.0%} "
            f"{p['flops'] / 1e12:9.3f} {p['collective_bytes'] / 1e9:8.2f} {p['time_s'] * 1e3:8.1f}ms "
            f"{p['bound'].replace('_s', ''):>10} {p['mfu']:6.1%} {p['mfu_params']:6.1%}  "
            f"{'yes' if p['fits'] else 'NO'}")
        for k in p.get("top_kernels", [])[:top]:
            lines.append(f"      {k['bytes'] / p['hbm_bytes']:6.1%} of HBM bytes "
                         f"{k['flops'] / max(p['flops'], 1):6.1%} of FLOPs  {k['opcode']} {k['name']} {k['shape']} "
                         f"x{k['times']:.0f}")
    return "\n".join(lines)


def fit_decode_batch(spec: str, overrides=(), cache_dir: str = "", log=print) -> tuple[int, list[dict]]:
    """The largest per-host decode batch whose prefill and decode fit with the train state resident: from the
    config's `rollout.decode_batch_size` (all of a host's rows when 0), doubling while it fits (up to all of
    a host's rows), halving while it does not. Returns (that batch or 0 when none fits, the results tried)."""
    from agq_jax.run_config import load

    def at(n):
        r = run(spec, [*overrides, f"--config.rollout.decode_batch_size={n}"], ("prefill", "decode"), cache_dir,
                log=log)
        tried.append(r)
        log(f"decode batch {r['decode_batch']} per host: " + ", ".join(
            f"{k} {p['total_bytes'] / GiB:.1f} GiB" if "error" not in p else f"{k} does not compile"
            for k, p in r["programs"].items()) + ("" if r["fits"] else "  (does not fit)"))
        return r

    tried: list[dict] = []
    r = at(load(spec, overrides).rollout.decode_batch_size)
    n, best = r["decode_batch"], r["decode_batch"] if r["fits"] else 0
    if r["fits"]:
        while n < r["host_rows"]:
            n = min(2 * n, r["host_rows"])
            if not at(n)["fits"]:
                break
            best = tried[-1]["decode_batch"]
    else:
        while n > 1 and not best:
            n //= 2
            if at(n)["fits"]:
                best = tried[-1]["decode_batch"]
    return best, tried


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="configs/NAME.py:LAYOUT (a TPU layout); --config.F=V overrides")
    ap.add_argument("--cache_dir", default="runs/aot", help="cached figures (JSON); '' disables the cache")
    ap.add_argument("--json_out", default="", help="also write the figures to this file")
    ap.add_argument("--programs", default="train,logprobs,reshard,prefill,decode")
    ap.add_argument("--top", type=int, default=0, help="also print each program's N kernels with the most HBM "
                    "bytes (loop-aware; up to 10)")
    ap.add_argument("--fit_decode_batch", action="store_true",
                    help="search the largest per-host rollout.decode_batch_size whose prefill and decode fit")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        ap.error(f"unknown arguments {bad}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.fit_decode_batch:
        best, tried = fit_decode_batch(args.config, overrides, args.cache_dir,
                                       log=lambda m: print(m, file=sys.stderr, flush=True))
        for r in tried:
            print(format_result(r), flush=True)
        print(f"largest decode batch that fits: {best} rows per host (of {tried[0]['host_rows']})", flush=True)
        return 0 if best else 1
    result = run(args.config, overrides, tuple(args.programs.split(",")), args.cache_dir,
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_result(result, args.top), flush=True)
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(result, indent=1, default=float))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
