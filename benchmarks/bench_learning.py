"""Learning benchmark: N seeds x arms of the tiny flywheel (configs/tiny.py), held-out metrics as mean ± std.

Not a speed benchmark: it answers "does the recipe learn, on any machine?" with a spread over seeds, and
"does each ingredient help?" with paired differences (same seed = same init, SFT data, held-out tasks and
evaluation samples). Every run goes through the training CLI (`python -m agq_jax.train`).

Arms (each a run of the whole flywheel; runs that are equal up to a point share that prefix):
  sft                SFT only (the evaluation right after SFT)
  grpo               SFT + 2 GRPO rounds, success reward, flywheel expansion: failed tasks -> harder variants
  fresh              as grpo, but round 1 gets as many fresh procedural tasks of the same difficulty (random
                     domain / branch type) instead of the failures' variants: does the flywheel itself help?
  rubric             as grpo with the rubric's partial credit as the reward (rl.reward=rubric)
  success_or_rubric  as grpo with partial credit only in groups where no sample succeeded (the lever for
                     branch types GRPO cannot lift: all-failure groups otherwise carry no signal)
  placebo            as grpo, but each sample is paid the success of another sample of its group
                     (rl.reward=success_placebo): the same updates' sizes without their information (in
                     expectation -1/(G-1) of it), so GRPO - placebo is about what the reward taught and
                     placebo - SFT what updating alone does
Sharing: one SFT run per (seed, attention_impl) -> its checkpoint is copied into every arm; grpo and fresh
also share round 0 (they differ only in the data of round 1).

Resumable: every node writes <out>/<impl>/s<seed>/<node>/bench_done.json when it finishes; a rerun skips
finished nodes and resumes a killed one from its checkpoints (the driver resumes exactly).

Output: one JSON line per (attention, arm, round, group, metric) mean/std/n, paired differences, then tables;
--summary FILE writes everything as one JSON (docs/learning_benchmark.json is the committed one); --prior FILE
takes the per-seed values of an earlier summary for seeds whose runs are not under --out. The summary records
the recipe the runs resolved to (their config.json, less the benchmark's own variables); a report whose runs
(or prior) disagree on it stops naming the file and the keys, and a test holds the committed summary to
configs/tiny.py: the spread `make demo` prints is the spread of the recipe it runs.

Usage: nice -n 10 python benchmarks/bench_learning.py --seeds 0 1 2 3 4 --attention auto xla [--out runs/learning]
       python benchmarks/bench_learning.py --small --seeds 0 1 --out /tmp/lb   # a few-step version (tests)
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARMS = ("sft", "grpo", "fresh", "rubric", "success_or_rubric", "placebo")
# node -> (parent node, config overrides, where it stops: "sft" | "round0" | None = the end)
NODES = {
    "sft": (None, {}, "sft"),
    "grpo_r0": ("sft", {}, "round0"),
    "grpo": ("grpo_r0", {}, None),
    "fresh": ("grpo_r0", {"synth.agentic.expansion": "fresh"}, None),
    "rubric": ("sft", {"rl.reward": "rubric"}, None),
    "success_or_rubric": ("sft", {"rl.reward": "success_or_rubric"}, None),
    "placebo": ("sft", {"rl.reward": "success_placebo"}, None),
}
# A few-step version of configs/tiny.py (the same shrink as `AGQ_DEMO_SMALL=1 make demo`): checks the machinery.
SMALL = {"sft.steps": 2, "sft.batch_size": 2, "rl.steps_per_round": 1, "rl.tasks_per_step": 2, "rl.group_size": 2,
         "rl.mini_batch_tasks": 2, "data.heldout_tasks": 5, "eval.k": 2, "eval.batch_size": 4,
         "rollout.max_new_tokens_per_turn": 12, "env.max_agent_turns": 3,
         "synth.agentic.num_procedural": 4, "synth.agentic.procedural_per_round": 1,
         "model.overrides.hidden_size": 32, "model.overrides.intermediate_size": 64,
         "model.overrides.num_hidden_layers": 1, "model.overrides.num_attention_heads": 2,
         "model.overrides.num_key_value_heads": 1, "checkpoint.every_steps": 1}
HEADLINE = ("greedy_pass@1", "reward_mean", "pass@1", "pass@4", "pass^4")
BRANCHES = ("legal", "refusal", "transfer", "clarification", "confirmation")
ROUND_NAMES = {"round0_sft": "SFT", "round0": "round 0", "round1": "round 1"}
# Keys of a run's resolved config.json that are not the recipe: bookkeeping, and the benchmark's own variables
# (the seed, the kernel, what the arms change). An SFT-only node is held only to what SFT reads.
NOT_RECIPE = ("run_dir", "seed", "verbose", "name", "model.attention_impl", "checkpoint", "export", "smoke",
              *sorted({k for _, extra, _ in NODES.values() for k in extra}))
SFT_SECTIONS = ("sft", "model", "tokenizer", "data", "eval", "rollout", "env")


def load_config(overrides: dict):
    """configs/tiny.py with the overrides applied (to know the step counts the stop points depend on)."""
    sys.path.insert(0, str(ROOT))
    from agq_jax.demo import load_config as load

    cfg = load(ROOT / "configs" / "tiny.py")
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = cfg
        for p in path:
            node = node[p]
        node[leaf] = value
    return cfg


def stop_step(cfg, where: str | None) -> int:
    """Global step after which the driver stops: SFT steps + the post-SFT unit [+ round-0 GRPO steps + unit]."""
    if where is None:
        return -1
    n = int(cfg.sft.steps) + 1
    return n if where == "sft" else n + int(cfg.rl.steps_per_round) + 1


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def recipe(config: dict) -> dict:
    """{dotted key: value} of a resolved run config (config.json) that the figures depend on."""
    return {k: v for k, v in _flat(config).items() if not _under(k, NOT_RECIPE)}


def recipe_diff(a: dict, b: dict, node: str) -> list[str]:
    """Keys on which a node's recipe disagrees with a reference one."""
    keys = a.keys() | b.keys()
    if node == "sft":
        keys = {k for k in keys if _under(k, SFT_SECTIONS)}
    return sorted(k for k in keys if a.get(k, "<unset>") != b.get(k, "<unset>"))


def check_recipes(recipes: list, prior: dict | None = None) -> dict:
    """One recipe across the report's runs ([(config.json path, node, recipe)]) and its --prior summary."""
    full = [r for r in recipes if r[1] != "sft"] or recipes
    if not full:
        return (prior or {}).get("recipe", {})
    ref_path, ref_node, ref = full[0]
    for path, node, rec in recipes:
        diff = recipe_diff(rec, ref, node)
        if diff:
            raise SystemExit(f"{path}: the run's recipe differs from {ref_path} in {', '.join(diff[:8])}"
                             f"{' ...' if len(diff) > 8 else ''}: one report, one recipe")
    if prior and prior.get("recipe"):
        diff = recipe_diff(prior["recipe"], ref, ref_node)  # only SFT's keys if these runs are SFT only
        if diff:
            raise SystemExit(f"--prior summary: its recipe differs from {ref_path} in {', '.join(diff[:8])}")
        if ref_node == "sft":
            return prior["recipe"]
    return ref


def _children_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_node(out: pathlib.Path, impl: str, seed: int, node: str, base: dict, log) -> dict:
    """Run (or skip, or resume) one node; returns its bench_done.json record."""
    ndir = out / impl / f"s{seed}" / node
    done = ndir / "bench_done.json"
    if done.is_file():
        return json.loads(done.read_text())
    parent, extra, where = NODES[node]
    if parent is not None:
        run_node(out, impl, seed, parent, base, log)
        if not (ndir / "checkpoints").is_dir():
            if ndir.exists():
                shutil.rmtree(ndir)
            shutil.copytree(out / impl / f"s{seed}" / parent, ndir,
                            ignore=shutil.ignore_patterns("bench_done.json", "tensorboard", "export", "*.log"))
    overrides = {**base, "seed": seed, "model.attention_impl": impl, **extra, "run_dir": str(ndir),
                 "verbose": False}
    cfg = load_config({k: v for k, v in overrides.items() if k not in ("run_dir",)})
    cmd = [sys.executable, "-m", "agq_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--stop_after={stop_step(cfg, where)}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "jax_cache"))  # later processes skip the compiles
    ndir.mkdir(parents=True, exist_ok=True)
    log(f"[{impl} s{seed} {node}] {' '.join(cmd[2:])}")
    t0, cpu0 = time.time(), _children_cpu_s()
    with open(ndir / "train.log", "a") as f:
        rc = subprocess.call(cmd, cwd=str(ROOT), env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"{ndir}: training exited with {rc}; see {ndir / 'train.log'}")
    evals = {}
    with open(ndir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if rec["kind"] == "eval":
                evals[rec["tag"]] = rec["metrics"]
    rec = {"impl": impl, "seed": seed, "node": node, "overrides": overrides, "evals": evals,
           "wall_s": time.time() - t0,  # this node only (its parents' time is in their records)
           "cpu_s": _children_cpu_s() - cpu0}  # CPU seconds (user + sys): the cost on a shared, loaded host
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True))
    os.replace(tmp, done)
    return rec


def node_walls(out: pathlib.Path, args) -> dict:
    """Wall and CPU seconds of every finished node (the cost of the benchmark, and of one demo-sized run)."""
    walls = {}
    for p in sorted(out.glob("*/s*/*/bench_done.json")):
        rec = json.loads(p.read_text())
        if rec["seed"] in args.seeds:
            walls.setdefault(f"{rec['impl']}/{rec['node']}", []).append(
                {"wall_s": round(rec["wall_s"], 1), "cpu_s": round(rec.get("cpu_s", float("nan")), 1)})
    return walls


def arm_evals(rec: dict, arm: str) -> dict:
    """{round tag: flat eval metrics} of an arm (the SFT-only arm keeps only the post-SFT evaluation)."""
    ev = rec["evals"]
    return {"round0_sft": ev["round0_sft"]} if arm == "sft" else ev


def _stats(vals: list[float]) -> dict:
    a = np.asarray(vals, np.float64)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {"mean": float(a.mean()), "std": std, "se": std / np.sqrt(len(a)), "n": len(a),
            "min": float(a.min()), "max": float(a.max()), "values": [round(float(v), 4) for v in a]}


def aggregate(results: dict) -> dict:
    """results[(impl, arm)][seed] = {tag: flat metrics} -> per metric mean / std / n over seeds."""
    out = {}
    for (impl, arm), by_seed in results.items():
        keys = set.intersection(*[{(t, k) for t, m in ev.items() for k in m} for ev in by_seed.values()])
        for tag, key in sorted(keys):
            if not key.startswith("eval/") or "/termination/" in key:
                continue
            out.setdefault(impl, {}).setdefault(arm, {}).setdefault(tag, {})[key[5:]] = _stats(
                [ev[tag][key] for ev in by_seed.values()])
    return out


def paired(results: dict, impl: str, a: str, b: str, key: str, tag_a: str = "round1", tag_b: str = "round1",
           impl_b: str | None = None):
    """Per-seed difference arm a - arm b of one metric (same seeds only); b under attention `impl_b` if given.
    Also how many differences are > 0 and t = mean / se (None from one seed)."""
    A, B = results.get((impl, a), {}), results.get((impl_b or impl, b), {})
    seeds = sorted(set(A) & set(B))
    # each side at the 4 digits a --prior summary keeps: a report mixing run directories and a prior
    # gives the same differences (an exact tie stays 0, not a 3e-5 "gain")
    d = [round(A[s][tag_a][f"eval/{key}"], 4) - round(B[s][tag_b][f"eval/{key}"], 4) for s in seeds
         if tag_a in A[s] and tag_b in B[s] and f"eval/{key}" in A[s][tag_a] and f"eval/{key}" in B[s][tag_b]]
    if not d:
        return None
    st = _stats(d)
    if len(d) < 2:
        t = None
    elif st["se"] > 1e-9:  # not float residue: equal differences (0.0167 - 0.0 in every seed) give se ~1e-17
        t = st["mean"] / st["se"]
    else:
        t = 0.0 if abs(st["mean"]) < 1e-9 else float(np.copysign(np.inf, st["mean"]))
    st.update(positive=int(sum(x > 0 for x in d)), t=t)
    return st


COMPARISONS = [  # (name, arm a, tag a, arm b, tag b, metric)
    ("GRPO - SFT", "grpo", "round1", "sft", "round0_sft", "all/pass@1"),
    ("GRPO - SFT", "grpo", "round1", "sft", "round0_sft", "all/greedy_pass@1"),
    ("GRPO - SFT", "grpo", "round1", "sft", "round0_sft", "all/pass^4"),
    ("flywheel - fresh", "grpo", "round1", "fresh", "round1", "all/pass@1"),
    ("flywheel - fresh", "grpo", "round1", "fresh", "round1", "all/greedy_pass@1"),
    ("success - rubric", "grpo", "round1", "rubric", "round1", "all/pass@1"),
    ("success - rubric", "grpo", "round1", "rubric", "round1", "all/greedy_pass@1"),
    ("lever - grpo", "success_or_rubric", "round1", "grpo", "round1", "branch/clarification/pass@1"),
    ("lever - grpo", "success_or_rubric", "round1", "grpo", "round1", "branch/clarification/greedy_pass@1"),
    ("lever - grpo", "success_or_rubric", "round1", "grpo", "round1", "all/pass@1"),
    ("lever - SFT", "success_or_rubric", "round1", "sft", "round0_sft", "branch/clarification/pass@1"),
    ("GRPO - placebo", "grpo", "round1", "placebo", "round1", "all/pass@1"),
    ("GRPO - placebo", "grpo", "round1", "placebo", "round1", "all/greedy_pass@1"),
    ("placebo - SFT", "placebo", "round1", "sft", "round0_sft", "all/pass@1"),
    ("placebo - SFT", "placebo", "round1", "sft", "round0_sft", "all/greedy_pass@1"),
]


def comparisons(results: dict, impls) -> list[dict]:
    rows = []
    for impl in impls:
        for name, a, ta, b, tb, key in COMPARISONS:
            st = paired(results, impl, a, b, key, ta, tb)
            if st is not None:
                rows.append({"attention": impl, "comparison": name, "metric": key, **st})
    for other in impls[1:]:   # the float perturbation: the same arm and seed under two attention kernels
        for arm, tag in (("sft", "round0_sft"), ("grpo", "round1")):
            for key in ("all/greedy_pass@1", "all/pass@1"):
                st = paired(results, impls[0], arm, arm, key, tag, tag, impl_b=other)
                if st is not None:
                    rows.append({"attention": f"{impls[0]}-{other}", "comparison": f"{arm}: kernels",
                                 "metric": key, **st})
    return rows


def prior_results(s: dict, path: str) -> dict:
    """results[(impl, arm)][seed] of an earlier run, from its --summary `s` read from `path` (per-seed values,
    4 digits): lets a report combine seeds measured on another day without their run directories."""
    seeds, out = s["seeds"], {}
    for impl, by_arm in s["aggregate"].items():
        for arm, by_tag in by_arm.items():
            for tag, by_key in by_tag.items():
                for key, st in by_key.items():
                    if len(st["values"]) != len(seeds):
                        raise ValueError(f"{path}: aggregate/{impl}/{arm}/{tag}/{key} has {len(st['values'])} "
                                         f"values for seeds {seeds}")
                    for seed, v in zip(seeds, st["values"]):
                        out.setdefault((impl, arm), {}).setdefault(seed, {}).setdefault(tag, {})[f"eval/{key}"] = v
    return out


def _cell(st: dict | None) -> str:
    return f"{st['mean']:.3f} ± {st['std']:.3f}" if st else "-"


def tables(agg: dict, comps: list[dict], impls, arms) -> str:
    lines = []
    for impl in impls:
        arms_here = [a for a in arms if a in agg.get(impl, {})]
        if not arms_here:
            continue
        n = max(s["n"] for a in arms_here for t in agg[impl][a].values() for s in t.values())
        lines.append(f"\n== attention_impl={impl}: held-out, all tasks, last evaluation of each arm "
                     f"(mean ± std over {n} seeds)")
        lines.append(f"{'arm':20s}" + "".join(f"{m:>17s}" for m in HEADLINE))
        for arm in arms_here:
            tag = "round0_sft" if arm == "sft" else "round1"
            row = agg[impl][arm].get(tag, {})
            lines.append(f"{arm:20s}" + "".join(f"{_cell(row.get('all/' + m)):>17s}" for m in HEADLINE))
        for metric in ("pass@1", "greedy_pass@1"):
            lines.append(f"\n-- {metric} per branch type and round (attention_impl={impl})")
            lines.append(f"{'arm':20s}{'round':9s}" + "".join(f"{b:>16s}" for b in BRANCHES))
            for arm in arms_here:
                for tag in ("round0_sft", "round0", "round1"):
                    if tag not in agg[impl][arm] or (arm != "sft" and tag == "round0_sft"):
                        continue
                    row = agg[impl][arm][tag]
                    lines.append(f"{arm:20s}{ROUND_NAMES[tag]:9s}"
                                 + "".join(f"{_cell(row.get(f'branch/{b}/{metric}')):>16s}" for b in BRANCHES))
    if comps:
        lines.append("\n== paired differences over seeds (same seed: same init, data, held-out tasks, eval samples)")
        lines.append(f"{'attention':10s}{'comparison':19s}{'metric':38s}{'mean':>8s}{'± se':>8s}{'t':>7s}"
                     f"{'> 0':>6s}{'min':>8s}")
        for c in comps:
            t = "-" if c["t"] is None else f"{c['t']:.1f}"
            lines.append(f"{c['attention']:10s}{c['comparison']:19s}{c['metric']:38s}{c['mean']:+8.3f}"
                         f"{c['se']:8.3f}{t:>7s}{c['positive']:>3d}/{c['n']:<2d}{c['min']:+8.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--attention", nargs="+", default=["auto", "xla"],
                    help="attention_impl values; the first runs every arm, the others --perturb-arms")
    ap.add_argument("--perturb-arms", nargs="+", default=["sft", "grpo"], choices=ARMS)
    ap.add_argument("--out", default=str(ROOT / "runs" / "learning"))
    ap.add_argument("--small", action="store_true", help="a few-step version (checks the machinery, not learning)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every run (e.g. sft.steps=300)")
    ap.add_argument("--summary", default="", help="write the aggregate as JSON here")
    ap.add_argument("--report-only", action="store_true", help="aggregate finished nodes, run nothing")
    ap.add_argument("--prior", default="", help="an earlier --summary file: its seeds count where --out has no run")
    args = ap.parse_args(argv)
    prior_sum = json.loads(pathlib.Path(args.prior).read_text()) if args.prior else {}
    prior = prior_results(prior_sum, args.prior) if args.prior else {}

    base = dict(SMALL) if args.small else {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        try:
            base[k] = json.loads(v)
        except json.JSONDecodeError:
            base[k] = v
    out = pathlib.Path(args.out).resolve()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {}
    recipes: list = []
    for i, impl in enumerate(args.attention):
        arms = args.arms if i == 0 else args.perturb_arms
        for seed in args.seeds:
            for arm in arms:
                node = arm  # every arm is the node that ends it (NODES)
                done = out / impl / f"s{seed}" / node / "bench_done.json"
                if seed in prior.get((impl, arm), {}) and not done.is_file():
                    results.setdefault((impl, arm), {})[seed] = prior[(impl, arm)][seed]
                    continue
                if args.report_only:
                    if not done.is_file():
                        continue
                    rec = json.loads(done.read_text())
                else:
                    rec = run_node(out, impl, seed, node, base, log)
                cfg_path = done.parent / "config.json"
                if not cfg_path.is_file():
                    raise SystemExit(f"{cfg_path}: missing (every run writes its resolved config there; the "
                                     f"report records the recipe from it)")
                recipes.append((cfg_path, node, recipe(json.loads(cfg_path.read_text()))))
                results.setdefault((impl, arm), {})[seed] = arm_evals(rec, arm)
    run_recipe = check_recipes(recipes, prior_sum)
    agg = aggregate(results)
    comps = comparisons(results, args.attention)
    for impl, by_arm in agg.items():
        for arm, by_tag in by_arm.items():
            for tag, by_key in by_tag.items():
                for key, st in by_key.items():
                    group, _, metric = key.rpartition("/")
                    if group.startswith("domain/") or group.startswith("legal/"):
                        continue
                    print(json.dumps({"bench": "learning", "attention": impl, "arm": arm, "round": tag,
                                      "group": group, "metric": metric, **st}))
    for c in comps:
        print(json.dumps({"bench": "learning_paired", **c}))
    print(tables(agg, comps, args.attention, [a for a in ARMS if a in {*args.arms, *args.perturb_arms}]))
    if args.summary:
        prior_cmd = prior_sum.get("command")
        summary = {"command": "python benchmarks/bench_learning.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "prior_command": prior_cmd,
                   "seeds": args.seeds, "overrides": base, "recipe": run_recipe, "aggregate": agg, "paired": comps,
                   "wall_s": {**prior_sum.get("wall_s", {}), **node_walls(out, args)}}  # the prior's: nodes not rerun
        path = pathlib.Path(args.summary)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
