"""Compile every program of one config layout for its TPU slice and judge the result against the chip.

`compile_layout` is what `python -m agq_jax.aot` prints and what docs/launch.md's table is made of:
the GRPO update, the log-prob pass (old-log-prob / KL reference), the resharding of the fp32 train weights
into the rollout copies, and the sampler's prefill and decode for one rollout group (a host, or the hosts
one copy spans) at the per-host decode batch. Memory
is per device: a program's peak (arguments + temporaries + outputs not aliased to donated inputs), and
for the sampler also the train state that stays resident while it runs. Time is a roofline bound:
max(FLOPs / peak, HBM bytes / bandwidth, collective bytes / ICI bandwidth); MFU = model FLOPs over that time
at peak, with model FLOPs as MaxText and PaLM count them (`model_flops`): the matmuls of the active parameters
and causal attention, forward x 3 for the update; `flops_ratio` compares the compiled FLOPs with the
parameter term alone (6 x active params x tokens): what the program does beyond the weights' matmuls.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from agq_jax.aot import chips as chips_mod
from agq_jax.aot import programs as pr
from agq_jax.models import sharding as shd

HEADROOM = 0.97   # a program "fits" when its per-device peak is under this fraction of HBM


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the run executes, in rows and tokens (all global except decode_batch, which is per host)."""

    seq: int                 # rollout.max_len: every train row is padded to it
    mini_rows: int           # rows per optimizer step (rl.mini_batch_size x group_size)
    micro_rows: int          # rows per forward / backward
    rollout_rows: int        # episodes per GRPO step (tasks_per_step x group_size)
    decode_batch: int        # episodes one host decodes together (rollout.decode_batch_size; 0 = all its rows)
    chunk: int               # sampler prefill chunk
    compute_dtype: str
    param_dtype: str


def active_params(cfg, params) -> int:
    """Parameters one token multiplies: all but the unrouted (E - k) / E share of the expert weights and an
    untied input embedding (a lookup, no FLOPs), as MFU is usually counted."""
    total = 0
    for path, v in nnx.to_flat_state(params):
        if "embed_tokens" in map(str, path) and not cfg.tie_word_embeddings:
            continue
        size = math.prod(v.get_value().shape)
        logical = tuple(v.get_metadata().get("logical_axes") or ())
        total += size * cfg.num_experts_per_tok // cfg.num_experts if "expert" in logical else size
    return total


def model_flops(cfg, n_active: int, rows: float, seq: int, *, context: float | None = None, passes: int = 3,
                q_tokens: int | None = None) -> tuple[float, float]:
    """(model FLOPs, of which the parameter term) of `passes` x a forward over `rows` rows of `q_tokens`
    tokens (default `seq`): 2 x active params per token, plus attention's two matmuls (QK^T, PV: 4 x heads x
    head_dim per query-key pair per layer) over the causal pairs. A full row of `seq` tokens has seq^2/2 of
    them; a sampler chunk / decode step attends to `context` keys per query. Train = 3 passes (forward,
    backward's two matmuls), a log-prob pass = 1; remat's recomputation is not model FLOPs."""
    q = seq if q_tokens is None else q_tokens
    pairs = q * seq / 2 if context is None else q * context
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * pairs
    dense = 2 * n_active * q
    return passes * rows * (dense + attn), passes * rows * dense


def _tree_bytes(tree) -> int:
    """Per-device bytes of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def roofline(c: pr.Compiled, chip: chips_mod.Chip, flops: tuple[float, float]) -> dict[str, float]:
    """Roofline time and MFU bound of a compiled program; `flops` = `model_flops`'s (total, parameter term)."""
    model, param = flops
    terms = {"compute_s": c.flops / chip.bf16_flops, "hbm_s": c.hbm_bytes / chip.hbm_bandwidth,
             "collective_s": c.collective_bytes / chip.ici_bandwidth}
    t = max(terms.values())
    bound = max(terms, key=terms.get)
    return dict(terms, time_s=t, bound=bound, model_flops=model, param_flops=param,
                mfu=model / (t * chip.bf16_flops) if t > 0 else 0.0,
                mfu_params=param / (t * chip.bf16_flops) if t > 0 else 0.0,
                flops_ratio=c.flops / param if param else 0.0)


def compile_layout(cfg, mesh, shapes: Shapes, loss, optim, *, gmesh=None, expert_shards: int = 0, pad_id: int = 0,
                   sampling=None, programs: tuple[str, ...] = ("train", "logprobs", "reshard", "prefill", "decode"),
                   log=print, cache_dir: str | None = None) -> dict[str, Any]:
    """Compile the run's programs on `mesh` (a slice's devices); see the module docstring. The sampler's
    programs compile on `gmesh`, one rollout group's mesh (by default the first group of `mesh`'s rollout
    mesh; the AOT tool passes the same group built on a slice of the group's own shape, `chips.sub_topology`).
    With `cache_dir`, each program's figures are cached under the key of its lowered module."""
    import os

    from agq_jax.rollout import placement
    from agq_jax.rollout.sampler import SamplingParams

    sampling = sampling or SamplingParams()
    chip = chips_mod.chip_of(mesh.devices.flat[0])
    model, (graphdef, params, model_state) = pr.abstract_model(cfg, shapes.compute_dtype, shapes.param_dtype)
    n_active = active_params(cfg, params)
    state = pr.abstract_train_state(graphdef, params, model_state, mesh, optim)
    resident = _tree_bytes(state)
    n_dev = mesh.devices.size
    processes = len({d.process_index for d in mesh.devices.flat})
    rmesh = placement.rollout_mesh(mesh, expert_shards)  # raises when a copy cannot be placed on whole hosts
    hosts = placement.group_hosts(rmesh)
    gmesh = placement.group_mesh(rmesh, 0) if gmesh is None else gmesh
    if len({d.process_index for d in gmesh.devices.flat}) != hosts:
        raise ValueError(f"group mesh {dict(gmesh.shape)} spans other hosts than a rollout group ({hosts})")
    host_rows = -(-shapes.rollout_rows // processes)
    per_host = (shapes.decode_batch or host_rows)
    multiple = max(1, math.prod(gmesh.shape[a] for a in shd.batch_axes(gmesh)) // hosts)
    per_host = -(-per_host // multiple) * multiple
    group_rows = per_host * hosts
    out: dict[str, Any] = dict(chip=chip.name, hbm_bytes=chip.hbm_bytes, devices=n_dev, processes=processes,
                               mesh=dict(mesh.shape), rollout_mesh=dict(rmesh.shape), group_mesh=dict(gmesh.shape),
                               group_hosts=hosts, active_params=n_active, train_state_bytes=resident,
                               host_rows=host_rows, decode_batch=per_host,
                               decode_rounds=-(-host_rows // per_host), programs={})

    def record(name, lowered, on, flops, extra_resident=0, note="", per=1):
        path = None
        if cache_dir:
            path = os.path.join(cache_dir, "programs", f"{name}-{pr.program_key(lowered, on.devices.flat)}.json")
        log(f"  compiling {name} ..." if path is None or not os.path.isfile(path) else f"  {name}: cached")
        try:
            c = pr.compile_and_measure(name, lowered, note=note, cache_path=path)
            if per > 1:  # a loop whose bound is a static maximum (decode): figures per iteration
                c = dataclasses.replace(c, flops=c.flops / per, hbm_bytes=c.hbm_bytes / per,
                                        collective_bytes=c.collective_bytes / per, analytic_flops=c.analytic_flops / per,
                                        collectives={k: v / per for k, v in c.collectives.items()})
        except pr.CompileError as e:  # RESOURCE_EXHAUSTED and friends: reported, not raised
            log(f"  {name}: FAILED {e}")
            out["programs"][name] = dict(name=name, error=str(e), fits=False)
            return
        row = c.to_json()
        row["resident_bytes"] = extra_resident
        row["total_bytes"] = c.peak + extra_resident
        row["fits"] = row["total_bytes"] <= HEADROOM * chip.hbm_bytes
        row.update(roofline(c, chip, flops))
        out["programs"][name] = row
        log(f"  {name}: peak {c.peak / 2**30:.1f} GiB (+{extra_resident / 2**30:.1f} resident) of "
            f"{chip.hbm_bytes / 2**30:.1f}, {c.compile_s:.0f}s compile")

    if "train" in programs:
        record("train", pr.lower_train_update(graphdef, state, mesh, loss, optim, mini_rows=shapes.mini_rows,
                                              micro_rows=shapes.micro_rows, seq=shapes.seq), mesh,
               model_flops(cfg, n_active, shapes.mini_rows / n_dev, shapes.seq))
    if "logprobs" in programs:
        record("logprobs", pr.lower_logprobs(graphdef, state, mesh, loss, optim, rows=shapes.micro_rows,
                                             seq=shapes.seq), mesh,
               model_flops(cfg, n_active, shapes.micro_rows / n_dev, shapes.seq, passes=1),
               note="also the KL-reference pass")
    full = nnx.state(model)
    if "reshard" in programs:
        full_abs = pr.with_shardings(full, shd.state_shardings(full, mesh))
        fn = placement.reshard_fn(full, mesh, rmesh, shapes.compute_dtype)
        with jax.set_mesh(mesh):  # its argument, the fp32 weights, is part of the resident train state
            record("reshard", fn.lower(full_abs), mesh, (0.0, 0.0), extra_resident=resident - _tree_bytes(full_abs),
                   note="fp32 train weights -> every rollout group's bf16 copy")
    compute = jnp.dtype(shapes.compute_dtype)
    rollout_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, compute if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                                          sharding=s), full, placement.rollout_shardings(full, gmesh))
    prefill, decode = pr.lower_sampler(model, rollout_state, gmesh, batch=group_rows, max_len=shapes.seq,
                                       chunk=shapes.chunk, pad_id=pad_id, params=sampling)
    per_dev_rows = group_rows / gmesh.devices.size
    if "prefill" in programs:
        # a chunk in the middle of a full row: half the row's keys before it
        record("prefill", prefill(), gmesh, model_flops(cfg, n_active, per_dev_rows, shapes.seq, passes=1,
                                                        q_tokens=shapes.chunk, context=shapes.seq / 2),
               extra_resident=resident,
               note=f"{shapes.chunk}-token chunk for {per_host} rows per host")
    if "decode" in programs:
        record("decode", decode(), gmesh, model_flops(cfg, n_active, per_dev_rows, shapes.seq, passes=1, q_tokens=1,
                                                      context=shapes.seq / 2), extra_resident=resident, per=shapes.seq,
               note="per decode step (the loop runs at most max_len steps; counted at that bound, divided)")
    out["fits"] = all(p.get("fits", False) for p in out["programs"].values())
    return out
