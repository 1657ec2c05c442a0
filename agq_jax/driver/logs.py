"""Metrics sinks (JSONL + TensorBoard, process 0 only) and the one-screen round summary."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping


def _scalar(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class MetricsLogger:
    """Appends one JSON line per record to `run_dir/metrics.jsonl` and mirrors scalars to TensorBoard.

    A resumed run truncates records past the restored global step first, so the file reads as one
    uninterrupted run (the records of the killed tail are written again, identically)."""

    def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate(resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step)

    def _truncate(self, resume_step: int | None) -> None:
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from the kill
                if resume_step is not None and rec.get("global_step", 0) > resume_step:
                    break
                keep.append(line if line.endswith("\n") else line + "\n")
        if resume_step is None:
            keep = []
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def log(self, kind: str, global_step: int, metrics: Mapping[str, float], **extra) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "global_step": int(global_step), **extra,
               "metrics": {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in rec["metrics"].items():
                self._tb.add_scalar(f"{kind}/{k}" if "/" not in k else k, v, global_step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str, kind: str | None = None) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if kind is None or r["kind"] == kind]


def _avg(rows: list[Mapping[str, float]], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def round_summary(round_idx: int, grpo_rows: list[Mapping[str, float]], evals: Mapping[str, dict],
                  data_counts: Mapping[str, int], wall_s: float) -> str:
    """One screen: training reward and diagnostics over the round, held-out pass rates per group."""
    lines = [f"=== round {round_idx} ({wall_s:.0f}s) === data: "
             + ", ".join(f"{k} {v}" for k, v in data_counts.items())]
    if grpo_rows:
        fields = [("reward", "rollout/reward_mean"), ("success", "rollout/success_rate"),
                  ("zero-var", "grpo/zero_variance_frac"),
                  ("clip", "train/clip_frac"), ("entropy", "train/entropy"), ("kl", "train/kl"),
                  ("|lp diff|", "train/logprob_diff_first"), ("tok/s", "perf/tokens_per_s"),
                  ("resp len", "rollout/response_length_mean")]
        first, last = grpo_rows[0], grpo_rows[-1]
        parts = []
        for name, key in fields:
            a = _avg(grpo_rows, key)
            if a is not None:
                parts.append(f"{name} {a:.3f}" + (f" ({first.get(key, 0):.2f}->{last.get(key, 0):.2f})"
                                                    if name == "reward" else ""))
        lines.append(f"GRPO {len(grpo_rows)} steps: " + ", ".join(parts))
        terms = {k.split("/", 1)[1]: _avg(grpo_rows, k) for k in sorted({k for r in grpo_rows for k in r})
                 if k.startswith("termination/")}
        lines.append("terminations: " + ", ".join(f"{k} {v:.2f}" for k, v in terms.items()))
    for tag, res in evals.items():
        lines.append(f"held-out [{tag}]")
        lines.append(f"  {'group':26s}{'n':>4s}{'greedy@1':>10s}{'reward':>8s}{'pass@1':>8s}{'pass@k':>8s}{'pass^k':>8s}")
        greedy, sampled = res.get("greedy", {}), res.get("sampled", {})
        for grp in sorted(set(greedy) | set(sampled), key=lambda g: (g != "all", g)):
            if grp.startswith("legal/"):
                continue
            s, g = sampled.get(grp, {}), greedy.get(grp, {})
            ks = sorted(int(k[5:]) for k in s if k.startswith("pass@"))
            kmax = ks[-1] if ks else None
            cell = lambda d, k: f"{d[k]:8.2f}" if k in d else f"{'-':>8s}"  # noqa: E731
            lines.append(f"  {grp:26s}{int((s or g).get('n_tasks', 0)):4d}"
                         f"{(g.get('pass@1') if 'pass@1' in g else float('nan')):10.2f}{cell(s, 'reward_mean')}"
                         f"{cell(s, 'pass@1')}{cell(s, f'pass@{kmax}')}{cell(s, f'pass^{kmax}')}")
        terms = {k.split("/")[-1]: v for k, v in res["flat"].items() if k.startswith("eval/termination/")}
        lines.append("  terminations: " + ", ".join(f"{k} {v:.2f}" for k, v in terms.items()))
    return "\n".join(lines)
