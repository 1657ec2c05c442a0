"""`make aot`: compile every TPU layout of the given config files, one after another, and print the table
docs/launch.md shows (markdown). Exits 1 when any program of any layout does not fit.

    JAX_PLATFORMS=cpu .venv-tpu/bin/python -m agq_jax.aot.sweep configs/8b.py configs/30b_a3b.py
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

GiB = 2**30


def tpu_layouts(path: str) -> list[str]:
    """Names of the config file's layouts that name a TPU topology."""
    spec = importlib.util.spec_from_file_location(f"agq_jax_aot_{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [name for name, lay in module.MESH_LAYOUTS.items() if getattr(lay, "topology", "")]


def markdown(results: list[dict]) -> str:
    head = ("| config:layout | slice | program | per device: args / temps / out (+ resident) | peak of HBM | "
            "TFLOP / device | FLOPs / 6ND | collective GB | roofline | bound | MFU bound (6ND only) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for r in results:
        for name, p in r["programs"].items():
            if "error" in p:
                rows.append(f"| {r['config']}:{r['layout']} | {r['topology']} | {name} | does not compile: "
                            f"{p['error'][:80]} | | | | | | | |")
                continue
            mem = (f"{p['arguments'] / GiB:.1f} / {p['temporaries'] / GiB:.1f} / {p['outputs'] / GiB:.1f}"
                   + (f" (+{p['resident_bytes'] / GiB:.1f})" if p["resident_bytes"] else ""))
            sampler = name in ("prefill", "decode")
            where = (f"{r['group_topology']} group" if sampler and r["group_topology"] != r["topology"]
                     else r["topology"])
            if sampler:  # one rollout group's program at the per-host decode batch
                name = f"{name} ({r['decode_batch']}/host)"
            ratio = f"{p['flops_ratio']:.2f}" if p["model_flops"] else "-"
            mfu = f"{p['mfu']:.0%} ({p['mfu_params']:.0%})" if p["model_flops"] else "-"
            rows.append(f"| {r['config']}:{r['layout']} | {where} | {name} | {mem} | "
                        f"{p['total_bytes'] / GiB:.1f} GiB ({p['total_bytes'] / r['hbm_bytes']:.0%})"
                        f"{'' if p['fits'] else ' **no**'} | {p['flops'] / 1e12:.2f} | {ratio} | "
                        f"{p['collective_bytes'] / 1e9:.2f} | {p['time_s'] * 1e3:.0f} ms | "
                        f"{p['bound'].replace('_s', '')} | {mfu} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--cache_dir", default="runs/aot")
    ap.add_argument("--json_out", default="runs/aot/sweep.json")
    args = ap.parse_args(argv)
    from agq_jax.aot.__main__ import format_result, run

    results = []
    for path in args.configs:
        for layout in tpu_layouts(path):
            r = run(f"{path}:{layout}", cache_dir=args.cache_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
            print(format_result(r), flush=True)
            results.append(r)
    print()
    print(markdown(results))
    if args.json_out:
        pathlib.Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json_out).write_text(json.dumps(results, indent=1, default=float))
    return 0 if all(r["fits"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
