"""How the policy fails, per branch type: a diagnostic over runs' failure files (not in `run_all`).

A training task whose GRPO group failed is written to <run>/failures/round_<r+1>.jsonl with the group's worst
episode (the flywheel's input). This reads those episodes and sorts each against the task's gold actions:

  no write, <error>            the gold path ends in a write the agent never made, after a call of its failed:
                               `id not found` (a mis-copied ID looked up), `malformed call` (unparseable
                               <tool_call>), `bad call` (unknown tool or argument, missing argument)
  no write (<termination>)     the same without a failed call (it stopped, transferred, ...)
  wrong write tool             it wrote with another tool than the gold write
  write, wrong <kinds>         the gold write's tool, with arguments that differ: `choice` (a value from the
                               parameter's enum, e.g. the payee the user named), `id` (another string, e.g. an
                               account ID), `number` (an amount); several kinds are joined with "+"
  write, args right            the gold write was made as gold, but another gate failed (an extra call, ...)
  wrote, gold has none         the gold path makes no write (refusal, transfer, a declined confirmation) and
                               the agent wrote anyway (e.g. gave in to the user)
  no write as gold, <what>     the same gold path, no write (right), and what failed: reward gates (e.g.
                               gate tool_response: a reply that misstates what a tool returned), else unmet
                               sub-goals (e.g. subgoal confirm: it never asked the user to confirm),
                               plus "malformed" when a turn could not be parsed

Why: the success reward says *that* an episode failed; this says *where*, which decides the lever (a group
whose samples all mis-copy one argument needs a better copier, not more partial credit).

Usage: python benchmarks/failure_modes.py RUN_DIR [RUN_DIR ...] [--rounds 1 2] [--json]
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os


def _write_tools(task: dict) -> set[str]:
    return {t["name"] for t in task["tools"] if t.get("kind") == "write"}


def _arg_kind(task: dict, tool: str, name: str, value) -> str:
    spec = next(t for t in task["tools"] if t["name"] == tool)["parameters"]["properties"].get(name, {})
    if "enum" in spec:
        return "choice"
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else "id"


def _error_kind(content) -> str | None:
    """A tool message's error, by kind (None when the call succeeded)."""
    try:
        err = json.loads(content).get("error") if isinstance(content, str) else None
    except (ValueError, AttributeError):
        return None
    if not err:
        return None
    return "id not found" if "not found" in err else "malformed call" if err.startswith("malformed") else "bad call"


def _subgoal(name: str) -> str:
    """confirm_send_payment -> confirm, ask_account_id -> ask: one mode across domains."""
    return name.split("_", 1)[0] if name.startswith(("confirm_", "ask_")) else name


def failure_mode(task: dict, episode: dict) -> str:
    """One failed episode's mode (see the module docstring)."""
    writes = _write_tools(task)
    gold = [g for g in task.get("gold_actions") or [] if g["name"] in writes]
    made = [tc["function"] for m in episode["messages"] for tc in m.get("tool_calls") or []
            if tc["function"]["name"] in writes]
    if not gold:
        if made:
            return "wrote, gold has none"
        comp = episode.get("components") or {}
        what = [f"gate {k[len('diag/gate_'):]}" for k, v in sorted(comp.items())
                if k.startswith("diag/gate_") and not v]
        what = what or sorted({"subgoal " + _subgoal(k[len("subgoal/"):]) for k, v in comp.items()
                               if k.startswith("subgoal/") and not v})
        what += ["malformed"] * bool(comp.get("diag/malformed_turns"))
        return "no write as gold, " + " + ".join(what or ["?"])
    if not made:
        errors = [_error_kind(m.get("content")) for m in episode["messages"] if m["role"] == "tool"]
        errors = [e for e in errors if e]
        return f"no write, {errors[0]}" if errors else f"no write ({episode.get('termination', '?')})"
    want, got = gold[-1], made[-1]
    if got["name"] != want["name"]:
        return "wrong write tool"
    args = got["arguments"] if isinstance(got["arguments"], dict) else {}
    wrong = sorted({_arg_kind(task, want["name"], k, v) for k, v in want["arguments"].items() if args.get(k) != v})
    return "write, wrong " + "+".join(wrong) if wrong else "write, args right"


def count_modes(paths: list[str]) -> dict[str, collections.Counter]:
    """branch type -> Counter of modes over the agentic failure records in `paths`."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in paths:
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("type") != "agentic" or not rec.get("episode"):
                    continue
                task = rec["task"]
                out[task["branch"]["branch_type"]][failure_mode(task, rec["episode"])] += 1
    return dict(out)


def table(modes: dict[str, collections.Counter]) -> str:
    lines = []
    for bt in sorted(modes):
        n = sum(modes[bt].values())
        lines.append(f"{bt}: {n} failed groups (worst episode of each)")
        lines += [f"  {c:5d} {c / n:6.1%}  {m}" for m, c in modes[bt].most_common()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (or globs) holding failures/round_*.jsonl")
    ap.add_argument("--rounds", type=int, nargs="*", help="failure files of these rounds only (default: all)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    paths = []
    for pattern in args.runs:
        for run in sorted(glob.glob(pattern)) or [pattern]:
            files = sorted(glob.glob(os.path.join(run, "failures", "round_*.jsonl")))
            if args.rounds:
                files = [p for p in files if int(p.rsplit("_", 1)[1].split(".")[0]) in args.rounds]
            paths += files
    if not paths:
        raise SystemExit(f"no failures/round_*.jsonl under {args.runs}")
    modes = count_modes(paths)
    print(json.dumps({bt: dict(c) for bt, c in modes.items()}) if args.json else table(modes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
