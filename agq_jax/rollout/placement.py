"""Where rollout weights live on a multi-host mesh: one bf16 copy per host, sharded over that host's chips.

Why: each process samples its own rows and steps its own envs (episodes end at different turns on different
hosts, so a global program would run every host's decode in lockstep), so each host needs the whole model
on its own chips. Copying the fp32 master weights whole onto every chip needs 4 bytes x params per chip
(122 GB for Qwen3-30B-A3B); a compute-dtype copy split over the host's `tensor` x `expert` chips needs
2 bytes x params / chips-per-group (15 GB on a 4-chip v5p host). `sharding.make_mesh` keeps those axes
inside one host, so the copy is made by one global program per model version (`reshard`: cast, then
all-gather over `data` / `fsdp` only) and each process then views its own shards as arrays on its
`local_mesh` (data-parallel over the host's tensor groups). The AOT compiler (`agq_jax.aot`) compiles
these same functions for the target slice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from agq_jax.models import sharding as shd


def _within_host(axes):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in axes if a in ("tensor", "expert"))
    return kept[0] if len(kept) == 1 else (kept or None)


# Rules of the rollout copy: what names `fsdp` or `data` is replicated instead, so that one tensor x expert
# group (one host) holds the whole model.
ROLLOUT_RULES = tuple((name, _within_host(axes)) for name, axes in shd.DEFAULT_RULES)


def process_blocks(mesh: Mesh) -> dict[int, np.ndarray]:
    """process index -> its devices as a [rows, 1, tensor, expert] block of `mesh` (rows = its tensor groups).

    Raises when a process's devices do not hold whole tensor x expert groups (then no host can hold a copy)."""
    devs = mesh.devices
    t, e = mesh.shape["tensor"], mesh.shape["expert"]
    groups = devs.reshape(-1, t, e)
    out: dict[int, list] = {}
    for g in groups:
        procs = {d.process_index for d in g.flat}
        if len(procs) != 1:
            raise ValueError(f"a tensor x expert group of the mesh ({t} x {e} devices) spans processes {sorted(procs)}: "
                             "no host holds a whole rollout copy; use fewer tensor / expert shards than chips per host")
        out.setdefault(procs.pop(), []).append(g)
    return {p: np.stack(gs).reshape(len(gs), 1, t, e) for p, gs in out.items()}


def local_mesh(mesh: Mesh, process_index: int | None = None) -> Mesh:
    """This process's devices as a mesh with the global mesh's tensor / expert axes and data over its groups."""
    p = jax.process_index() if process_index is None else process_index
    block = process_blocks(mesh)[p]
    return Mesh(block, shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shd.MESH_AXES))


def rollout_shardings(state, mesh: Mesh):
    """NamedShardings on the global `mesh` for the rollout copy of an nnx State: tensor / expert only."""
    def one(v):
        if not isinstance(v, nnx.Variable):
            return NamedSharding(mesh, jax.sharding.PartitionSpec())
        shape = v.get_value().shape
        logical = v.get_metadata().get("logical_axes") or (None,) * len(shape)
        return v.replace(NamedSharding(mesh, shd.logical_to_pspec(tuple(logical), shape, mesh, rules=ROLLOUT_RULES)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def rollout_dtype(state, dtype):
    """The rollout copy's dtypes: floating params in the compute dtype, the rest as they are."""
    return jax.tree.map(lambda x: jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, state)


_RESHARD: dict = {}


def reshard_fn(state, mesh: Mesh, dtype):
    """The jitted cast + reshard of `state` (concrete or abstract) to the rollout shardings; one executable
    per (structure, shardings, dtypes), reused for every model version."""
    shardings = rollout_shardings(state, mesh)
    dtypes = rollout_dtype(state, dtype)
    treedef = jax.tree_util.tree_structure(state)
    train = tuple(jax.tree.leaves(shd.state_shardings(state, mesh)))
    key = (treedef, tuple(jax.tree.leaves(shardings)), tuple(jax.tree.leaves(dtypes)), train)
    if key not in _RESHARD:
        flat_dt = key[2]

        def cast(s):  # cast in the train layout first, so the gather moves bf16, not fp32
            leaves = [jax.lax.with_sharding_constraint(x.astype(dt), sh)
                      for x, dt, sh in zip(treedef.flatten_up_to(s), flat_dt, train)]
            return treedef.unflatten(leaves)

        _RESHARD[key] = jax.jit(cast, out_shardings=shardings)
    return _RESHARD[key]


def reshard(state, mesh: Mesh, dtype):
    """The global program that makes every host's rollout copy (collective: every process calls it)."""
    return reshard_fn(state, mesh, dtype)(state)


def local_view(state, lmesh: Mesh):
    """This process's shards of a rollout copy as arrays on `lmesh` (no data moves)."""
    def view(x):
        spec = x.sharding.spec
        sharding = NamedSharding(lmesh, spec)
        by_device = {s.device: s.data for s in x.addressable_shards}
        arrays = [by_device[d] for d in lmesh.devices.flat]
        return jax.make_array_from_single_device_arrays(x.shape, sharding, arrays)
    return jax.tree.map(view, state)
