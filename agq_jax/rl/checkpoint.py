"""Orbax checkpoints of the full train state for exact resume after a kill.

A checkpoint holds named pytrees (e.g. {"train": TrainState, "ref": reference params}) saved as flat
leaf lists — robust to NNX Variable / optax node types — plus a JSON item with the driver's metadata
(round, data position, numpy RNG state, config) and the tree paths, checked on restore. Orbax writes
into a temp dir and renames it when complete, so a kill mid-save never leaves a readable half
checkpoint; saves are async (device-to-host copy blocks, the file writes do not).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

_META = "meta"


def _flat(tree) -> tuple[dict[str, Any], list[str]]:
    paths_leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves = {f"{i:06d}": leaf for i, (_, leaf) in enumerate(paths_leaves)}
    return leaves, [jax.tree_util.keystr(p) for p, _ in paths_leaves]


def _abstract(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    arr = np.asarray(leaf)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype)


class CheckpointManager:
    """Keep-N async checkpoints of named pytrees + JSON metadata under `directory/<step>/`."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self._items: tuple[str, ...] | None = None
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                            enable_async_checkpointing=async_save, create=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=opts)

    def save(self, step: int, trees: Mapping[str, Any], meta: Mapping[str, Any] | None = None, *,
             force: bool = False) -> bool:
        """Start saving `trees` (name -> pytree) and `meta` (JSON-able) as `step`; False if skipped by interval."""
        if _META in trees:
            raise ValueError(f"tree name {_META!r} is reserved for the metadata")
        args, paths = {}, {}
        for name, tree in trees.items():
            leaves, paths[name] = _flat(tree)
            args[name] = ocp.args.StandardSave(leaves)
        meta_doc = {"user": dict(meta or {}), "paths": paths, "step": int(step)}
        try:
            json.dumps(meta_doc)
        except TypeError as e:
            raise ValueError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
        args[_META] = ocp.args.JsonSave(meta_doc)
        return self._mngr.save(int(step), args=ocp.args.Composite(**args), force=force)

    def restore(self, targets: Mapping[str, Any], step: int | None = None) -> tuple[dict[str, Any], dict]:
        """Restore into the structure, dtypes and shardings of `targets` (name -> pytree like the saved one).

        Returns ({name: tree}, user metadata). `step=None` takes the latest complete checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        meta_doc = self._meta(step)
        args, treedefs = {}, {}
        for name, target in targets.items():
            if name not in meta_doc["paths"]:
                raise KeyError(f"checkpoint {self.directory}/{step} has no tree {name!r}; "
                               f"saved: {sorted(meta_doc['paths'])}")
            leaves, paths = _flat(target)
            if paths != meta_doc["paths"][name]:
                diff = sorted(set(paths) ^ set(meta_doc["paths"][name]))[:5]
                raise ValueError(f"checkpoint {self.directory}/{step} tree {name!r} does not match the target "
                                 f"structure ({len(meta_doc['paths'][name])} saved vs {len(paths)} leaves; "
                                 f"e.g. {diff})")
            treedefs[name] = jax.tree_util.tree_structure(target)
            args[name] = ocp.args.StandardRestore({k: _abstract(v) for k, v in leaves.items()})
        got = self._mngr.restore(step, args=ocp.args.Composite(**args))
        out = {name: jax.tree_util.tree_unflatten(treedefs[name], [got[name][k] for k in sorted(got[name])])
               for name in targets}
        return out, meta_doc["user"]

    def restore_subtree(self, name: str, prefix: str, target, step: int | None = None):
        """Only the leaves of tree `name` whose saved paths are `prefix` + a path of `target` (e.g. ".params"
        of a train state), restored into `target`'s structure, dtypes and shardings (abstract leaves allowed;
        no sharding: the first device). An export reads the weights, not the optimizer moments (2x more)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        saved = self._meta(step)["paths"]
        if name not in saved:
            raise KeyError(f"checkpoint {self.directory}/{step} has no tree {name!r}; saved: {sorted(saved)}")
        index = {p: i for i, p in enumerate(saved[name])}
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
        keys, items, args = [], {}, {}
        for path, leaf in paths_leaves:
            full = prefix + jax.tree_util.keystr(path)
            if full not in index:
                raise ValueError(f"checkpoint {self.directory}/{step} tree {name!r} has no leaf {full} (the target "
                                 f"is not the saved model: {len(saved[name])} saved leaves, e.g. {saved[name][:2]})")
            key = f"{index[full]:06d}"
            a = _abstract(leaf)
            sharding = a.sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
            keys.append(key)
            items[key] = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
            args[key] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=a.shape, dtype=a.dtype)
        # a reader of its own: this manager's item handlers are bound to StandardSave / StandardRestore
        reader = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            got = reader.restore(step, args=ocp.args.Composite(**{name: ocp.args.PyTreeRestore(
                item=items, restore_args=args, partial_restore=True)}))[name]
        finally:
            reader.close()
        for (path, _), key in zip(paths_leaves, keys):
            if got[key].shape != items[key].shape:
                raise ValueError(f"checkpoint {self.directory}/{step}: {prefix}{jax.tree_util.keystr(path)} has "
                                 f"shape {got[key].shape}, the target {items[key].shape}")
        return jax.tree_util.tree_unflatten(treedef, [got[k] for k in keys])

    def _meta(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]

    def saved_trees(self, step: int) -> list[str]:
        """Names of the pytrees saved at `step` (so a caller can restore optional ones)."""
        return sorted(self._meta(step)["paths"])

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def wait(self):
        """Block until pending async saves are on disk."""
        self._mngr.wait_until_finished()

    def close(self):
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_trainer(mngr: CheckpointManager, trainer, meta: Mapping[str, Any] | None = None, *, force: bool = False):
    """Save a `step.Trainer`'s state (and its KL reference if any) at its optimizer step."""
    trees = {"train": trainer.state}
    if trainer.ref_params is not None:
        trees["ref"] = trainer.ref_params
    return mngr.save(int(trainer.state.step), trees, meta, force=force)


def restore_trainer(mngr: CheckpointManager, trainer, step: int | None = None) -> dict:
    """Load the latest (or `step`) checkpoint into `trainer` (built with the same model/config); returns meta."""
    targets = {"train": trainer.state}
    if trainer.ref_params is not None:
        targets["ref"] = trainer.ref_params
    trees, meta = mngr.restore(targets, step)
    trainer.state = trees["train"]
    if "ref" in trees:
        trainer.ref_params = trees["ref"]
    return meta
