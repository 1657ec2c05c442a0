"""Procedural task generation speed: 1,000 verified tasks (gold episode played and scored for each).

Prints one JSON line per measurement and a table. The reference, measured in the same run, is generation
without verification (`verify=False`); the ratio shows what the per-task gold check costs. Also measures the
environment side of a rollout: gold episodes replayed and scored per second.
Usage: python benchmarks/bench_procedural_gen.py [--n 1000]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

from agq_jax.envs import replay_agent, run_episode, score
from agq_jax.envs.worlds.generator import Knobs, generate_task, generate_tasks
from agq_jax.envs.schema import BRANCH_TYPES
from agq_jax.envs.worlds import domains


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    n = args.n
    doms = domains()
    combos = [(d, b) for d in doms for b in BRANCH_TYPES]
    rows = []
    for level in (0, 3):
        k = Knobs(level=level)
        _, t_ref = _timed(lambda: [generate_task(*combos[i % len(combos)], seed=i, knobs=k, verify=False)
                                   for i in range(n)])
        tasks, t_full = _timed(lambda: generate_tasks(n, seed=0, knobs=k))
        _, t_json = _timed(lambda: [t.model_dump_json() for t in tasks])
        _, t_ep = _timed(lambda: [score(t, run_episode(t, replay_agent(t.gold_replies))) for t in tasks])
        n_steps = sum(len(t.gold_replies) for t in tasks)
        rows.append({"bench": "procedural_gen", "level": level, "n_tasks": n, "domains": len(doms),
                     "seconds_verified": round(t_full, 3), "tasks_per_s": round(n / t_full, 1),
                     "seconds_unverified_ref": round(t_ref, 3), "ratio_vs_ref": round(t_full / t_ref, 2),
                     "seconds_to_json": round(t_json, 3), "episodes_per_s": round(n / t_ep, 1),
                     "env_steps_per_s": round(n_steps / t_ep, 1), "under_60s": t_full < 60.0,
                     "host": platform.processor() or platform.machine()})
    for r in rows:
        print(json.dumps(r))
    print(f"\n{'level':>5} {'tasks':>6} {'verified s':>11} {'tasks/s':>8} {'unverified s':>13} {'ratio':>6} "
          f"{'episodes/s':>11} {'env steps/s':>12}")
    for r in rows:
        print(f"{r['level']:>5} {r['n_tasks']:>6} {r['seconds_verified']:>11.2f} {r['tasks_per_s']:>8.0f} "
              f"{r['seconds_unverified_ref']:>13.2f} {r['ratio_vs_ref']:>6.2f} {r['episodes_per_s']:>11.0f} "
              f"{r['env_steps_per_s']:>12.0f}")


if __name__ == "__main__":
    main()
