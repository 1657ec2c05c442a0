"""Atomic file writes, JSONL helpers and stable hashing shared by the flywheels.

Every dataset file is written to a temp file in the same directory and moved into place with
os.replace, so a killed process never leaves a half-written dataset behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Iterator


def atomic_write_text(path: str, text: str) -> None:
    """Write text to path via temp file + fsync + os.replace."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str, rows: Iterable[Any]) -> int:
    """Rows keep their key order: a task's tool schemas are rendered into the prompt in stored order, so a
    dataset round trip must give the model the same prompt the task had when it was generated."""
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
    atomic_write_text(path, "".join(l + "\n" for l in lines))
    return len(lines)


def read_jsonl(path: str, *, tolerate_truncated_tail: bool = False) -> list[dict]:
    """Read a JSONL file; a bad line raises naming file and line, except a cut-off last line
    when tolerate_truncated_tail (an append-only checkpoint killed mid-write)."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            is_tail = all(not l.strip() for l in lines[i + 1:])
            if tolerate_truncated_tail and is_tail:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from e
    return rows


def iter_jsonl(path: str) -> Iterator[dict]:
    yield from read_jsonl(path)


class AppendLog:
    """Append-only JSONL checkpoint: each record is one flushed + fsynced line, so a kill loses at
    most the line being written (read back with tolerate_truncated_tail)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            # Drop a truncated tail so the next append starts on a fresh line.
            rows = read_jsonl(path, tolerate_truncated_tail=True)
            atomic_write_jsonl(path, rows)
        self._f = open(path, "a", encoding="utf-8")

    def append(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")  # key order kept (see above)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
