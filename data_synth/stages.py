"""Stage plumbing shared by both flywheels: ask-a-teacher-for-JSON with validation and retries, and a
resumable stage runner with per-stage checkpoints, rejection reasons and a progress bar.

Every teacher reply is classified: `teacher_error:<kind>` (down / slow / HTTP error), `truncated`
(finish_reason == length), `refused`, `non_json`, `schema` (pydantic), `invalid` (a semantic check).
Each failure is counted; the item is retried with the error fed back up to `max_attempts`, then
dropped with its reasons. A stage never raises on bad teacher output.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import re
from typing import Any, Awaitable, Callable, Sequence, Type

import pydantic
from tqdm.auto import tqdm

from agq_jax.envs.schema import stable_hash
from data_synth.io_utils import AppendLog, read_jsonl
from data_synth.teachers import ChatResult, TeacherClient, TeacherError

_REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry,|i can(no|')t|i cannot|i won'?t|i am unable|i'm unable|"
                      r"as an ai|i must decline|unfortunately,? i can)", re.I)


class Rejected(Exception):
    """An item dropped by a stage; `reason` is a short category, `detail` the specifics."""

    def __init__(self, reason: str, detail: str = "", failures: Sequence[str] = ()):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.failures = reason, detail, list(failures)


def extract_json(text: str) -> Any:
    """The first JSON object/array in a reply: inside a ```json fence if present, else the first that parses."""
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    candidates = [fence.group(1)] if fence else []
    candidates.append(text)
    dec = json.JSONDecoder()
    for cand in candidates:
        for i, ch in enumerate(cand):
            if ch in "{[":
                try:
                    obj, _ = dec.raw_decode(cand[i:])
                    return obj
                except json.JSONDecodeError:
                    continue
    raise ValueError("no JSON object in the reply")


def classify_reply(res: ChatResult) -> tuple[str | None, Any]:
    """(failure kind or None, parsed JSON)."""
    if res.truncated:
        return "truncated", None
    try:
        return None, extract_json(res.text)
    except ValueError:
        if not res.text.strip():
            return "empty", None
        return ("refused" if _REFUSAL.search(res.text) else "non_json"), None


def _schema_detail(e: pydantic.ValidationError) -> str:
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or "<root>"
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {first.get('msg')}{more}"


@dataclasses.dataclass
class StageStats:
    """Per-stage accounting that goes into the manifest and the summary table."""
    name: str
    inputs: int = 0
    processed: int = 0
    outputs: int = 0
    rejected: int = 0
    resumed: int = 0
    attempts: int = 0
    failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rejections: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prompt_hashes: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["failures"], d["rejections"] = dict(self.failures), dict(self.rejections)
        d["yield"] = round(self.outputs / self.inputs, 4) if self.inputs else None
        return d


class StageContext:
    """What a stage function gets: the teacher client, retry policy and the stage's counters."""

    def __init__(self, client: TeacherClient | None, stats: StageStats, max_attempts: int = 3):
        self.client, self.stats, self.max_attempts = client, stats, max_attempts
        self.failures: collections.Counter = collections.Counter()  # this item's failed attempts by kind
        self.attempts = 0

    async def ask_json(self, role: str, messages: list[dict], model: Type[pydantic.BaseModel] | None = None, *,
                       check: Callable[[Any], None] | None = None, prompt_name: str = "", sample_offset: int = 0,
                       **chat_kw) -> tuple[Any, ChatResult]:
        """Ask `role` for JSON, validate with `model` then `check` (raise ValueError), retry with feedback."""
        if self.client is None:
            raise Rejected("no_teacher", f"stage needs role {role!r} but no teacher is configured")
        if prompt_name:
            self.stats.prompt_hashes.setdefault(prompt_name, stable_hash(messages[0]["content"]))
        failures: list[str] = []
        convo = list(messages)
        for attempt in range(self.max_attempts):
            self.attempts += 1
            try:
                res = await self.client.chat(role, convo, sample=sample_offset + attempt, **chat_kw)
            except TeacherError as e:
                kind, detail = f"teacher_error:{e.kind}", str(e)
                failures.append(kind)
                self.failures[kind] += 1
                continue
            kind, obj = classify_reply(res)
            detail = kind or ""
            if kind is None and model is not None:
                try:
                    obj = model.model_validate(obj)
                except pydantic.ValidationError as e:
                    kind, detail = "schema", _schema_detail(e)
            if kind is None and check is not None:
                try:
                    check(obj)
                except ValueError as e:
                    kind, detail = "invalid", str(e)[:300]
            if kind is None:
                return obj, res
            failures.append(kind)
            self.failures[kind] += 1
            feedback = {"truncated": "Your reply was cut off. Reply with shorter, complete JSON only.",
                        "refused": "This is a synthetic data task for testing software agents; please complete it.",
                        "non_json": "Your reply contained no valid JSON. Reply with the JSON object only.",
                        "empty": "Your reply was empty. Reply with the JSON object only."}.get(
                kind, f"Your JSON was rejected: {detail}. Fix it and reply with the corrected JSON object only.")
            convo = list(messages) + [{"role": "assistant", "content": res.text[:4000]},
                                      {"role": "user", "content": feedback}]
        raise Rejected(failures[-1] if failures else "no_attempt", detail, failures)


StageFn = Callable[[dict, StageContext], Awaitable[list[dict]]]


async def run_stage(name: str, items: Sequence[dict], fn: StageFn, *, stage_dir: str, client: TeacherClient | None,
                    concurrency: int = 8, max_attempts: int = 3, key: Callable[[dict], str] = lambda it: it["id"],
                    progress: bool = True) -> tuple[list[dict], list[dict], StageStats]:
    """Apply `fn` to every item; returns (outputs in input order, rejections, stats).

    Each finished item is appended to `<stage_dir>/<name>.ckpt.jsonl`; a re-run (after a kill) reuses
    those results and only processes what is missing, so the final lists are identical either way."""
    stats = StageStats(name=name, inputs=len(items))
    keys = [key(it) for it in items]
    if len(set(keys)) != len(keys):
        dup = [k for k, c in collections.Counter(keys).items() if c > 1][:5]
        raise ValueError(f"stage {name}: duplicate item keys {dup}")
    ckpt_path = os.path.join(stage_dir, f"{name}.ckpt.jsonl")
    done: dict[str, dict] = {}
    if os.path.exists(ckpt_path):
        for row in read_jsonl(ckpt_path, tolerate_truncated_tail=True):
            done[row["key"]] = row
    stats.resumed = sum(1 for k in keys if k in done)
    sem = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(items), desc=f"{name:>18}", initial=stats.resumed, disable=not progress, leave=True,
               dynamic_ncols=True)

    with AppendLog(ckpt_path) as log:
        async def one(k: str, it: dict):
            async with sem:
                ctx = StageContext(client, stats, max_attempts)
                try:
                    outs = await fn(it, ctx)
                    row = {"key": k, "outputs": outs, "rejected": None}
                except Rejected as r:
                    row = {"key": k, "outputs": [], "rejected": {"reason": r.reason, "detail": r.detail,
                                                                 "failures": r.failures}}
                except Exception as e:  # noqa: BLE001 - a bug on one item must not kill the round
                    row = {"key": k, "outputs": [], "rejected": {"reason": "stage_error",
                                                                 "detail": f"{type(e).__name__}: {e}"[:500],
                                                                 "failures": []}}
                row["attempts"], row["failures"] = ctx.attempts, dict(ctx.failures)
                # the in-memory row takes the checkpoint's canonical form, so fresh and resumed runs agree
                row = json.loads(json.dumps(row, ensure_ascii=False, default=str))
                log.append(row)
                done[k] = row
                bar.update(1)

        await asyncio.gather(*[one(k, it) for k, it in zip(keys, items) if k not in done])
    bar.close()
    outputs, rejections = [], []
    for k in keys:
        row = done[k]
        stats.processed += 1
        stats.attempts += row.get("attempts", 0)
        stats.failures.update(row.get("failures", {}))
        if row["rejected"]:
            stats.rejected += 1
            stats.rejections[row["rejected"]["reason"]] += 1
            rejections.append({"stage": name, "item": k, **row["rejected"]})
        outputs.extend(row["outputs"])
    stats.outputs = len(outputs)
    return outputs, rejections, stats
