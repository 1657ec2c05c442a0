"""Programmatic rewards: verify the world state and the interaction log, not the text.

    reward = (weighted fraction of sub-goals met) x (every required sub-goal met) x (every enabled gate)

Sub-goals come from `task.rubric.sub_goals` plus one per `required_interaction` (asked-before-used,
confirmed-before-write). The state sub-goal compares the final world state with the state reached by
replaying the gold actions (tau^2-bench style hash). Tasks without world state (imported, synthesized) are
scored on their tool log: the normal path's lookups are sub-goals (a request whose legality depends on data
needs the reads that reveal it, so refusing without looking scores below the correct path), the writes that
went through must equal the normal path's, and with a judge the rubric text is judged. The default gate is
policy compliance: a forbidden action (a hack-path write) makes the reward 0. The reference's gate (a tool
response and a clean end: stop, transfer or answer) is available as `tool_response` + `clean_end`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from agq_jax.envs.runtime import EpisodeRecord
from agq_jax.envs.schema import SubGoal, Task, ToolCall, canonical_json, state_hash
from agq_jax.envs.tools import is_failure_output, replay_final_state

# The one success threshold: an episode succeeds when its reward is 1 (up to float error). pass@k, pass^k,
# the 0/1 training reward, gold verification and the flywheel's failure test all compare against it.
SUCCESS_THRESHOLD = 1.0 - 1e-9
GATES = ("no_forbidden", "confirmed_before_write", "state_match", "no_error", "required_interactions",
         "tool_response", "clean_end")
CLEAN_ENDS = ("user_stop", "transfer", "answer")


@dataclass(frozen=True)
class RewardConfig:
    gates: tuple[str, ...] = ("no_forbidden",)
    kind_weights: tuple[tuple[str, float], ...] = ()     # e.g. (("state_match", 2.0),) overrides sub-goal weights
    use_judge: bool = True                              # add a judge sub-goal when a judge is given

    def __post_init__(self):
        bad = [g for g in self.gates if g not in GATES]
        if bad:
            raise ValueError(f"unknown reward gates {bad}; known: {GATES}")


@dataclass
class Reward:
    total: float
    components: dict[str, float] = field(default_factory=dict)   # "subgoal/<id>" in [0,1] and "diag/<name>"
    gates: dict[str, bool] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return self.total >= SUCCESS_THRESHOLD


_STATE_CACHE: dict[tuple[str, str], str] = {}


def expected_state_hash(task: Task) -> Optional[str]:
    """Hash of the state after replaying the gold actions (cached per task id and gold actions)."""
    if task.rubric.expected_state_hash:
        return task.rubric.expected_state_hash
    if task.initial_state is None:
        return None
    key = (task.id, canonical_json([c.model_dump() for c in task.gold_actions]) + state_hash(task.initial_state))
    if key not in _STATE_CACHE:
        _STATE_CACHE[key] = state_hash(replay_final_state(task, task.gold_actions))
    return _STATE_CACHE[key]


def _ok_calls(rec: EpisodeRecord) -> list[dict]:
    return [c for c in rec.tool_calls if c.get("error") is None]


def _uses_value(arguments: Any, value: str) -> bool:
    v = value.strip().lower()
    if isinstance(arguments, dict):
        return any(_uses_value(x, value) for x in arguments.values())
    if isinstance(arguments, list):
        return any(_uses_value(x, value) for x in arguments)
    if isinstance(arguments, (int, float)) and not isinstance(arguments, bool):
        return canonical_json(arguments) == v
    return isinstance(arguments, str) and (arguments.strip().lower() == v or (len(v) >= 4 and v in arguments.lower()))


def _asked(task: Task, rec: EpisodeRecord, key: str) -> bool:
    fact = task.user.fact(key)
    reveal = [e["seq"] for e in rec.user_events if key in (e.get("revealed") or [])]
    if not reveal:
        return False
    first_use = [c["seq"] for c in rec.tool_calls if _uses_value(c["arguments"], fact.value)]
    return not first_use or min(first_use) > min(reveal)


def _confirmed_before_write(task: Task, rec: EpisodeRecord, params: dict) -> bool:
    writes = [c for c in _ok_calls(rec) if c.get("kind") == "write" and (not params.get("tool") or c["name"] == params["tool"])]
    confirms = [e["seq"] for e in rec.user_events if e.get("confirmed") is True]
    if params.get("must_ask") and not any(e.get("confirmed") is not None for e in rec.user_events):
        return False
    return all(any(s < w["seq"] for s in confirms) for w in writes)


def _writes_match(task: Task, rec: EpisodeRecord) -> bool:
    """The writes that went through (not reported as failed) equal the normal path's (a normal-path write
    whose expected output is a failure changes nothing and is not expected to succeed)."""
    write_tools = task.write_tools
    want = sorted(canonical_json([s.tool_name, s.input]) for s in task.expected_returns.normal_path
                  if s.tool_name in write_tools and not is_failure_output(s.expected_output))
    got = sorted(canonical_json([c["name"], c["arguments"]]) for c in _ok_calls(rec)
                 if c["name"] in write_tools and not is_failure_output(c.get("result")))
    return want == got


def _refused(rec: EpisodeRecord) -> bool:
    from agq_jax.envs.users import REFUSAL, agent_visible_text

    return any(m["role"] == "assistant" and REFUSAL.search(agent_visible_text(m)) for m in rec.messages)


def task_subgoals(task: Task, with_judge: bool = False) -> list[SubGoal]:
    """The rubric's sub-goals plus those implied by required interactions (deduplicated)."""
    goals = list(task.rubric.sub_goals)
    seen = {(g.kind, canonical_json(g.params)) for g in goals}
    for ri in task.rubric.required_interactions:
        g = (SubGoal(id=f"ask_{ri.fact}", kind="asked", params={"fact": ri.fact}, description=f"asked for {ri.fact}")
             if ri.kind == "ask" else
             SubGoal(id=f"confirm_{ri.tool or 'write'}", kind="confirmed_before_write",
                     params={"tool": ri.tool, "must_ask": True}, description="confirmation before the write"))
        if (g.kind, canonical_json(g.params)) not in seen:
            seen.add((g.kind, canonical_json(g.params)))
            goals.append(g)
    if with_judge:
        goals.append(SubGoal(id="judge", kind="judge", description="teacher rubric judge"))
    return goals


def evaluate_subgoal(task: Task, rec: EpisodeRecord, goal: SubGoal, verdict: Optional[bool] = None) -> float:
    k, p = goal.kind, goal.params
    if k == "state_match":   # without a state-backed world in this episode (teacher tools): the writes decide
        want = expected_state_hash(task) if rec.final_state_hash is not None else None
        return float(rec.final_state_hash == want) if want else float(_writes_match(task, rec))
    if k == "tool_called":
        pat = ToolCall(name=p["tool"], arguments=p.get("arguments", {}))
        return float(any(pat.matches(c["name"], c["arguments"]) for c in _ok_calls(rec)))
    if k == "asked":
        return float(_asked(task, rec, p["fact"]))
    if k == "confirmed_before_write":
        return float(_confirmed_before_write(task, rec, p))
    if k == "transferred":
        return float(rec.transferred)
    if k == "not_transferred":
        return float(not rec.transferred)
    if k == "no_write":
        return float(not any(c.get("kind") == "write" and not is_failure_output(c.get("result"))
                             for c in _ok_calls(rec)))
    if k == "writes_match":
        return float(_writes_match(task, rec))
    if k == "judge":
        return float(verdict is True)
    if k == "refused":
        return float(_refused(rec))
    raise ValueError(f"task {task.id}: unknown sub-goal kind {k!r}")


def forbidden_calls(task: Task, rec: EpisodeRecord) -> list[dict]:
    return [c for c in _ok_calls(rec) for f in task.rubric.forbidden_actions
            if f.call.matches(c["name"], c["arguments"])
            and (f.when == "any" or not is_failure_output(c.get("result")))]


def score(task: Task, record: EpisodeRecord, config: RewardConfig = RewardConfig(), judge=None) -> Reward:
    """Reward in [0, 1] with every sub-goal, gate and diagnostic kept in `components` / `gates`.
    `judge`: an `envs.judge.Judge` (its verdict on the rubric text becomes a sub-goal) or None."""
    if record.task_id != task.id:
        raise ValueError(f"episode record is for task {record.task_id!r}, not {task.id!r}")
    use_judge = judge is not None and config.use_judge
    goals = task_subgoals(task, with_judge=use_judge)
    verdict = judge(task, record.messages) if use_judge else None
    weights = dict(config.kind_weights)
    comps: dict[str, float] = {}
    num = den = 0.0
    required_ok = True
    for g in goals:
        v = evaluate_subgoal(task, record, g, verdict)
        w = weights.get(g.kind, g.weight)
        comps[f"subgoal/{g.id}"] = v
        num, den = num + w * v, den + w
        required_ok = required_ok and (v == 1.0 or not g.required)
    frac = num / den if den > 0 else 0.0
    bad = forbidden_calls(task, record)
    asks = [g for g in goals if g.kind == "asked"]
    all_gates = {
        "no_forbidden": not bad,
        "confirmed_before_write": _confirmed_before_write(task, record, {}),
        "state_match": evaluate_subgoal(task, record, SubGoal(id="s", kind="state_match")) == 1.0,
        "no_error": record.termination != "error",
        "required_interactions": all(comps[f"subgoal/{g.id}"] == 1.0 for g in asks),
        "tool_response": bool(_ok_calls(record)),
        "clean_end": record.termination in CLEAN_ENDS,
    }
    gates = {g: all_gates[g] for g in config.gates}
    total = frac if required_ok and all(gates.values()) else 0.0
    comps.update({
        "diag/subgoal_fraction": frac, "diag/forbidden_calls": float(len(bad)),
        "diag/required_met": float(required_ok),
        "diag/n_writes": float(sum(1 for c in _ok_calls(record) if c.get("kind") == "write")),
        "diag/tool_errors": float(record.counters.get("tool_errors", 0)),
        "diag/malformed_turns": float(record.counters.get("malformed_turns", 0)),
        "diag/agent_turns": float(record.agent_turns), "diag/transferred": float(record.transferred),
    })
    if use_judge:
        comps["diag/judge_unknown"] = float(verdict is None)
    for g, v in all_gates.items():
        comps[f"diag/gate_{g}"] = float(v)
    return Reward(total=float(min(1.0, max(0.0, total))), components=comps, gates=gates)
