"""RunConfig: the root of the typed run config, and its one conversion from / to ml_collections.

    rc = load("configs/30b_a3b.py:cpu-smoke", ["--config.rl.group_size=4"])   # as the CLI parses it
    rc = RunConfig.from_configdict(FLAGS.config)                              # the entry points
    base = defaults()                                # the ConfigDict every configs/*.py starts from
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import pathlib
import sys
import typing
from dataclasses import field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from agq_jax.run_config import schema as S
from agq_jax.run_config import teachers as T
from agq_jax.run_config.tracking import Section, is_section_field


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
    name: str = "run"
    seed: int = 0                        # model init, data order, rollouts, evaluation, procedural data
    run_dir: str = ""                    # "" = runs/<name>
    rounds: int = 1                      # flywheel rounds: data -> (SFT) -> GRPO -> eval -> failures -> expansion
    verbose: bool = True                 # progress bars, round summaries and synthesis tables on the console
    model: S.ModelSection = field(default_factory=S.ModelSection)
    tokenizer: S.TokenizerSection = field(default_factory=S.TokenizerSection)
    mesh: S.MeshSection = field(default_factory=S.MeshSection)
    data: S.DataSection = field(default_factory=S.DataSection)
    env: S.EnvSection = field(default_factory=S.EnvSection)
    sft: S.SFTSection = field(default_factory=S.SFTSection)
    rl: S.RLSection = field(default_factory=S.RLSection)
    optim: S.OptimSection = field(default_factory=S.OptimSection)
    rollout: S.RolloutSection = field(default_factory=S.RolloutSection)
    eval: S.EvalSection = field(default_factory=S.EvalSection)
    checkpoint: S.CheckpointSection = field(default_factory=S.CheckpointSection)
    export: S.ExportSection = field(default_factory=S.ExportSection)
    teachers: T.TeachersSection = field(default_factory=T.TeachersSection)
    synth: T.SynthSection = field(default_factory=T.SynthSection)
    flywheel: S.FlywheelSection = field(default_factory=S.FlywheelSection)
    smoke: S.SmokeSection = field(default_factory=S.SmokeSection)

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"config rounds={self.rounds}: must be >= 1")

    @classmethod
    def from_configdict(cls, cd) -> "RunConfig":
        """The typed config of an ml_collections ConfigDict (or plain nested dict); unknown keys are errors."""
        d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
        return _build(cls, d, "")

    def replace(self, **changes) -> "RunConfig":
        """A copy with top-level fields or dotted knobs changed, e.g. replace(**{"rl.group_size": 4})."""
        d = self.to_dict()
        for key, value in changes.items():
            target = d
            parts = key.split(".")
            for p in parts[:-1]:
                target = target[p]
            if parts[-1] not in target:
                raise UnknownKnobError(f"RunConfig.replace: no knob {key!r}")
            target[parts[-1]] = value
        return RunConfig.from_configdict(d)

    @property
    def resolved_run_dir(self) -> str:
        import os
        return os.path.abspath(self.run_dir or os.path.join("runs", self.name))


# ---- conversion --------------------------------------------------------------------------------------

class UnknownKnobError(KeyError):
    """A config key that no section defines (a typo, or a knob that was removed)."""

    def __str__(self):
        return str(self.args[0])


def _hints(cls) -> dict[str, Any]:
    mod = sys.modules[cls.__module__]
    return typing.get_type_hints(cls, vars(mod))


def _coerce(where: str, hint, value):
    """value as the field's declared type, or a TypeError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:   # Optional[X]: None inherits
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"config {where}={value!r}: expected true/false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise TypeError(f"config {where}={value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"config {where}={value!r}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"config {where}={value!r}: expected a string")
        return value
    if hint is tuple or origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TypeError(f"config {where}={value!r}: expected a list")
        return tuple(value)
    if hint is Mapping or origin in (Mapping, dict, typing.Mapping):
        if not isinstance(value, Mapping):
            raise TypeError(f"config {where}={value!r}: expected a mapping")
        return MappingProxyType({str(k): (tuple(v) if isinstance(v, list) else v) for k, v in value.items()})
    raise TypeError(f"config {where}: unsupported field type {hint!r}")


def _build(cls, d: Mapping, path: str):
    if not isinstance(d, Mapping):
        raise TypeError(f"config {path.rstrip('.') or 'root'}: expected a section (mapping), got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, list(fields), n=1)
        hint = f"; did you mean {path + near[0]!r}?" if near else ""
        raise UnknownKnobError(f"config key {path + key!r} is not a run-config knob (agq_jax/run_config){hint}"
                       + (f" (also unknown: {[path + k for k in unknown[1:]]})" if len(unknown) > 1 else ""))
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in d:
            continue
        where = f"{path}{name}"
        if is_section_field(f):
            kwargs[name] = _build(f.default_factory, d[name], where + ".")
        else:
            kwargs[name] = _coerce(where, hints[name], d[name])
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith("config ") else f"config {path.rstrip('.') or 'root'}: {msg}") from None
    object.__setattr__(obj, "_path", path)
    return obj


def defaults():
    """The ConfigDict of every knob at its default: what configs/*.py start from (configs/base.py)."""
    import ml_collections
    from ml_collections.config_dict import placeholder

    def build(cls):
        hints = _hints(cls)
        c = ml_collections.ConfigDict()
        for f in dataclasses.fields(cls):
            if is_section_field(f):
                c[f.name] = build(f.default_factory)
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            hint = hints[f.name]
            if default is None:   # Optional[X]: typed placeholder so `--config.a.b=...` still parses
                inner = next(a for a in typing.get_args(hint) if a is not type(None))
                c[f.name] = placeholder(inner)
            elif isinstance(default, Mapping):
                c[f.name] = ml_collections.ConfigDict(dict(default))
            else:
                c[f.name] = default
        return c

    return build(RunConfig)


def sibling(config_file: str, name: str):
    """configs/<name>.py next to `config_file`, imported by path once (ml_collections execs config files
    outside any package, so they cannot import each other by module name)."""
    path = pathlib.Path(config_file).resolve().with_name(f"{name}.py")
    mod_name = f"agq_jax_configs_{name}"
    module = sys.modules.get(mod_name)
    if module is not None and getattr(module, "__file__", None) == str(path):
        return module
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no config module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def load_configdict(spec: str, overrides: Sequence[str] = ()):
    """The ConfigDict `--config=SPEC OVERRIDES...` gives on the command line (SPEC = path[:LAYOUT])."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    argv = ["agq_jax", f"--config={spec}", *overrides]
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=False, sys_argv=argv)
    # ml_collections executes every config file into the one module object it keeps in sys.modules: without a
    # fresh one, globals of the file loaded before (configs/30b_a3b.py's `recipe`: GSPO) stayed in the next
    sys.modules.pop("config_config", None)
    fv(argv)
    return fv.config


def load(spec: str, overrides: Sequence[str] = ()) -> RunConfig:
    """`RunConfig` of a config file spec with command-line style overrides ("--config.rl.group_size=4")."""
    return RunConfig.from_configdict(load_configdict(spec, overrides))


def dump(rc: RunConfig, path: str) -> None:
    """Write the resolved config as JSON (atomically): what exactly a run ran with."""
    import os
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rc.to_dict(), f, indent=1, sort_keys=True, default=list)
    os.replace(tmp, path)
