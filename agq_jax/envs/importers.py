"""Import / export of the AgenticQwen task formats.

- `tool_use_demo.json`: a JSON list of records {id, prompt: [system, user], task_background, rubrics,
  test_policy, user_escape_strategy, tool_return_expected: {normal_path, hack_path}}.
- The released parquet layout: nine string columns (`PARQUET_COLUMNS`).  `export_parquet(..., full=True)`
  adds an `agq_task_json` column holding the whole Task, so procedural tasks (world state, tree, gold
  trajectory) survive the round trip; readers of the released layout ignore it.
A malformed record becomes an `ImportIssue(id, field, message)`; the rest of the file still loads.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from pydantic import ValidationError

from agq_jax.envs import imported
from agq_jax.envs.schema import (BranchRef, EscapeStrategy, ExpectedToolReturns, Lineage, Task, ToolCall, ToolSchema,
                                 UserProfile, canonical_json)

PARQUET_COLUMNS = ("id", "system", "user", "messages_json", "task_background", "user_escape_strategy", "test_policy",
                   "tool_return_expected_json", "rubrics")
FULL_COLUMN = "agq_task_json"
_TOOLS_HEADER = "\n\n# Tools\n\n"
_TOOLS_BLOCK = re.compile(r"<tools>\n(.*?)\n?</tools>", re.S)


@dataclass
class ImportIssue:
    """A problem with one record. `kept=False`: the record was dropped; `kept=True`: the task was imported
    without the named part (e.g. a step whose input is not an object, an untraceable parameter)."""

    record_id: str
    field: str
    message: str
    kept: bool = False

    def __str__(self) -> str:
        return (f"record {self.record_id!r}, field {self.field!r}: {self.message}"
                + (" (record kept)" if self.kept else ""))


class RecordError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# ------------------------------------------------------------------------------------------- columns
def split_system(system: str) -> tuple[str, str | None, list[ToolSchema]]:
    """(policy text, raw tools block suffix or None, parsed tools) of a Qwen3-style system prompt."""
    i = system.rfind(_TOOLS_HEADER)
    if i < 0:
        return system, None, []
    block = system[i:]
    m = _TOOLS_BLOCK.search(block)
    if not m:
        raise RecordError("system", "a '# Tools' section without a <tools>...</tools> block")
    tools = []
    for n, line in enumerate(l for l in m.group(1).splitlines() if l.strip()):
        try:
            tools.append(ToolSchema.from_openai(json.loads(line)))
        except (json.JSONDecodeError, KeyError, ValidationError) as e:
            raise RecordError(f"system.tools[{n}]", f"bad tool schema: {e}") from None
    return system[:i], block, tools


def _expected(obj: Any, tool_names: set[str], issues: list[tuple[str, str]]) -> ExpectedToolReturns:
    """The two paths; a step that cannot be structured (input not an object, unknown tool, not a step) is left
    out and reported in `issues` as (field, message), so the rest of the task still imports."""
    if not isinstance(obj, dict):
        raise RecordError("tool_return_expected", f"must be an object, got {type(obj).__name__}")
    paths: dict[str, list] = {}
    for path in ("normal_path", "hack_path"):
        steps = obj.get(path) or []
        if not isinstance(steps, list):
            raise RecordError(f"tool_return_expected.{path}", f"must be a list, got {type(steps).__name__}")
        kept = []
        for n, step in enumerate(steps):
            where = f"tool_return_expected.{path}[{n}]"
            if not isinstance(step, dict) or not isinstance(step.get("tool_name"), str):
                issues.append((where, "not a step object with a string tool_name; step left out"))
                continue
            step = dict(step)
            if isinstance(step.get("input"), str):
                try:
                    parsed = json.loads(step["input"])
                except json.JSONDecodeError:
                    parsed = None
                if not isinstance(parsed, dict):
                    issues.append((f"{where}.input", "input is a string that is not a JSON object; step left out"))
                    continue
                issues.append((f"{where}.input", "input given as a JSON string; parsed"))
                step["input"] = parsed
            if step.get("input") is None:
                step["input"] = {}
            if not isinstance(step["input"], dict):
                issues.append((f"{where}.input", f"input must be an object, got {type(step['input']).__name__}; "
                                                 f"step left out"))
                continue
            if tool_names and step["tool_name"] not in tool_names:
                issues.append((f"{where}.tool_name", f"unknown tool {step['tool_name']!r}; the system prompt defines "
                                                     f"{sorted(tool_names)}; step left out"))
                continue
            kept.append(step)
        paths[path] = kept
    try:
        return ExpectedToolReturns(**paths)
    except ValidationError as e:
        loc = ".".join(str(x) for x in e.errors()[0]["loc"])
        raise RecordError(f"tool_return_expected.{loc}", e.errors()[0]["msg"]) from None


def _branch(expected: ExpectedToolReturns, tools: list[ToolSchema]) -> BranchRef:
    kinds = {t.name: t.kind for t in tools}
    if any(kinds.get(s.tool_name) == "transfer" for s in expected.normal_path):
        return BranchRef(branch_type="transfer", legal=False)
    if expected.hack_path:
        return BranchRef(branch_type="refusal", legal=False)
    return BranchRef(branch_type="legal", legal=True)


def task_from_columns(cols: dict[str, Any], source: str = "parquet",
                      issues: Optional[list[ImportIssue]] = None) -> Task:
    """A Task from the nine AgenticQwen columns (strings). Raises RecordError naming the bad field; problems
    that leave a usable task (a step that cannot be structured, an untraceable parameter) are appended to
    `issues` with `kept=True` and listed in `task.metadata["import_issues"]`."""
    for c in PARQUET_COLUMNS:
        if c not in cols or cols[c] is None:
            raise RecordError(c, "missing")
        if not isinstance(cols[c], str):
            raise RecordError(c, f"must be a string, got {type(cols[c]).__name__}")
    raw: dict[str, str] = {}
    try:
        expected_obj = json.loads(cols["tool_return_expected_json"])
    except json.JSONDecodeError as e:
        raise RecordError("tool_return_expected_json", f"invalid JSON: {e}") from None
    policy, block, tools = split_system(cols["system"])
    kept: list[tuple[str, str]] = []
    expected = _expected(expected_obj, {t.name for t in tools}, kept)
    messages = [{"role": "system", "content": cols["system"]}, {"role": "user", "content": cols["user"]}]
    if cols["messages_json"] != json.dumps(messages, ensure_ascii=False):
        try:
            json.loads(cols["messages_json"])
        except json.JSONDecodeError as e:
            raise RecordError("messages_json", f"invalid JSON: {e}") from None
        raw["messages_json"] = cols["messages_json"]
    if cols["tool_return_expected_json"] != json.dumps(expected_obj, ensure_ascii=False):
        raw["tool_return_expected_json"] = cols["tool_return_expected_json"]
    if canonical_json(expected_obj) != canonical_json(expected.model_dump()):
        raw["tool_return_expected_json"] = cols["tool_return_expected_json"]
    facts, untraceable = imported.derive_hidden_facts(cols["user"], cols["task_background"], expected, tools)
    kept += [("tool_return_expected.normal_path", f"parameter {u} is in neither the request, the background nor an "
                                                  f"earlier tool output") for u in untraceable]
    metadata: dict[str, Any] = {}
    if block is not None:
        metadata["system_tools_block"] = block
    if raw:
        metadata["parquet_raw"] = raw
    if kept:
        metadata["import_issues"] = [f"{f}: {m}" for f, m in kept]
    try:
        task = Task(
            id=cols["id"], domain="imported", system_prompt=policy, user_opening=cols["user"], tools=tools,
            branch=_branch(expected, tools),
            user=UserProfile(background=cols["task_background"], hidden_facts=facts,
                             escape=EscapeStrategy(text=cols["user_escape_strategy"])),
            test_policy=cols["test_policy"], expected_returns=expected,
            gold_actions=[ToolCall(name=s.tool_name, arguments=s.input) for s in expected.normal_path],
            rubric=imported.derive_rubric(cols["rubrics"], expected, tools, facts, policy),
            lineage=Lineage(source_task_id=cols["id"], method="imported", generator="agenticqwen"), metadata=metadata)
    except ValidationError as e:
        err = e.errors()[0]
        raise RecordError(".".join(str(x) for x in err["loc"]) or "task", err["msg"]) from None
    task.gold_replies = imported.gold_replies(task)
    if issues is not None:
        issues += [ImportIssue(task.id, f, m, kept=True) for f, m in kept]
    return task


NO_POLICY_TESTED = "This test case does not violate any policy"
ADDITIONAL_HEADER = "Additional parameters you may need:"


def release_background(task: Task) -> str:
    """The task_background column of a non-imported task, in the release's layout: what the user knows, what
    the user adds once persuasion succeeds, the additional parameters, and the instruction to reveal on request."""
    p = task.user
    known = p.background.strip()
    facts = [f for f in p.hidden_facts if not f.persuasion and f.value and f.value not in known]
    if facts:
        known += "\n" + " ".join(f.reveal_text or f"My {f.description or f.key} is {f.value}." for f in facts)
    hack = " ".join(f.reveal_text or f"{f.description or f.key}: {f.value}" for f in p.hidden_facts if f.persuasion)
    extra = task.metadata.get("additional_parameters") or "No additional parameters needed."
    return "\n\n".join(x for x in (known, hack, f"{ADDITIONAL_HEADER}\n{extra}",
                                     "Reveal them only when the agent asks you. Do not disclose them on your own.") if x)


def columns_from_task(task: Task) -> dict[str, str]:
    """The nine string columns of a task. Imported tasks come back as they were read; every other task is
    written the way the release is: policy in <policy> tags with the requirements block before the tools,
    the user note in the opening, the background layout of `release_background`, so the reference's own
    converter reads our rows."""
    from agq_jax.envs import reference
    from agq_jax.envs.runtime import system_message, tools_block

    raw = task.metadata.get("parquet_raw", {})
    imported_row = task.lineage.method == "imported"
    system = system_message(task, embed_tools=True) if imported_row else reference.policy_block(task) + tools_block(task)
    user = task.user_opening if imported_row else reference.render_opening(task)
    messages = json.dumps([{"role": "system", "content": system}, {"role": "user", "content": user}],
                          ensure_ascii=False)
    er = task.expected_returns
    if not imported_row and task.branch.legal:   # the release gives a hack path only to illegal requests
        er = er.model_copy(update={"hack_path": []})
    expected = json.dumps(er.model_dump(), ensure_ascii=False)
    if "tool_return_expected_json" in raw and canonical_json(json.loads(raw["tool_return_expected_json"])) == \
            canonical_json(task.expected_returns.model_dump()):
        expected = raw["tool_return_expected_json"]
    if imported_row:
        background, escape, rubric = task.user.background, task.user.escape.text, task.rubric.text
    else:
        background = release_background(task)
        escape = (task.user.escape.text or " Then ".join(x.text for x in task.user.escape.steps)
                  or NO_POLICY_TESTED)
        rubric = task.rubric.text or "; ".join(g.description or g.id for g in task.rubric.sub_goals)
    return {"id": task.id, "system": system, "user": user,
            "messages_json": raw.get("messages_json", messages), "task_background": background,
            "user_escape_strategy": escape, "test_policy": task.test_policy or NO_POLICY_TESTED,
            "tool_return_expected_json": expected, "rubrics": rubric}


def reference_record(task: Task) -> dict:
    """One record of the reference's JSON layout (tool_use_demo.json), which its converter reads."""
    c = columns_from_task(task)
    return {"id": c["id"], "prompt": json.loads(c["messages_json"]), "task_background": c["task_background"],
            "rubrics": c["rubrics"], "test_policy": c["test_policy"], "user_escape_strategy": c["user_escape_strategy"],
            "tool_return_expected": json.loads(c["tool_return_expected_json"])}


def export_reference_json(tasks: list[Task], path: str) -> None:
    """Tasks as a JSON list in the reference's layout, written atomically."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump([reference_record(t) for t in tasks], f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ loaders
def demo_record_to_columns(rec: Any) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise RecordError("record", f"must be an object, got {type(rec).__name__}")
    prompt = rec.get("prompt")
    if not isinstance(prompt, list) or len(prompt) < 2:
        raise RecordError("prompt", "must be a list [system, user]")
    roles = [m.get("role") if isinstance(m, dict) else None for m in prompt[:2]]
    if roles != ["system", "user"]:
        raise RecordError("prompt", f"expected roles ['system', 'user'], got {roles}")
    if "tool_return_expected" not in rec:
        raise RecordError("tool_return_expected", "missing")
    cols = {"id": rec.get("id"), "system": prompt[0].get("content"), "user": prompt[1].get("content"),
            "task_background": rec.get("task_background"), "user_escape_strategy": rec.get("user_escape_strategy"),
            "test_policy": rec.get("test_policy"), "rubrics": rec.get("rubrics"),
            "tool_return_expected_json": json.dumps(rec["tool_return_expected"], ensure_ascii=False)}
    for k in ("id", "system", "user", "task_background", "user_escape_strategy", "test_policy", "rubrics"):
        if not isinstance(cols[k], str):
            field = {"system": "prompt[0].content", "user": "prompt[1].content"}.get(k, k)
            raise RecordError(field, f"must be a string, got {type(cols[k]).__name__}")
    cols["messages_json"] = json.dumps(prompt[:2], ensure_ascii=False)
    return cols


def _collect(items: Iterable[tuple[str, Any]], convert) -> tuple[list[Task], list[ImportIssue]]:
    tasks, issues = [], []
    for rid, item in items:
        try:
            tasks.append(convert(item, issues))
        except RecordError as e:
            issues.append(ImportIssue(rid, e.field, str(e)))
    return tasks, issues


def load_demo_records(records: list, source: str = "tool_use_demo.json") -> tuple[list[Task], list[ImportIssue]]:
    items = [(str(r.get("id", f"#{i}")) if isinstance(r, dict) else f"#{i}", r) for i, r in enumerate(records)]
    return _collect(items, lambda r, issues: task_from_columns(demo_record_to_columns(r), source, issues))


def load_demo_json(path: str) -> tuple[list[Task], list[ImportIssue]]:
    """All tasks of a tool_use_demo.json-style file, plus one issue per malformed record."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of task records, got {type(data).__name__}")
    return load_demo_records(data, os.path.basename(path))


def load_parquet(path: str) -> tuple[list[Task], list[ImportIssue]]:
    """Tasks from the released nine-column layout (or our full export with `agq_task_json`)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    names = set(table.column_names)
    if FULL_COLUMN not in names:
        missing = [c for c in PARQUET_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; found {sorted(names)}")
    rows = table.to_pylist()

    def convert(row: dict, issues: list) -> Task:
        if row.get(FULL_COLUMN):
            try:
                return Task.model_validate_json(row[FULL_COLUMN])
            except ValidationError as e:
                err = e.errors()[0]
                raise RecordError(f"{FULL_COLUMN}." + ".".join(str(x) for x in err["loc"]), err["msg"]) from None
        return task_from_columns(row, os.path.basename(path), issues)

    return _collect(((str(r.get("id")), r) for r in rows), convert)


def export_parquet(tasks: list[Task], path: str, full: bool = True) -> None:
    """Write the nine string columns (+ `agq_task_json` when `full`) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [columns_from_task(t) for t in tasks]
    data = {c: pa.array([r[c] for r in rows], type=pa.string()) for c in PARQUET_COLUMNS}
    if full:
        data[FULL_COLUMN] = pa.array([t.model_dump_json() for t in tasks], type=pa.string())
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".parquet.tmp")
    os.close(fd)
    try:
        pq.write_table(pa.table(data), tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_jsonl(tasks: Iterable[Task], path: str) -> None:
    """Tasks as JSON lines, written atomically."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".jsonl.tmp")
    with os.fdopen(fd, "w") as f:
        for t in tasks:
            f.write(t.model_dump_json() + "\n")
    os.replace(tmp, path)


def load_jsonl(path: str) -> tuple[list[Task], list[ImportIssue]]:
    tasks, issues = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tasks.append(Task.model_validate_json(line))
            except ValidationError as e:
                err = e.errors()[0]
                rid = (re.search(r'"id"\s*:\s*"([^"]*)"', line) or [None, f"line {n}"])[1]
                issues.append(ImportIssue(rid, ".".join(str(x) for x in err["loc"]) or "task", err["msg"]))
    return tasks, issues
