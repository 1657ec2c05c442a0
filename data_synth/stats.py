"""Dataset statistics for agentic task files: `python -m data_synth.stats DATASET.jsonl [--json]`.

Reports behavior-tree depth and branching distributions, branch coverage (which tree nodes / branch types
the tasks exercise), legal / illegal balance, and per-domain counts, difficulty, hidden facts, gold steps,
hack-path availability. Accepts JSONL of Tasks, the AgenticQwen demo JSON list, or a parquet file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from typing import Iterable

from agq_jax.envs.schema import BRANCH_TYPES, Task


def _dist(values: list[int]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "min": min(values), "max": max(values), "mean": round(statistics.fmean(values), 3),
            "hist": dict(sorted(Counter(values).items()))}


def dataset_stats(tasks: Iterable[Task]) -> dict:
    tasks = list(tasks)
    with_tree = [t for t in tasks if t.behavior_tree is not None]
    branching = [b for t in with_tree for b in t.behavior_tree.branching()]
    coverage: dict[str, set] = defaultdict(set)      # tree signature -> exercised node ids
    available: dict[str, set] = {}
    for t in with_tree:
        sig = f"{t.domain}:{t.behavior_tree.depth()}:{len(t.behavior_tree.nodes())}"
        available[sig] = {n.id for n in t.behavior_tree.nodes() if n.branch_type}
        coverage[sig].add(t.branch.node_id)
    decision_nodes = sum(len(v) for v in available.values())
    covered = sum(len(coverage[s] & available[s]) for s in available)
    by_domain = Counter(t.domain for t in tasks)
    legal = Counter("legal" if t.branch.legal else "illegal" for t in tasks)
    per_domain_branch = defaultdict(Counter)
    for t in tasks:
        per_domain_branch[t.domain][t.branch.branch_type] += 1
    return {
        "n_tasks": len(tasks),
        "domains": dict(sorted(by_domain.items())),
        "branch_types": {b: sum(1 for t in tasks if t.branch.branch_type == b) for b in BRANCH_TYPES},
        "legal_illegal": {"legal": legal["legal"], "illegal": legal["illegal"],
                          "legal_fraction": round(legal["legal"] / max(1, len(tasks)), 3)},
        "tree_depth": _dist([t.behavior_tree.depth() for t in with_tree]),
        "tree_branching": _dist(branching),
        "tree_leaves": _dist([len(t.behavior_tree.leaves()) for t in with_tree]),
        "branch_coverage": {"decision_nodes": decision_nodes, "covered": covered,
                            "fraction": round(covered / decision_nodes, 3) if decision_nodes else None,
                            "tasks_without_tree": len(tasks) - len(with_tree)},
        "difficulty_level": _dist([t.difficulty.level for t in tasks]),
        "hidden_facts": _dist([len(t.user.hidden_facts) for t in tasks]),
        "gold_steps": _dist([len(t.gold_actions) for t in tasks]),
        "escape_steps": _dist([len(t.user.escape.steps) for t in tasks]),
        "with_hack_path": sum(1 for t in tasks if t.expected_returns.hack_path),
        "with_world_state": sum(1 for t in tasks if t.initial_state is not None),
        "per_domain_branch": {d: dict(c) for d, c in sorted(per_domain_branch.items())},
    }


def format_stats(s: dict) -> str:
    lines = [f"tasks: {s['n_tasks']}   with world state: {s['with_world_state']}   with hack path: {s['with_hack_path']}",
             f"legal / illegal: {s['legal_illegal']['legal']} / {s['legal_illegal']['illegal']} "
             f"(legal fraction {s['legal_illegal']['legal_fraction']})",
             "branch types: " + ", ".join(f"{k}={v}" for k, v in s["branch_types"].items()),
             f"branch coverage: {s['branch_coverage']['covered']}/{s['branch_coverage']['decision_nodes']} decision nodes"
             f" ({s['branch_coverage']['fraction']}); tasks without a tree: {s['branch_coverage']['tasks_without_tree']}"]
    for key in ("tree_depth", "tree_branching", "tree_leaves", "difficulty_level", "hidden_facts", "gold_steps",
                "escape_steps"):
        d = s[key]
        lines.append(f"{key:17s} " + (f"min {d['min']}  mean {d['mean']}  max {d['max']}  hist {d['hist']}"
                                       if d.get("n") else "n/a"))
    lines.append(f"{'domain':14s}" + "".join(f"{b:>14s}" for b in BRANCH_TYPES))
    for d, c in s["per_domain_branch"].items():
        lines.append(f"{d:14s}" + "".join(f"{c.get(b, 0):14d}" for b in BRANCH_TYPES))
    return "\n".join(lines)


def load_any(path: str) -> list[Task]:
    from agq_jax.envs import importers

    if path.endswith(".parquet"):
        tasks, issues = importers.load_parquet(path)
    elif path.endswith(".json"):
        tasks, issues = importers.load_demo_json(path)
    else:
        tasks, issues = importers.load_jsonl(path)
    for i in issues:
        print(f"skipped: {i}", file=sys.stderr)
    return tasks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="tasks as .jsonl, AgenticQwen demo .json, or .parquet")
    ap.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    args = ap.parse_args(argv)
    s = dataset_stats(load_any(args.dataset))
    print(json.dumps(s) if args.json else format_stats(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
