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
    obj: Any                  # envs.schema.Task | agq_jax.envs.reasoning_problems.ReasoningProblem
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


def make_world(env_cfg, client=None, *, scripted: bool = False):
    """The run's simulated world (agq_jax.envs.world) from the config's `env` section, teacher roles answered
    by `client` (a data_synth TeacherClient; None offline). scripted=True: the offline world in the same
    protocol and gates whatever the config says (gold replay and SFT sequences must be deterministic)."""
    from agq_jax.envs.world import TeacherChats, World, WorldSpec

    spec = WorldSpec(user="scripted" if scripted else env_cfg.user, tools="auto" if scripted else env_cfg.tools,
                     judge="none" if scripted else env_cfg.judge, protocol=env_cfg.protocol,
                     gates=tuple(env_cfg.gates), max_agent_turns=env_cfg.max_agent_turns,
                     max_user_turns=env_cfg.max_user_turns, user_corrects=env_cfg.user_corrects)
    chats = TeacherChats(*(client.as_callable(r) if client is not None and not scripted and client.has_role(r) else None
                           for r in ("mock_user", "mock_tool", "judge")))
    return World(spec, chats)


def make_env(item: Item, world, tool_cache=None):
    """A fresh step env for `item`: agentic tasks in `world` (rollouts of one task share `tool_cache`, so the
    teacher tools answer identical calls in identical states alike); reasoning problems with their python /
    search tools."""
    if item.kind == AGENTIC:
        return world.make_env(item.obj, tool_cache=tool_cache)
    from agq_jax.envs.reasoning import ReasoningLimits, make_reasoning_env

    return make_reasoning_env(item.obj, limits=ReasoningLimits(max_agent_turns=world.spec.max_agent_turns))


def score_env(env) -> tuple[float, dict, dict]:
    """Reward of a finished env of either family (the `score_fn` of run_rollouts): its own `reward()`."""
    r = env.reward()
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


def verify_gold(item: Item, world) -> list[str]:
    """Replay candidate gold replies (in the world's protocol) through a fresh env of `world` (the scripted
    one); keep them only if the episode succeeds."""
    cands = world.gold_replies(item.obj) if item.kind == AGENTIC else reasoning_gold(item.obj)
    if not cands:
        return []
    env = make_env(item, world)
    env.reset()
    for i, reply in enumerate(cands):
        res = env.step(reply)
        if res.done:
            return cands[: i + 1] if env.reward().success else []
    return []


def load_items(rows: list[dict], kind: str, env_cfg, *, with_gold: bool = True) -> list[Item]:
    """Validated items from dataset rows (round_<r>/{agentic,reasoning}.jsonl)."""
    world = make_world(env_cfg, scripted=True)
    out = []
    for i, row in enumerate(rows):
        try:
            if kind == AGENTIC:
                from agq_jax.envs import Task

                obj = Task.model_validate(row)
            else:
                from agq_jax.envs.reasoning_problems import ReasoningProblem

                obj = ReasoningProblem.model_validate(row)
        except ValueError as e:
            raise ValueError(f"{kind} dataset row {i} (id={row.get('id')!r}) is invalid: {str(e)[:300]}") from None
        item = Item(kind, obj.id, obj)
        if with_gold:
            item.gold = verify_gold(item, world)
        out.append(item)
    return out


def task_file_items(rc, *, heldout: bool) -> list[Item]:
    """The training (heldout=False) or held-out share of the tasks in `data.task_files` (released AgenticQwen
    files or our exports), with verified gold; import issues are printed, named and counted, never fatal."""
    if not rc.data.task_files:
        return []
    from agq_jax.envs.sources import heldout_split, load_task_files

    key = (tuple(rc.data.task_files), rc.data.task_heldout_fraction, rc.seed, heldout)
    if key not in _TASK_FILE_CACHE:
        tasks, issues = load_task_files(rc.data.task_files)
        if issues and rc.verbose and not heldout:
            kept = sum(i.kept for i in issues)
            print(f"task files: {len(tasks)} tasks, {kept} kept with an import issue, {len(issues) - kept} records "
                  f"dropped (first: {issues[0]})", flush=True)
        train, held = heldout_split(tasks, rc.data.task_heldout_fraction, seed=rc.seed)
        rows = [t.model_dump(mode="json") for t in (held if heldout else train)]
        _TASK_FILE_CACHE[key] = load_items(rows, AGENTIC, rc.env, with_gold=not heldout)
    return list(_TASK_FILE_CACHE[key])


_TASK_FILE_CACHE: dict = {}


def fitting(items: list[Item], env_cfg, tok, rollout_cfg) -> tuple[list[Item], int]:
    """(items whose opening prompt fits in rollout.max_len, how many do not). A rollout cannot start an
    episode whose prompt alone fills the budget, so such items (long released policies under a small smoke
    budget) are left out and counted rather than packed into a batch they overflow."""
    from agq_jax import tokenizer as qtok

    world = make_world(env_cfg, scripted=True)   # the same prompt as the configured world, without teachers
    keep = []
    for it in items:
        key = (it.id, env_cfg.protocol, rollout_cfg.enable_thinking, id(tok))
        if key not in _PROMPT_LEN:
            env = make_env(it, world)
            msgs = env.reset()
            _PROMPT_LEN[key] = len(qtok.encode_chat(tok, msgs, None if env.embed_tools else (env.tool_schemas or None),
                                                    add_generation_prompt=True,
                                                    enable_thinking=rollout_cfg.enable_thinking))
        if _PROMPT_LEN[key] < rollout_cfg.max_len:
            keep.append(it)
    return keep, len(items) - len(keep)


_PROMPT_LEN: dict = {}


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


def build_round_dataset(rc, round_idx: int, failures: Optional[list[dict]], *, client=None,
                        is_writer: bool = True) -> tuple[list[Item], list[Item], str]:
    """Build (process 0, once, with the run's teacher `client`) or load the round's dataset (the same
    directory `python -m data_synth.run` writes); returns (agentic items, reasoning items, dir)."""
    from data_synth import run as synth_run
    from data_synth.io_utils import read_jsonl

    rdir = synth_run.round_dir(rc, round_idx)
    if not os.path.isfile(os.path.join(rdir, "manifest.json")):
        if not is_writer:
            raise FileNotFoundError(f"{rdir}/manifest.json: process 0 has not built round {round_idx} yet")
        _outside_event_loop(synth_run.run_round, rc, round_idx, failures, client)
    agentic = load_items(read_jsonl(os.path.join(rdir, "agentic.jsonl")), AGENTIC, rc.env)
    reasoning = load_items(read_jsonl(os.path.join(rdir, "reasoning.jsonl")), REASONING, rc.env)
    return agentic, reasoning, rdir


def heldout_items(rc) -> list[Item]:
    """The fixed evaluation set (same tasks every round): held-out-split procedural tasks and problems, plus
    the held-out share of `data.task_files`."""
    from agq_jax.envs.worlds.generator import Knobs, generate_tasks
    from agq_jax.envs.reasoning_problems import generate_seed_set

    d = rc.data
    n = d.heldout_tasks
    w_a, w_r = d.agentic_weight, d.reasoning_weight
    n_r = int(round(n * w_r / (w_a + w_r))) if w_r > 0 else 0
    items = []
    if n - n_r > 0:
        tasks = generate_tasks(n - n_r, seed=rc.seed + 7, domains=list(d.domains) or None,
                               knobs=Knobs(level=rc.synth.agentic.level), split="heldout")
        items += [Item(AGENTIC, t.id, t) for t in tasks]
    items += task_file_items(rc, heldout=True)
    if n_r:
        items += [Item(REASONING, p.id, p) for p in generate_seed_set(n_r, seed=rc.seed + 900_001)]
    return items


def family_counts(rc, round_idx: int, n: int, have: dict[str, int]) -> dict[str, int]:
    """How many of `n` tasks of a step come from each family (mixed: by weight; staged: one per round)."""
    d = rc.data
    w = {AGENTIC: d.agentic_weight * (have[AGENTIC] > 0), REASONING: d.reasoning_weight * (have[REASONING] > 0)}
    if sum(w.values()) <= 0:
        raise ValueError(f"round {round_idx}: no training items for the enabled families ({have})")
    if d.schedule == "staged" and all(w.values()):
        agentic_rounds = max(1, round(rc.rounds * w[AGENTIC] / sum(w.values())))
        return {AGENTIC: n, REASONING: 0} if round_idx < agentic_rounds else {AGENTIC: 0, REASONING: n}
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
