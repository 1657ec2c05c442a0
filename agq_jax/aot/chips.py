"""Per-chip figures of the TPU generations the configs target: what the roofline divides by.

Sources: Cloud TPU system-architecture pages (bf16 peak, HBM capacity and bandwidth, ICI bandwidth per
chip). HBM capacity is what a chip's runtime reports as its memory limit, rounded down (95 GiB on v5p,
31.25 GiB on v6e and 15.75 GiB on v5e); the compiler's own RESOURCE_EXHAUSTED is the final word on fit.
"""
from __future__ import annotations

from typing import NamedTuple


class Chip(NamedTuple):
    name: str
    hbm_bytes: float          # per JAX device
    bf16_flops: float         # peak dense bf16 FLOP/s
    hbm_bandwidth: float      # bytes/s
    ici_bandwidth: float      # bytes/s one chip sends over all its links (collectives' roofline term)


GiB = 2**30
CHIPS = {
    "TPU v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, 600e9),
    "TPU v6e": Chip("TPU v6e", 31.25 * GiB, 918e12, 1640e9, 448e9),
    "TPU v5e": Chip("TPU v5e", 15.75 * GiB, 197e12, 819e9, 200e9),
    # GPU layouts compile on their own node (no topology API): NVLink bandwidth per GPU, one direction
    "H100": Chip("NVIDIA H100 SXM", 80e9, 989e12, 3350e9, 450e9),
    "H200": Chip("NVIDIA H200", 141e9, 989e12, 4800e9, 450e9),
}
_KINDS = {"TPU v5": "TPU v5p", "TPU v5p": "TPU v5p", "TPU v6 lite": "TPU v6e", "TPU v6e": "TPU v6e",
          "TPU v5 lite": "TPU v5e", "TPU v5e": "TPU v5e"}


def chip_of(device) -> Chip:
    """The Chip of a (topology) device, from its device_kind."""
    kind = getattr(device, "device_kind", str(device))
    for gpu in ("H100", "H200"):
        if gpu in kind:
            return CHIPS[gpu]
    if kind not in _KINDS:
        raise KeyError(f"no chip figures for device kind {kind!r}; known: {sorted(_KINDS)}")
    return CHIPS[_KINDS[kind]]


def topology_devices(topology: str):
    """The devices of a TPU slice for compiling from a CPU host (needs libtpu): "v5p:2x4x4", or with the
    chips of one host after a slash when they differ from libtpu's default ("v6e:2x4/2x4x1": one 8-chip host,
    where libtpu assumes two hosts of 4)."""
    import os

    # Compiling needs no TPU, so several compiler processes may share this host (libtpu locks it otherwise).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    name, _, host = topology.partition("/")
    kw = {"chips_per_host_bounds": tuple(int(v) for v in host.split("x"))} if host else {}
    return topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices


def sub_topology(topology: str, devices) -> str:
    """The slice name of `devices`, a block of whole hosts of `topology`'s slice ("v6e:2x2" for one host of
    "v6e:8x8"): what a rollout group's programs compile for. libtpu compiles a program for a subset of a
    slice's devices only when their ids are 0..n-1, so a group other than the first host cannot be
    compiled from the whole slice; each group runs the same program on the same shape of chips."""
    import math

    if len(devices) == len(topology_devices(topology)):
        return topology
    gen, _, rest = topology.partition(":")
    dims, _, host = rest.partition("/")
    rank = len(dims.split("x"))
    lo = [min(d.coords[i] for d in devices) for i in range(rank)]
    shape = [max(d.coords[i] for d in devices) - lo[i] + 1 for i in range(rank)]
    if math.prod(shape) != len(devices):
        raise ValueError(f"{len(devices)} devices of {topology} do not form a block ({'x'.join(map(str, shape))})")
    name = f"{gen}:{'x'.join(map(str, shape))}"
    return f"{name}/{host}" if host else name
