"""pass@k (at least one of k trials succeeds) and pass^k (all k succeed, tau-bench), per domain and branch type.

Both use the unbiased estimators over n >= k trials with c successes:
pass@k = 1 - C(n-c, k) / C(n, k),   pass^k = C(c, k) / C(n, k).
"""
from __future__ import annotations

from collections import defaultdict
from math import comb
from typing import Iterable, Sequence, Union

from agq_jax.envs.rewards import SUCCESS_THRESHOLD, Reward
from agq_jax.envs.schema import Task


def _check(n: int, c: int, k: int) -> None:
    if not (0 <= c <= n) or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of trials n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    _check(n, c, k)
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float:
    _check(n, c, k)
    return comb(c, k) / comb(n, k)


def _value(r: Union[Reward, float]) -> float:
    return r.total if isinstance(r, Reward) else float(r)


def summarize(trials: Iterable[tuple[Task, Sequence[Union[Reward, float]]]], ks: Sequence[int] = (1, 2, 4),
              threshold: float = SUCCESS_THRESHOLD) -> dict[str, dict[str, float]]:
    """Per group ("all", "domain/<d>", "branch/<type>", "legal/<bool>"): tasks, mean reward, pass@k, pass^k
    (averaged over tasks; k larger than a task's trial count is skipped)."""
    groups: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for task, rewards in trials:
        vals = [_value(r) for r in rewards]
        if not vals:
            continue
        row = (len(vals), sum(v >= threshold for v in vals), sum(vals) / len(vals))
        for g in ("all", f"domain/{task.domain}", f"branch/{task.branch.branch_type}",
                  f"legal/{str(task.branch.legal).lower()}"):
            groups[g].append(row)
    out: dict[str, dict[str, float]] = {}
    for g, rows in sorted(groups.items()):
        stats = {"n_tasks": float(len(rows)), "reward_mean": sum(r[2] for r in rows) / len(rows)}
        for k in ks:
            ok = [r for r in rows if r[0] >= k]
            if ok:
                stats[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c, _ in ok) / len(ok)
                stats[f"pass^{k}"] = sum(pass_hat_k(n, c, k) for n, c, _ in ok) / len(ok)
        out[g] = stats
    return out


def format_table(summary: dict[str, dict[str, float]]) -> str:
    cols = sorted({k for s in summary.values() for k in s}, key=lambda k: (k[:4] != "n_ta", k))
    lines = [f"{'group':28s}" + "".join(f"{c:>12s}" for c in cols)]
    for g, s in summary.items():
        lines.append(f"{g:28s}" + "".join(f"{s[c]:12.3f}" if c in s else f"{'-':>12s}" for c in cols))
    return "\n".join(lines)
