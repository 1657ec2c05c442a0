"""Where rollout weights live on a multi-host mesh: bf16 copies split over `tensor` x `expert` chips, one per
host or one per group of hosts that decode together.

Why: each process steps the envs of its own rows, and episodes end at different turns on different hosts, so
sampling runs on small meshes that need no other host, each holding a whole copy of the model. Copying the
fp32 master weights whole onto every chip needs 4 bytes x params per chip (122 GB for Qwen3-30B-A3B); a
compute-dtype copy split over a host's `tensor` x `expert` chips needs 2 bytes x params / chips (15 GB on a
4-chip v5p host). A model too large for one host (Qwen3-235B-A22B: 438 GiB in bf16, 117 GiB per chip of a
4-chip v5p host) splits its experts over `rollout.expert_shards` shards, so that one copy spans
tensor x expert_shards chips on several hosts: those hosts form one *rollout group*, run the sampler's
programs together (rows split over their expert shards, each host's rows on its own chips; the MoE block
gathers the group's tokens, `models.moe`), and agree on each turn's loop bounds (`Sampler.lockstep_max`).
Groups never wait for one another.

`rollout_mesh` arranges the training mesh's devices as (data = copies, fsdp = 1, tensor, expert); the copy is
made by one global program per model version (`reshard`: cast in the training layout, then gather over
`data` / `fsdp`), and each process views its shards as arrays on its group's mesh (`local_view`). The AOT
compiler (`agq_jax.aot`) compiles these same functions for the target slice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from agq_jax.models import sharding as shd


def _within_copy(axes):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in axes if a in ("tensor", "expert"))
    return kept[0] if len(kept) == 1 else (kept or None)


# Rules of the rollout copy: what names `fsdp` or `data` is replicated instead, so that one tensor x expert
# group of the rollout mesh holds the whole model.
ROLLOUT_RULES = tuple((name, _within_copy(axes)) for name, axes in shd.DEFAULT_RULES)
_AXIS_TYPES = (jax.sharding.AxisType.Auto,) * len(shd.MESH_AXES)


def rollout_mesh(mesh: Mesh, expert_shards: int = 0) -> Mesh:
    """The devices of the training `mesh` as copies (`data`) x `tensor` x `expert_shards`, `fsdp` = 1: each copy
    keeps the training mesh's tensor groups, and `expert_shards` (0 = the mesh's own expert axis) takes its
    extra factor from neighbouring `fsdp` / `data` positions, i.e. from the next hosts of a host-major mesh.
    The devices keep the training mesh's order (the axes are named in the order they lie in), because one
    program reads the training layout and writes this one (`reshard`), and a jitted program's shardings must
    list the devices in one order."""
    d, f, t, e = (mesh.shape[a] for a in shd.MESH_AXES)
    shards = expert_shards or e
    if shards % e or (d * f) % (shards // e):
        raise ValueError(f"rollout.expert_shards={expert_shards} must be a multiple of the mesh's expert axis ({e}) "
                         f"that divides its data x fsdp positions ({d * f}); mesh {dict(mesh.shape)}")
    k = shards // e
    devs = mesh.devices.reshape(d * f // k, 1, k, t, e)
    if k == 1 or t == 1:  # the extra expert factor (if any) sits next to the expert axis
        return Mesh(devs.reshape(d * f // k, 1, t, shards), shd.MESH_AXES, axis_types=_AXIS_TYPES)
    if e == 1:  # copies x next hosts x tensor: the host factor becomes the expert axis, outside tensor
        return Mesh(devs.reshape(d * f // k, 1, k, t), ("data", "fsdp", "expert", "tensor"), axis_types=_AXIS_TYPES)
    raise ValueError(f"rollout.expert_shards={expert_shards} on a mesh with both tensor ({t}) and expert ({e}) axes: "
                     "set the mesh's expert axis to the copy's expert shards instead")


def _copy_grid(rmesh: Mesh, index: int) -> np.ndarray:
    """Copy `index` of a rollout mesh as a [tensor, expert] array of devices (whatever the axes' order)."""
    names = [n for n in rmesh.axis_names if n in ("tensor", "expert")]
    grid = rmesh.devices[index, 0]
    return grid if names == ["tensor", "expert"] else grid.T


def copy_processes(rmesh: Mesh) -> list[list[int]]:
    """The processes holding each copy of a rollout mesh, in copy order. A copy spanning processes must give
    each of them whole expert shards (its rows are split over them); raises otherwise."""
    out = []
    for i in range(rmesh.devices.shape[0]):
        copy = _copy_grid(rmesh, i)
        owner = np.vectorize(lambda dv: dv.process_index)(copy)
        procs = sorted(set(owner.flat))
        if len(procs) > 1 and any(len(set(owner[:, j])) != 1 for j in range(owner.shape[1])):
            raise ValueError(f"a rollout copy ({copy.shape[0]} x {copy.shape[1]} chips) splits a tensor group over "
                             f"processes {procs}: keep mesh.tensor within one host's chips")
        out.append(procs)
    return out


def group_mesh(rmesh: Mesh, process_index: int | None = None) -> Mesh:
    """The rollout group of a process: the copies inside its host (data over them), or the one copy it
    shares with other hosts, as a mesh of its own."""
    p = jax.process_index() if process_index is None else process_index
    owners = copy_processes(rmesh)
    mine = [i for i, procs in enumerate(owners) if p in procs]
    if not mine:
        raise ValueError(f"process {p} holds no device of the rollout mesh")
    if len(owners[mine[0]]) > 1 and len(mine) > 1:
        raise ValueError(f"process {p} takes part in {len(mine)} rollout copies that span hosts")
    return Mesh(rmesh.devices[mine], rmesh.axis_names, axis_types=_AXIS_TYPES)


def group_hosts(rmesh: Mesh) -> int:
    """Hosts one rollout group spans (1: every host decodes on its own)."""
    return max(len(procs) for procs in copy_processes(rmesh))


def rollout_shardings(state, rmesh: Mesh):
    """NamedShardings on the rollout mesh for the rollout copy of an nnx State: tensor / expert only."""
    def one(v):
        if not isinstance(v, nnx.Variable):
            return NamedSharding(rmesh, jax.sharding.PartitionSpec())
        shape = v.get_value().shape
        logical = v.get_metadata().get("logical_axes") or (None,) * len(shape)
        return v.replace(NamedSharding(rmesh, shd.logical_to_pspec(tuple(logical), shape, rmesh, rules=ROLLOUT_RULES)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def rollout_dtype(state, dtype):
    """The rollout copy's dtypes: floating params in the compute dtype, the rest as they are."""
    return jax.tree.map(lambda x: jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, state)


_RESHARD: dict = {}


def reshard_fn(state, mesh: Mesh, rmesh: Mesh, dtype):
    """The jitted cast + reshard of `state` (concrete or abstract, sharded on the training `mesh`) to the
    rollout shardings on `rmesh`; one executable per (structure, shardings, dtypes), reused for every model
    version."""
    shardings = rollout_shardings(state, rmesh)
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


def reshard(state, mesh: Mesh, rmesh: Mesh, dtype):
    """The global program that makes every rollout copy (collective: every process calls it)."""
    return reshard_fn(state, mesh, rmesh, dtype)(state)


def local_view(state, gmesh: Mesh):
    """A rollout copy's shards on this process's group mesh as arrays of that mesh (no data moves)."""
    me = jax.process_index()

    def view(x):
        sharding = NamedSharding(gmesh, x.sharding.spec)
        by_device = {s.device: s.data for s in x.addressable_shards}
        arrays = [by_device[d] for d in gmesh.devices.flat if d.process_index == me]
        return jax.make_array_from_single_device_arrays(x.shape, sharding, arrays)
    return jax.tree.map(view, state)
