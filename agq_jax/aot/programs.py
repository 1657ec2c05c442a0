"""The programs a run executes, lowered and compiled from shapes alone for any mesh (a TPU topology's devices).

Nothing here allocates device memory: the model, the train state and the batches are `ShapeDtypeStruct`s
carrying the shardings the run gives them (the project's own logical rules, `Trainer`'s state shardings,
the sampler's cache sharding), and the functions compiled are the run's own jitted callables
(`rl.step._update_donating`, `rl.step._logprobs_jit`, the sampler's prefill / decode,
`rollout.placement.reshard_fn`), so a change to any of them changes what is compiled here.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from agq_jax.aot import hlo
from agq_jax.models import sharding as shd


@dataclasses.dataclass
class Compiled:
    """Per-device figures of one compiled program (bytes, flops per device)."""

    name: str
    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    generated_code: int
    peak: int                      # arguments + temporaries + outputs not aliased to a donated argument
    flops: float                   # loop-aware (hlo.analyze)
    hbm_bytes: float               # loop-aware bytes read + written by the top-level kernels
    collective_bytes: float
    collectives: dict
    xla_flops: float               # cost_analysis(): loop bodies counted once (for comparison)
    kernels_without_cost: dict     # custom calls whose flops are unknown
    analytic_flops: float          # of `flops`: splash attention kernels, counted from their shapes
    compile_s: float
    note: str = ""
    top_kernels: list = dataclasses.field(default_factory=list)  # hlo.top_kernels: the most HBM bytes first

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# A Pallas kernel rides in the lowered module as serialized Mosaic bytecode, source locations included (file
# paths, line numbers): keyed as is, a checkout in another directory or an edit that moves a line recompiled it.
_KERNEL_BODY = re.compile(r'\\22body\\22: \\22([A-Za-z0-9+/=]+)\\22')


@functools.lru_cache(maxsize=4096)
def _kernel_without_locations(body_b64: str) -> str:
    """A Mosaic kernel's module printed without locations (the payload itself when it cannot be parsed)."""
    import base64

    try:
        from jax._src.interpreters import mlir
        from jax._src.lib import tpu
        from jax._src.lib.mlir import ir

        ctx = mlir.make_ir_context()
        tpu.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True
        with ctx, ir.Location.unknown():
            return ir.Module.parse(base64.b64decode(body_b64)).operation.get_asm(enable_debug_info=False)
    except Exception:  # noqa: BLE001 - an unreadable payload keys as itself (correct, only path-dependent)
        return body_b64


def program_key(lowered, devices, label: str = "") -> str:
    """What a compiled program depends on: the lowered module, the devices it is compiled for and the
    compiler. Equal keys give equal compiled programs, so a cache keyed by it is never stale (the figures
    are recomputed from the cached optimized HLO, so a change to the accounting needs no recompile)."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    try:
        tpu = version("libtpu")
    except PackageNotFoundError:
        tpu = "none"
    devs = [(d.id, d.process_index, tuple(getattr(d, "coords", ()) or ()), d.device_kind) for d in devices]
    text = _KERNEL_BODY.sub(lambda m: _kernel_without_locations(m.group(1)), lowered.as_text())
    blob = "\n".join([text, repr(devs), label, jax.__version__, tpu])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


TOP_KERNELS = 10  # kernels kept per program (`python -m agq_jax.aot --top N` prints them)


class CompileError(RuntimeError):
    """The compiler refused the program (RESOURCE_EXHAUSTED and friends); its first line, cached like figures."""


def _save_json(path, data) -> None:
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def compile_and_measure(name: str, lowered, note: str = "", cache_path=None) -> Compiled:
    """Compile `lowered`, or read it back from `cache_path` (JSON named by `program_key`: XLA's memory and cost
    analyses, with the optimized HLO beside it, gzip); the loop-aware figures are computed from the HLO
    either way. A program the compiler refuses raises CompileError (cached too: a refusal can take as long
    as a compile)."""
    import gzip
    import json
    import pathlib
    import time

    path = pathlib.Path(cache_path) if cache_path is not None else None
    if path is not None and path.is_file():
        compiler = json.loads(path.read_text())
        if "error" in compiler:
            raise CompileError(compiler["error"])
        with gzip.open(path.with_suffix(".hlo.txt.gz"), "rt") as f:
            text = f.read()
    else:
        t0 = time.time()
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - the compiler's refusal is a result, reported by the caller
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            if path is not None and ("RESOURCE_EXHAUSTED" in msg or "INTERNAL" in msg):  # deterministic refusals
                _save_json(path, {"error": msg})
            raise CompileError(msg) from e
        dt = time.time() - t0
        text = compiled.as_text()
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis() or {}
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        compiler = dict(arguments=int(mem.argument_size_in_bytes), outputs=int(mem.output_size_in_bytes),
                        temporaries=int(mem.temp_size_in_bytes), aliased=int(mem.alias_size_in_bytes),
                        generated_code=int(mem.generated_code_size_in_bytes),
                        xla_flops=float(cost.get("flops", 0.0)), compile_s=dt)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path.with_suffix(".hlo.txt.gz"), "wt") as f:
                f.write(text)
            _save_json(path, compiler)
    walk, top = hlo.measure(text, TOP_KERNELS)
    c = compiler
    return Compiled(name=name, arguments=c["arguments"], outputs=c["outputs"], temporaries=c["temporaries"],
                    aliased=c["aliased"], generated_code=c["generated_code"],
                    peak=c["arguments"] + c["temporaries"] + c["outputs"] - c["aliased"], flops=walk.flops,
                    hbm_bytes=walk.bytes, collective_bytes=walk.collective_bytes,
                    collectives={k: float(v) for k, v in walk.collectives.items()}, xla_flops=c["xla_flops"],
                    kernels_without_cost=dict(walk.custom_calls), analytic_flops=walk.analytic_flops,
                    compile_s=c["compile_s"], note=note, top_kernels=top)


# ---- abstract state ---------------------------------------------------------------------------------

def abstract_model(cfg, dtype, param_dtype):
    """(graphdef, abstract params, abstract non-param state) of the model: shapes only, nothing allocated."""
    from agq_jax.models.qwen3 import Qwen3ForCausalLM

    model = nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype),
                                                     param_dtype=jnp.dtype(param_dtype)))
    return model, nnx.split(model, nnx.Param, ...)


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or abstract values) placed by `shardings` (same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_train_state(graphdef, params, model_state, mesh, optim):
    """The Trainer's TrainState as ShapeDtypeStructs with the Trainer's shardings."""
    from agq_jax.rl.step import TrainState, _init_state, _Spec, train_state_shardings

    p_sh = shd.state_shardings(params, mesh)
    spec = _Spec(graphdef, None, optim, mesh, ())
    state = jax.eval_shape(lambda p, m: _init_state(spec, p, m, jnp.zeros((2,), jnp.uint32)), params, model_state)
    sh = train_state_shardings(optim, params, p_sh, model_state, mesh)
    assert isinstance(state, TrainState)
    return with_shardings(state, sh)


def row_batch(mesh, batch_axes, rows: int, seq: int, keys_dtypes: dict[str, Any]):
    """A global [rows, seq] batch (and [rows] vectors) sharded over the batch axes, as Trainer.to_device does."""
    sharding = NamedSharding(mesh, P(batch_axes or None))
    out = {}
    for k, dt in keys_dtypes.items():
        shape = (rows,) if k == "advantages" else (rows, seq)
        out[k] = jax.ShapeDtypeStruct(shape, jnp.dtype(dt), sharding=sharding)
    return out


GRPO_BATCH = {"input_ids": "int32", "attention_mask": "int32", "loss_mask": "float32", "old_logprobs": "float32",
              "advantages": "float32"}


def batch_axes_of(mesh) -> tuple[str, ...]:
    return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)


# ---- the programs -----------------------------------------------------------------------------------

def lower_train_update(graphdef, state, mesh, loss, optim, *, mini_rows: int, micro_rows: int, seq: int):
    """One GRPO optimizer step over a mini-batch of `mini_rows` rows in micro-batches of `micro_rows`."""
    from agq_jax.rl.step import _Spec, _update_donating

    axes = batch_axes_of(mesh)
    spec = _Spec(graphdef, loss, optim, mesh, axes)
    mini = row_batch(mesh, axes, mini_rows, seq, GRPO_BATCH)
    if mini_rows % micro_rows:
        raise ValueError(f"mini-batch of {mini_rows} rows is not a multiple of micro-batch {micro_rows}")
    with jax.set_mesh(mesh):
        return _update_donating.lower(spec, state, mini, mini_rows // micro_rows, loss.stage)


def lower_logprobs(graphdef, state, mesh, loss, optim, *, rows: int, seq: int):
    """The KL-reference pass of the train step (`Trainer._device_logprobs`, one micro-batch per call)."""
    from agq_jax.rl.step import _logprobs_jit, _Spec

    axes = batch_axes_of(mesh)
    spec = _Spec(graphdef, loss, optim, mesh, axes)
    keys = {"input_ids": "int32", "attention_mask": "int32"}
    if loss.scored_tokens:  # the train step's passes score the loss positions only (Trainer._spec_for)
        keys["loss_mask"] = "float32"
    batch = row_batch(mesh, axes, rows, seq, keys)
    with jax.set_mesh(mesh):
        return _logprobs_jit.lower(spec, state.params, state.model_state, batch)


def abstract_cache(cfg, mesh, batch: int, cache_len: int, dtype):
    from agq_jax.models.qwen3 import KVCache, cache_shape

    shape = cache_shape(cfg, batch, cache_len)
    kv = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=shd.cache_sharding(mesh, shape))
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=_batch_sharding(mesh, (batch,)))
    return KVCache(kv, kv, lengths)


def _batch_sharding(mesh, shape):
    logical = ["batch"] + [None] * (len(shape) - 1)
    return NamedSharding(mesh, shd.logical_to_pspec(logical, shape, mesh))


def _batch_arg(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=_batch_sharding(mesh, shape))


def lower_sampler(model, rollout_state, mesh, *, batch: int, max_len: int, chunk: int, pad_id: int,
                  params) -> tuple[Callable, Callable]:
    """(lower prefill, lower decode) of the run's Sampler for a `batch`-row rollout batch on `mesh` (a rollout
    group: `batch` is all its hosts' rows)."""
    from agq_jax.rollout.sampler import Sampler

    sampler = Sampler(model, mesh=mesh, pad_id=pad_id, chunk_size=chunk)
    cache = abstract_cache(model.config, mesh, batch, max_len + chunk, sampler.cache_dtype)
    vocab = model.config.vocab_size
    logits = _batch_arg(mesh, (batch, vocab), jnp.float32)

    def prefill():
        ids = _batch_arg(mesh, (batch, chunk), jnp.int32)
        with jax.set_mesh(mesh):
            return sampler._prefill.lower(sampler.graphdef, rollout_state, cache, ids, ids, logits)

    def decode():
        rng = jax.eval_shape(lambda: jax.random.key(0))
        active = _batch_arg(mesh, (batch,), jnp.bool_)
        budget = row_ids = _batch_arg(mesh, (batch,), jnp.int32)
        with jax.set_mesh(mesh):
            return sampler._decode.lower(sampler.graphdef, rollout_state, cache, logits, rng, active, budget, row_ids,
                                         jax.ShapeDtypeStruct((), jnp.int32), params=params, max_new=max_len, pad_id=pad_id)

    return prefill, decode
