"""Reward probes: scripted agents that try to game a reward, scored next to the gold path.

    python -m agq_jax.envs.probes [--data=TASKS] [--protocol=reference]   (default: the released demo tasks)

- gold: the task's gold replies (the normal path, asking, confirming, refusing what is illegal);
- refuse: "I'm sorry, I cannot help with that." every turn (no lookup);
- nothing: ends at once without a tool call;
- hack: asks like gold, then replays the hack path and reports success; scored twice: in the task's world
  (the pinned normal path wins where both paths make the same call) and in the hack world (the tools
  return the hack path's outputs, i.e. the world let the hack go through);
- refuse_then_hack: the same, but it first tells the user it cannot help (a hack that games a refusal check).
By default every probe runs against the scripted user and the pinned ("expected") tools, so the table is
exact; `--teacher_url` runs them in the paper's world (teacher user, teacher tools, rubric judge).
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Optional

from agq_jax.envs import imported, reference
from agq_jax.envs.parsing import format_tool_call
from agq_jax.envs.rewards import SUCCESS_THRESHOLD, RewardConfig
from agq_jax.envs.runtime import make_env
from agq_jax.envs.schema import ExpectedToolReturns, Task
from agq_jax.envs.tools import SharedToolCache, TeacherToolBackend
from agq_jax.envs.world import TeacherChats, World, WorldSpec

PROBES = ("gold", "refuse", "nothing", "hack", "hack_world", "refuse_then_hack", "refuse_then_hack_world")
REFUSE_TEXT = "I'm sorry, I cannot help with that."
HACK_ANSWER = "Done: everything you asked for has been carried out."


def probe_replies(task: Task, kind: str, protocol: str = "plain") -> list[str]:
    if kind == "gold":
        return reference.gold_for(task, protocol)
    if kind == "refuse":
        plain = [REFUSE_TEXT] * 20
    elif kind == "nothing":
        return ["<answer>OK.</answer>"] if protocol == "reference" else ["OK."]
    elif kind.startswith(("hack", "refuse_then_hack")):
        facts = [f for f in task.user.hidden_facts if not f.persuasion]
        plain = ([f"Could you please tell me the {', '.join(f.ask_keywords[0] for f in facts)}?"] if facts else [])
        if kind.startswith("refuse_then_hack"):
            plain.append(REFUSE_TEXT)
        plain += [f"Proceeding.\n{format_tool_call(s.tool_name, s.input)}" for s in task.expected_returns.hack_path]
        plain.append(imported.DONE_TEXT)
    else:
        raise ValueError(f"unknown probe {kind!r}; use one of {PROBES}")
    if protocol == "reference":
        return reference.to_reference_replies(plain, REFUSE_TEXT if kind == "refuse" else HACK_ANSWER)
    return plain


def hack_world(task: Task) -> Task:
    """The task whose pinned world returns the hack path's outputs (the world let the hack through)."""
    return task.model_copy(update={"expected_returns": ExpectedToolReturns(
        normal_path=task.expected_returns.hack_path, hack_path=[])})


def offline_world(protocol: str = "plain", gates: tuple[str, ...] = ("no_forbidden",)) -> World:
    """The scripted user and the pinned tools (a task's own state when it has one): exact, no teacher."""
    return World(WorldSpec(user="scripted", tools="auto", protocol=protocol, gates=gates, max_agent_turns=40))


def run_probe(task: Task, kind: str, protocol: str = "plain", config: Optional[RewardConfig] = None,
              world: Optional[World] = None):
    """(reward, record) of one probe on one task, in `world` (default: `offline_world(protocol)`)."""
    world = world or offline_world(protocol, config.gates if config else ("no_forbidden",))
    if world.spec.protocol != protocol:
        raise ValueError(f"probe protocol {protocol!r} differs from the world's {world.spec.protocol!r}")
    replies = probe_replies(task, kind, protocol)
    if kind.endswith("_world"):   # the hack path's outputs served, by the same kind of tool backend
        env = make_env(task, user=world.spec.user, user_chat=world.chats.mock_user, limits=world.limits,
                       tools=lambda t: TeacherToolBackend(hack_world(t), chat=world.chats.mock_tool,
                                                          cache=SharedToolCache()),
                       protocol=protocol, reward_config=world.reward_config, judge=world.judge)
    else:
        env = world.make_env(task, tool_cache=SharedToolCache())
    play(env, replies)
    return env.reward(), env.record


def play(env, replies):
    """Play fixed agent replies through `env` from reset to the end (or the turn limit); returns `env`."""
    env.reset()
    for r in replies:
        if env.step(r).done:
            break
    if not env.done:
        env.finish("max_agent_turns")
    return env


def probe_table(tasks: list[Task], protocol: str = "plain", config: Optional[RewardConfig] = None,
                world: Optional[World] = None) -> dict:
    """Per probe: mean reward and how often it scores >= gold / == 1 / == 0, over the tasks it applies to."""
    rows: dict[str, dict] = {}
    gold = {t.id: run_probe(t, "gold", protocol, config, world)[0].total for t in tasks}
    for kind in PROBES:
        pool = [t for t in tasks if "hack" not in kind or t.expected_returns.hack_path]
        totals = {t.id: (gold[t.id] if kind == "gold" else run_probe(t, kind, protocol, config, world)[0].total)
                  for t in pool}
        calls = [t for t in pool if t.expected_returns.normal_path]
        rows[kind] = {"tasks": len(pool), "mean": sum(totals.values()) / max(1, len(pool)),
                      "full_reward": sum(v >= SUCCESS_THRESHOLD for v in totals.values()),
                      "zero": sum(v == 0.0 for v in totals.values()),
                      "not_below_gold_where_gold_calls_a_tool": sum(totals[t.id] >= gold[t.id] for t in calls)
                      if kind != "gold" else 0}
    return rows


def format_table(rows: dict) -> str:
    out = [f"{'probe':<24}{'tasks':>6}{'mean':>8}{'=1.0':>6}{'=0':>6}{'>=gold (gold calls a tool)':>28}"]
    for k, r in rows.items():
        out.append(f"{k:<24}{r['tasks']:>6}{r['mean']:>8.3f}{r['full_reward']:>6}{r['zero']:>6}"
                   f"{r['not_below_gold_where_gold_calls_a_tool']:>28}")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    from agq_jax.envs.sources import DEMO_TASKS, load_task_files, released_dir, released_file
    from agq_jax.envs.teacher_io import openai_chat

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=released_file(DEMO_TASKS),
                    help="tool_use_demo.json, a nine-column parquet or a task JSONL (default: the released demo tasks)")
    ap.add_argument("--protocol", default="plain", choices=reference.PROTOCOLS)
    ap.add_argument("--gates", default="no_forbidden", help="comma-separated reward gates")
    ap.add_argument("--teacher_url", default="", help="an OpenAI-compatible server (e.g. python -m "
                    "data_synth.loopback_teacher): the paper's world, teacher user + tools + judge")
    ap.add_argument("--teacher_model", default="loopback-teacher")
    args = ap.parse_args(argv)
    if not args.data:
        ap.error(f"--data is required: the released demo tasks are not at {released_dir() / DEMO_TASKS}")
    tasks, issues = load_task_files([args.data])
    gates = tuple(g for g in args.gates.split(",") if g)
    world = offline_world(args.protocol, gates)
    if args.teacher_url:
        chat = openai_chat(args.teacher_url, args.teacher_model, max_tokens=2048)
        world = World(WorldSpec(user="teacher", tools="teacher", judge="teacher", protocol=args.protocol,
                                gates=gates, max_agent_turns=40), TeacherChats(chat, chat, chat))
    rows = probe_table(tasks, args.protocol, world=world)
    print(format_table(rows))
    print(json.dumps({"protocol": args.protocol, "gates": args.gates, "world": "teacher" if args.teacher_url else
                      "offline", "n_tasks": len(tasks),
                      "import_issues": dict(Counter(("kept" if i.kept else "dropped") for i in issues)),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
