"""Compile a config's TPU programs from a CPU host and check that they fit the slice.

    JAX_PLATFORMS=cpu .venv-tpu/bin/python -m agq_jax.aot --config=configs/30b_a3b.py:v5p-64 [--config.F=V ...]
    make aot                                   # every TPU layout of the shipped configs

Needs libtpu (`make aot` builds .venv-tpu: .venv plus libtpu). The slice's devices come from
`jax.experimental.topologies.get_topology_desc` with the layout's `topology`; nothing runs on a TPU. Prints,
per program, per-device memory against HBM, FLOPs, collective bytes, a roofline time and the MFU it implies;
exits 1 when a program does not fit. Results are cached as JSON under --cache_dir, keyed by everything that
changes them (config values, mesh, the source of agq_jax, jax and libtpu versions).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
GiB = 2**30


def _source_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((REPO / "agq_jax").rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cache_key(rc, topology: str, programs) -> str:
    from importlib.metadata import PackageNotFoundError, version

    import jax

    try:
        tpu = version("libtpu")
    except PackageNotFoundError:
        tpu = "none"
    blob = json.dumps([repr(rc), topology, list(programs), _source_digest(), jax.__version__, tpu])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run(spec: str, overrides=(), programs=("train", "logprobs", "reshard", "prefill", "decode"),
        cache_dir: str = "", log=print, rc=None, topology: str | None = None) -> dict:
    """Figures of one "configs/NAME.py:LAYOUT" spec, cached or compiled; `rc` / `topology` replace the spec's
    RunConfig / its layout's topology (tests: a small model on a small slice)."""
    from agq_jax.aot import layouts
    from agq_jax.run_config import load

    rc = rc if rc is not None else load(spec, overrides)
    topology = layouts.topology_of(spec) if topology is None else topology
    path = hlo_dir = None
    if cache_dir:
        path = pathlib.Path(cache_dir) / f"{rc.name}_{rc.mesh.layout}_{cache_key(rc, topology, programs)}.json"
        if path.is_file():
            return json.loads(path.read_text())
        hlo_dir = str(path.with_suffix(""))  # the optimized HLO of each program beside its figures
        os.makedirs(hlo_dir, exist_ok=True)
    result = layouts.compile_config(rc, topology, programs=programs, log=log, hlo_dir=hlo_dir)
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float))
        os.replace(tmp, path)
    return result


def format_result(r: dict) -> str:
    lines = [f"{r['config']}:{r['layout']}  {r['topology']} ({r['devices']} x {r['chip']}, {r['processes']} hosts), "
             f"mesh {r['mesh']}, rollouts per host {r['host_rows']} in {r['decode_rounds']} batch(es) of "
             f"{r['decode_batch']}; train state {r['train_state_bytes'] / GiB:.1f} GiB/device",
             f"  {'program':<9} {'args':>8} {'temps':>8} {'outputs':>8} {'+resident':>9} {'total':>8} {'of HBM':>7} "
             f"{'TFLOP':>9} {'coll GB':>8} {'roofline':>10} {'bound':>10} {'MFU':>6}  fits"]
    for name, p in r["programs"].items():
        if "error" in p:
            lines.append(f"  {name:<9} does not compile: {p['error']}")
            continue
        lines.append(
            f"  {name:<9} {p['arguments'] / GiB:8.2f} {p['temporaries'] / GiB:8.2f} {p['outputs'] / GiB:8.2f} "
            f"{p['resident_bytes'] / GiB:9.2f} {p['total_bytes'] / GiB:8.2f} {p['total_bytes'] / r['hbm_bytes']:7.0%} "
            f"{p['flops'] / 1e12:9.3f} {p['collective_bytes'] / 1e9:8.2f} {p['time_s'] * 1e3:8.1f}ms "
            f"{p['bound'].replace('_s', ''):>10} {p['mfu']:6.1%}  {'yes' if p['fits'] else 'NO'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="configs/NAME.py:LAYOUT (a TPU layout); --config.F=V overrides")
    ap.add_argument("--cache_dir", default="runs/aot", help="cached figures (JSON); '' disables the cache")
    ap.add_argument("--json_out", default="", help="also write the figures to this file")
    ap.add_argument("--programs", default="train,logprobs,reshard,prefill,decode")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        ap.error(f"unknown arguments {bad}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    result = run(args.config, overrides, tuple(args.programs.split(",")), args.cache_dir,
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_result(result), flush=True)
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(result, indent=1, default=float))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
