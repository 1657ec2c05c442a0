"""Device mesh (data, fsdp, tensor, expert) and logical-axis sharding for params, activations and KV cache.

Params carry `logical_axes` metadata (e.g. ('layers', 'embed', 'mlp')); the rules below turn those names into
mesh axes. A mesh axis is dropped for a dimension it does not divide, so the same model runs on 1 device,
8 forced CPU devices, a GPU or a TPU slice without per-shape special cases.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis / axes (None = replicated). Param names and activation names are separate so that
# e.g. the hidden dim of weights shards over fsdp while the hidden dim of activations stays whole.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # params
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("moe_mlp", "tensor"),
    ("expert", "expert"),
    ("router", None),
    ("norm", None),
    # activations and KV cache: the batch is split over `expert` too (expert parallelism: attention runs on
    # each expert shard's own rows, the MoE block gathers the tokens of its expert group; models/moe.py)
    ("batch", ("data", "fsdp", "expert")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_seq", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1 (= all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor, self.expert]
        fill = [i for i, s in enumerate(sizes) if s == -1]
        if len(fill) > 1:
            raise ValueError(f"MeshConfig {self}: at most one axis may be -1")
        known = math.prod(s for s in sizes if s != -1)
        if fill:
            if num_devices % known:
                raise ValueError(f"MeshConfig {self}: {num_devices} devices not divisible by {known}")
            sizes[fill[0]] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"MeshConfig {self}: product {math.prod(sizes)} != {num_devices} devices")
        return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 4-axis mesh with Auto axis types (GSPMD propagation; explicit constraints via the rules).

    Devices of several processes (a multi-host slice) are ordered process-major, each host's chips by their
    physical coordinates, so the innermost axes (`tensor` x `expert`) stay inside one host whenever they fit
    its chips: that is what lets each host hold a whole rollout copy of the weights sharded over its own
    chips (`rollout.placement`). `jax.make_mesh`'s physical placement does not keep them there (on v5p 2x4x4
    its tensor groups span hosts) and cannot place some shapes at all (tensor=4 on a v6e 8x8 slice)."""
    config = config or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.shape(len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len({d.process_index for d in devices}) > 1:
        return Mesh(np.array(host_major_order(devices), dtype=object).reshape(shape), MESH_AXES, axis_types=axis_types)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except (NotImplementedError, ValueError):
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(arr, MESH_AXES, axis_types=axis_types)


def host_major_order(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """Devices sorted by (process, physical coordinates, core): contiguous runs are one host's chips."""
    def key(d):
        coords = tuple(getattr(d, "coords", ()) or ())
        return (d.process_index, coords[::-1], getattr(d, "core_on_chip", 0), d.id)
    return sorted(devices, key=key)


def logical_to_pspec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh | jax.sharding.AbstractMesh,
                     rules=DEFAULT_RULES) -> P:
    """PartitionSpec for `shape`; keeps, per dim, the longest prefix of its mesh axes that divides the dim."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    table = dict(rules)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept: list[str] = []
        for ax in axes:
            if ax not in sizes or ax in used:
                break
            if dim % (math.prod(sizes[a] for a in kept) * sizes[ax]):
                break
            kept.append(ax)
        kept = [a for a in kept if sizes[a] > 1]
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def batch_axes(mesh) -> tuple[str, ...]:
    """Mesh axes (size > 1) the "batch" rule splits rows over, outermost first: a batch whose size is a
    multiple of their product is split over all of them."""
    if mesh is None:
        return ()
    axes = dict(DEFAULT_RULES)["batch"]
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return tuple(a for a in axes if sizes.get(a, 1) > 1)


def target_platform() -> str:
    """The platform the traced program runs on: the devices of the mesh set with `jax.set_mesh` (so a TPU
    program compiled ahead of time on a CPU host picks the TPU kernels), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation when a mesh is active (`jax.set_mesh`); a no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_pspec(logical, x.shape, mesh))


def _var_logical(v: nnx.Variable, shape) -> tuple:
    logical = v.get_metadata().get("logical_axes")
    return tuple(logical) if logical is not None else (None,) * len(shape)


def state_shardings(state, mesh: Mesh):
    """NamedSharding per Variable of an nnx State (concrete or abstract), from its `logical_axes` metadata."""
    def one(v):
        if not isinstance(v, nnx.Variable):
            return NamedSharding(mesh, P())
        shape = v.get_value().shape
        return v.replace(NamedSharding(mesh, logical_to_pspec(_var_logical(v, shape), shape, mesh)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move an existing model's params onto `mesh` (in place) following the logical rules."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    return model


def create_sharded_model(model_fn, mesh: Mesh) -> nnx.Module:
    """Build `model_fn()` with every param initialised directly into its shard (never whole on one device)."""
    abstract = nnx.eval_shape(model_fn)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh)

    @jax.jit
    def init():
        return nnx.state(model_fn())

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a KV-cache k/v array [layers, batch, kv_heads, max_len, head_dim]."""
    return NamedSharding(mesh, logical_to_pspec(("layers", "batch", "act_kv_heads", "cache_seq", "head_dim"),
                                                shape, mesh))


def describe(model: nnx.Module) -> list[tuple[str, tuple, str]]:
    """(path, shape, sharding spec) per param; for logs and tests."""
    out = []
    for path, v in nnx.to_flat_state(nnx.state(model)):
        arr = v.get_value()
        spec = getattr(getattr(arr, "sharding", None), "spec", None)
        out.append((".".join(map(str, path)), tuple(arr.shape), str(spec)))
    return out


def host_array(x) -> np.ndarray:
    """Fetch a (possibly sharded) array to host memory."""
    return np.asarray(jax.device_get(x))


def annotated_param(init, rngs: nnx.Rngs, shape: Sequence[int], logical: Sequence[str | None], dtype,
                    stack: int | None = None) -> nnx.Param:
    """A Param of `shape` (with a leading 'layers' axis of size `stack` when given) tagged with logical axes."""
    if stack is not None:
        shape, logical = (stack, *shape), ("layers", *logical)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(logical))
