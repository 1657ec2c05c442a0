"""Procedural worlds: one module per domain, registered by name (`get_world`, `has_world`, `DOMAINS`)."""
from __future__ import annotations

import threading

from agq_jax.envs.worlds.base import DomainSpec, World

_REGISTRY: dict[str, World] = {}
_LOCK = threading.RLock()
_LOADED = False


def register(spec: DomainSpec) -> World:
    world = World(spec)
    _REGISTRY[spec.name] = world
    return world


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    with _LOCK:   # envs are built from many threads; register every domain exactly once
        if not _LOADED:
            from agq_jax.envs.worlds import bank, clinic, flights, it_tickets, library, retail  # noqa: F401
            _LOADED = True


def get_world(name: str) -> World:
    _load()
    if name not in _REGISTRY:
        raise KeyError(f"no procedural world {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def has_world(name: str) -> bool:
    _load()
    return name in _REGISTRY


def domains() -> list[str]:
    _load()
    return sorted(_REGISTRY)
