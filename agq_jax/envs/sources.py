"""Task sources beside the flywheel's own rounds: files in the released AgenticQwen formats (the demo JSON
list, the nine-column parquet) and our task JSONL, split deterministically into training and held-out sets."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

from agq_jax.envs.importers import ImportIssue, load_demo_json, load_jsonl, load_parquet
from agq_jax.envs.schema import Task

LOADERS = {".json": load_demo_json, ".parquet": load_parquet, ".jsonl": load_jsonl}

# The released AgenticQwen data (demo tasks, personas) is not in the repository: it sits in shared/ beside the
# checkout (any worktree of it), or wherever $AGQ_SHARED points (the same variable configs/_reference.py reads).
SHARED_ENV = "AGQ_SHARED"
DEMO_TASKS, PERSONAS = "tool_use_demo.json", "persona_5K.jsonl"


def released_dir() -> Path:
    """Where the released AgenticQwen files are expected: $AGQ_SHARED/data/agenticqwen, else
    <checkout>/../shared/data/agenticqwen (whether or not it exists)."""
    root = os.environ.get(SHARED_ENV) or Path(__file__).resolve().parents[2].parent / "shared"
    return Path(root) / "data" / "agenticqwen"


def released_file(name: str) -> Optional[str]:
    """The path of one released file (e.g. DEMO_TASKS) when it is present, else None."""
    path = released_dir() / name
    return str(path) if path.is_file() else None


def load_task_files(paths: Iterable[str]) -> tuple[list[Task], list[ImportIssue]]:
    """All tasks of the files (by extension: .json demo list, .parquet nine columns, .jsonl tasks) with every
    import issue; a file of another kind is an error naming it. Duplicate ids keep the first task."""
    tasks, issues, seen = [], [], set()
    for path in paths:
        ext = next((e for e in LOADERS if str(path).endswith(e)), None)
        if ext is None:
            raise ValueError(f"task file {path!r}: expected one of {sorted(LOADERS)} (demo JSON list, nine-column "
                             f"parquet, task JSONL)")
        got, bad = LOADERS[ext](str(path))
        issues += bad
        for t in got:
            if t.id in seen:
                issues.append(ImportIssue(t.id, "id", f"duplicate task id in {path}; the first one is kept"))
                continue
            seen.add(t.id)
            tasks.append(t)
    return tasks, issues


def heldout_split(tasks: list[Task], fraction: float, seed: int = 0) -> tuple[list[Task], list[Task]]:
    """(train, held-out): a task is held out when the hash of (seed, id) falls below `fraction`, so the split
    does not depend on file order and a task never changes sides between runs."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1], got {fraction}")

    def u(t: Task) -> float:
        return int(hashlib.sha256(f"{seed}|{t.id}".encode()).hexdigest()[:12], 16) / 16 ** 12

    return [t for t in tasks if u(t) >= fraction], [t for t in tasks if u(t) < fraction]
