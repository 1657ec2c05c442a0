"""Which run-config knobs a process actually read: the evidence behind the knob-coverage test.

Sections built by `RunConfig.from_configdict` carry their dotted path; while tracking is on (the env var
AGQ_KNOB_LOG names a file), every read of a field of such a section is recorded and, at exit, one JSON
line of the knobs read is appended to that file. Validation in `__post_init__` and the converter itself
read through `object.__getattribute__`, so only the code that uses a knob counts as its reader.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os

_READS: set[str] | None = None


def _dump(path: str) -> None:
    if _READS is None:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"pid": os.getpid(), "reads": sorted(_READS)}) + "\n")


def start(log_path: str | None = None) -> None:
    """Record knob reads from now on; with `log_path`, append them to it at interpreter exit."""
    global _READS
    if _READS is None:
        _READS = set()
        if log_path:
            atexit.register(_dump, log_path)


def reads() -> set[str]:
    return set(_READS or ())


class Section:
    """Base of every run-config section (a frozen dataclass)."""

    def __getattribute__(self, name):
        if _READS is not None and name[0] != "_":
            fields = type(self).__dataclass_fields__
            if name in fields:
                path = object.__getattribute__(self, "__dict__").get("_path")
                if path is not None:
                    _READS.add(path + name)
        return object.__getattribute__(self, name)

    def to_dict(self) -> dict:
        """Plain nested dict of every knob below this section (provenance, hashing); records no reads."""
        out = {}
        for f in dataclasses.fields(self):
            v = object.__getattribute__(self, f.name)
            out[f.name] = v.to_dict() if is_section_field(f) else (dict(v) if hasattr(v, "keys") else v)
        return out


def is_section_field(f: dataclasses.Field) -> bool:
    factory = f.default_factory
    return isinstance(factory, type) and issubclass(factory, Section)


def leaf_paths(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every knob (non-section field) under `cls`."""
    out = []
    for f in dataclasses.fields(cls):
        if is_section_field(f):
            out += leaf_paths(f.default_factory, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


if os.environ.get("AGQ_KNOB_LOG"):
    start(os.environ["AGQ_KNOB_LOG"])
