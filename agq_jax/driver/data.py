"""Task items of both families, their environments and gold replies, round datasets and the data stream.

An `Item` wraps one agentic mock-world `Task` or one verifiable `ReasoningProblem` so the rest of the driver
treats them alike: `make_env(item)` gives a step env, `score_env(env)` its reward, `item.gold` the expert
replies (verified at load time by replaying them through the env: only replies scoring 1.0 are kept).
The training stream is a pure function of (seed, round, position), so the checkpointed position is all a
resumed run needs to draw the same tasks.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional

import numpy as np

AGENTIC, REASONING = "agentic", "reasoning"


@dataclasses.dataclass
class Item:
    kind: str                 # agentic | reasoning
    id: str
    obj: Any                  # envs.schema.Task | data_synth.reasoning_problems.ReasoningProblem
    gold: list[str] = dataclasses.field(default_factory=list)   # verified expert replies ([] = none)

    @property
    def domain(self) -> str:
        return self.obj.domain if self.kind == AGENTIC else f"reasoning/{self.obj.kind}"

    @property
    def branch(self) -> str:
        return self.obj.branch.branch_type if self.kind == AGENTIC else "answer"

    def failure_row(self, reward: float, episode: Optional[dict] = None) -> dict:
        """The row data_synth.run_round expects for a failed item of the previous round."""
        if self.kind == AGENTIC:
            return {"type": AGENTIC, "task": self.obj.model_dump(mode="json"), "episode": episode, "reward": reward}
        return {"type": REASONING, "problem": self.obj.model_dump(mode="json"), "reward": reward}


def make_env(item: Item, cfg):
    """A fresh step env for `item` (scripted user + state tools offline; python / search tools for reasoning)."""
    if item.kind == AGENTIC:
        from agq_jax.envs import EpisodeLimits, make_env as make_agentic_env

        limits = EpisodeLimits(max_agent_turns=int(cfg.rollout.max_agent_turns),
                               max_user_turns=int(cfg.rollout.max_user_turns))
        return make_agentic_env(item.obj, user="scripted", tools="auto", limits=limits)
    from agq_jax.envs.reasoning import ReasoningLimits, make_reasoning_env

    return make_reasoning_env(item.obj, limits=ReasoningLimits(max_agent_turns=int(cfg.rollout.max_agent_turns)))


def score_env(env) -> tuple[float, dict, dict]:
    """Reward of a finished env of either family (the `score_fn` of run_rollouts)."""
    if hasattr(env, "problem"):
        r = env.reward()
    else:
        from agq_jax.envs import score

        r = score(env.task, env.record)
    return float(r.total), dict(r.components), dict(r.gates)


_ARITH = re.compile(r"Compute the exact value of (.+)\. Give the answer")


def reasoning_gold(problem) -> list[str]:
    """Expert replies for a procedural problem: arithmetic computes the expression with the python tool,
    then states the label; other kinds state the label (their tool use is left to RL)."""
    from agq_jax.envs.parsing import format_tool_call

    final = f"The answer is \\boxed{{{problem.answer}}}."
    m = _ARITH.match(problem.question)
    if m and "python" in problem.tools:
        code = f"from fractions import Fraction as F\nprint({_fraction_expr(m.group(1))})"
        return [f"Let me compute it.\n{format_tool_call('python', {'code': code})}", final]
    return [final]


def _fraction_expr(expr: str) -> str:
    return re.sub(r"\d+", lambda m: f"F({m.group(0)})", expr)


def verify_gold(item: Item, cfg) -> list[str]:
    """Replay candidate gold replies through a fresh env; keep them only if the episode scores 1.0."""
    cands = list(item.obj.gold_replies) if item.kind == AGENTIC else reasoning_gold(item.obj)
    if not cands:
        return []
    env = make_env(item, cfg)
    env.reset()
    for i, reply in enumerate(cands):
        res = env.step(reply)
        if res.done:
            return cands[: i + 1] if score_env(env)[0] >= 1.0 else []
    return []


def load_items(rows: list[dict], kind: str, cfg, *, with_gold: bool = True) -> list[Item]:
    """Validated items from dataset rows (round_<r>/{agentic,reasoning}.jsonl)."""
    out = []
    for i, row in enumerate(rows):
        try:
            if kind == AGENTIC:
                from agq_jax.envs import Task

                obj = Task.model_validate(row)
            else:
                from data_synth.reasoning_problems import ReasoningProblem

                obj = ReasoningProblem.model_validate(row)
        except ValueError as e:
            raise ValueError(f"{kind} dataset row {i} (id={row.get('id')!r}) is invalid: {str(e)[:300]}") from None
        item = Item(kind, obj.id, obj)
        if with_gold:
            item.gold = verify_gold(item, cfg)
        out.append(item)
    return out


def synth_config(cfg, run_dir: str):
    """The data_synth round config of this run: cfg.synth with runs_dir/name pointing into the run dir."""
    s = cfg.synth.copy_and_resolve_references()
    with s.unlocked():
        s.runs_dir = run_dir
        s.name = "data"
        s.progress = bool(cfg.get("verbose", True))
        s.teachers = cfg.teachers if cfg.teachers.get("base_url") else s.get("teachers", {})
        s.agentic.enabled = float(cfg.data.agentic_weight) > 0
        s.agentic.domains = tuple(cfg.data.domains or ())   # procedural tasks only of the trained domains
        s.reasoning.enabled = float(cfg.data.reasoning_weight) > 0
    return s


def _outside_event_loop(fn, *args):
    """run_round uses asyncio.run, which fails inside a running loop (Jupyter): use a worker thread there."""
    import asyncio
    import concurrent.futures as cf

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    with cf.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result()


def build_round_dataset(cfg, run_dir: str, round_idx: int, failures: Optional[list[dict]], *,
                        is_writer: bool = True) -> tuple[list[Item], list[Item], str]:
    """Build (process 0, once) or load the round's dataset; returns (agentic items, reasoning items, dir)."""
    from data_synth import run as synth_run
    from data_synth.io_utils import read_jsonl

    scfg = synth_config(cfg, run_dir)
    rdir = synth_run.round_dir(scfg, round_idx)
    if not os.path.isfile(os.path.join(rdir, "manifest.json")):
        if not is_writer:
            raise FileNotFoundError(f"{rdir}/manifest.json: process 0 has not built round {round_idx} yet")
        _outside_event_loop(synth_run.run_round, scfg, round_idx, failures)
    agentic = load_items(read_jsonl(os.path.join(rdir, "agentic.jsonl")), AGENTIC, cfg)
    reasoning = load_items(read_jsonl(os.path.join(rdir, "reasoning.jsonl")), REASONING, cfg)
    return agentic, reasoning, rdir


def heldout_items(cfg) -> list[Item]:
    """The fixed evaluation set (same tasks every round): held-out-split procedural tasks and problems."""
    from agq_jax.envs.worlds.generator import Knobs, generate_tasks
    from data_synth.reasoning_problems import generate_seed_set

    n = int(cfg.data.heldout_tasks)
    w_a, w_r = float(cfg.data.agentic_weight), float(cfg.data.reasoning_weight)
    n_r = int(round(n * w_r / (w_a + w_r))) if w_r > 0 else 0
    items = []
    if n - n_r > 0:
        domains = list(cfg.data.domains) or None
        tasks = generate_tasks(n - n_r, seed=int(cfg.seed) + 7, domains=domains,
                               knobs=Knobs(level=int(cfg.synth.agentic.level)), split="heldout")
        items += [Item(AGENTIC, t.id, t) for t in tasks]
    if n_r:
        items += [Item(REASONING, p.id, p) for p in generate_seed_set(n_r, seed=int(cfg.seed) + 900_001)]
    return items


def family_counts(cfg, round_idx: int, n: int, have: dict[str, int]) -> dict[str, int]:
    """How many of `n` tasks of a step come from each family (mixed: by weight; staged: one per round)."""
    w = {AGENTIC: float(cfg.data.agentic_weight) * (have[AGENTIC] > 0),
         REASONING: float(cfg.data.reasoning_weight) * (have[REASONING] > 0)}
    if sum(w.values()) <= 0:
        raise ValueError(f"round {round_idx}: no training items for the enabled families ({have})")
    if cfg.data.schedule == "staged" and all(w.values()):
        agentic_rounds = max(1, round(int(cfg.rounds) * w[AGENTIC] / sum(w.values())))
        return {AGENTIC: n, REASONING: 0} if round_idx < agentic_rounds else {AGENTIC: 0, REASONING: n}
    if cfg.data.schedule not in ("mixed", "staged"):
        raise ValueError(f"config data.schedule must be 'mixed' or 'staged', got {cfg.data.schedule!r}")
    n_r = int(round(n * w[REASONING] / sum(w.values())))
    return {AGENTIC: n - n_r, REASONING: n_r}


class TaskStream:
    """An endless, reproducible sequence of items: epoch e is a permutation seeded by (seed, round, e)."""

    def __init__(self, items: list[Item], seed: int, round_idx: int, salt: int = 0):
        if not items:
            raise ValueError("TaskStream: no items")
        self.items, self.key = items, (int(seed), int(round_idx), int(salt))
        self._perms: dict[int, np.ndarray] = {}

    def __getitem__(self, pos: int) -> Item:
        n = len(self.items)
        epoch = pos // n
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([*self.key, epoch]).permutation(n)
        return self.items[int(self._perms[epoch][pos % n])]

    def take(self, pos: int, k: int) -> list[Item]:
        return [self[pos + i] for i in range(k)]
