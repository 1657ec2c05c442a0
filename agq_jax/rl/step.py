"""The jitted GRPO / SFT train step and the host loop over epochs and mini-batches.

State is a plain pytree (`TrainState`: params, non-trainable model state, optax state, step, rng)
split from the NNX model once, so it can be donated, sharded and checkpointed as is; the model is
re-merged inside the jitted function. One call of the jitted update = one optimizer step over a
mini-batch, with gradient accumulation as a scan over micro-batches. Loss denominators are computed
over the whole mini-batch first, so accumulation / sharding / multi-process give the full-batch value.

Model contract used: `model.hidden_states(ids, attention_mask=...) -> (hidden, cache, aux_loss)`,
`model.unembed() -> [H, V]`. The MoE `aux_loss` is added as returned (qwen3 scales it by the config's
`router_aux_loss_coef` already), times `LossConfig.aux_loss_scale`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from agq_jax.models.sharding import state_shardings
from agq_jax.rl import algo
from agq_jax.rl.batch import REQUIRED, validate_batch
from agq_jax.rl.logprobs import next_token_logprobs
from agq_jax.rl.optim import OptimConfig, make_optimizer, make_schedule

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array         # int32 scalar: optimizer steps taken
    params: Any             # nnx.State of nnx.Param
    model_state: Any        # nnx.State of everything else (may be empty)
    opt_state: Any
    rng: jax.Array          # raw uint32 key, for the driver's sampling (exact resume)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    stage: str = "grpo"               # "grpo" | "sft"
    policy_loss: str = "ppo_clip"     # algo.POLICY_LOSSES
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip_c: float | None = None
    gspo_clip_low: float = 3e-4
    gspo_clip_high: float = 4e-4
    loss_agg: str = "token-mean"      # algo.AGGREGATIONS (GRPO and SFT)
    agg_norm_len: int | None = None   # constant length for the "drgrpo" aggregation
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    aux_loss_scale: float = 1.0       # × the model's aux_loss (qwen3 already applies router_aux_loss_coef)
    temperature: float = 1.0          # the sampler's temperature (log-probs must match it)
    logprob_chunk: int = 512
    scored_tokens: int = 0            # most loss tokens a row can hold (the rollout's bound): the LM head
                                      # then runs on those positions only; 0 = on every position

    def __post_init__(self):
        if self.stage not in REQUIRED:
            raise ValueError(f"LossConfig.stage must be one of {sorted(REQUIRED)}, got {self.stage!r}")
        algo.lookup(algo.POLICY_LOSSES, self.policy_loss, "policy loss")
        algo.lookup(algo.AGGREGATIONS, self.loss_agg, "loss aggregation")
        algo.lookup(algo.KL_ESTIMATORS, self.kl_estimator, "KL estimator")
        if self.scored_tokens < 0:
            raise ValueError(f"LossConfig.scored_tokens must be >= 0, got {self.scored_tokens}")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    ppo_epochs: int = 1                 # μ: passes over each rollout batch
    mini_batch_size: int | None = None  # global rows per optimizer step; None = whole batch
    micro_batch_size: int | None = None  # global rows per forward/backward; None = mini-batch
    shuffle: bool = True
    seed: int = 0


def _policy_mask(mb):
    m = mb["loss_mask"].astype(jnp.float32) * mb["attention_mask"].astype(jnp.float32)
    return m.at[:, 0].set(0.0)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a train step; hashable, so trainers with equal specs share compiled code."""
    graphdef: Any
    loss: LossConfig
    optim: OptimConfig
    mesh: Mesh | None
    batch_axes: tuple[str, ...]


def _forward_logprobs(spec: _Spec, params, model_state, mb):
    model = nnx.merge(spec.graphdef, params, model_state)
    hidden, _, aux = model.hidden_states(mb["input_ids"], attention_mask=mb["attention_mask"])
    scored = spec.loss.scored_tokens
    lp, ent = next_token_logprobs(hidden, model.unembed(), mb["input_ids"],
                                  chunk_size=spec.loss.logprob_chunk, temperature=spec.loss.temperature,
                                  score_mask=_policy_mask(mb) if scored else None, max_scored=scored)
    return lp, ent, jnp.asarray(aux, jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _logprobs_jit(spec: _Spec, params, model_state, mb):
    lp, ent, _ = _forward_logprobs(spec, params, model_state, mb)
    return lp, ent


def _init_state(spec: _Spec, params, model_state, rng):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=make_optimizer(spec.optim).init(params), rng=rng)


def _micro_loss(params, model_state, mb, den, spec: _Spec, n_micro: int, stage: str):
    """Loss contribution of one micro-batch (already divided by the mini-batch denominator)."""
    c = spec.loss
    agg_kw = {"norm_len": c.agg_norm_len}
    mask = _policy_mask(mb)
    lp, ent, aux = _forward_logprobs(spec, params, model_state, mb)
    stats = {"tokens": mask.sum(), "entropy_sum": (ent * mask).sum(), "aux_loss": aux / n_micro}
    if stage == "sft":
        num, _ = algo.aggregate_parts(c.loss_agg, -lp, mask, **agg_kw)
        main = num / den
        stats["nll_sum"] = (-lp * mask).sum()
    else:
        pl = algo.policy_loss(c.policy_loss, lp, mb["old_logprobs"], mb["advantages"], mask,
                              clip_low=c.clip_low, clip_high=c.clip_high, dual_clip_c=c.dual_clip_c,
                              gspo_clip_low=c.gspo_clip_low, gspo_clip_high=c.gspo_clip_high)
        num, _ = algo.aggregate_parts(c.loss_agg, pl.loss, mask, **agg_kw)
        main = num / den
        stats["pg_loss"] = main
        if c.kl_coef > 0:
            kl = algo.kl_estimate(c.kl_estimator, lp, mb["ref_logprobs"])
            kl_num, _ = algo.aggregate_parts(c.loss_agg, kl, mask, **agg_kw)
            main = main + c.kl_coef * kl_num / den
            stats["kl_sum"] = (kl * mask).sum()
        ratio = jnp.where(mask > 0, pl.ratio, 1.0)
        stats.update(
            clip_low_sum=pl.clipped_low.sum(), clip_high_sum=pl.clipped_high.sum(),
            ratio_sum=(pl.ratio * mask).sum(), ratio_max=ratio.max(), ratio_min=ratio.min(),
            logprob_absdiff_sum=(jnp.abs(lp - mb["old_logprobs"]) * mask).sum())
    if c.entropy_coef:
        e_num, _ = algo.aggregate_parts(c.loss_agg, ent, mask, **agg_kw)
        main = main - c.entropy_coef * e_num / den
    total = main + c.aux_loss_scale * aux / n_micro
    stats["loss"] = total
    return total, stats


def _update(spec: _Spec, state: TrainState, mini: dict, n_micro: int, stage: str):
    """One optimizer step on a mini-batch; gradients accumulated over `n_micro` micro-batches."""
    c = spec.loss
    mask_all = _policy_mask(mini)
    _, den = algo.aggregate_parts(c.loss_agg, jnp.zeros_like(mask_all), mask_all, norm_len=c.agg_norm_len)
    den = jnp.maximum(den, 1e-8)
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

    def split(x):  # [M, ...] -> [n_micro, M / n_micro, ...], micro rows stay batch-sharded
        y = x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:])
        if spec.mesh is not None:
            pspec = P(None, spec.batch_axes or None, *([None] * (x.ndim - 1)))
            y = jax.lax.with_sharding_constraint(y, NamedSharding(spec.mesh, pspec))
        return y

    if n_micro == 1:
        (_, stats), grads = grad_fn(state.params, state.model_state, mini, den, spec, 1, stage)
    else:
        def body(acc, mb):
            (_, st), g = grad_fn(state.params, state.model_state, mb, den, spec, n_micro, stage)
            return jax.tree.map(jnp.add, acc, g), st

        grads, per_micro = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, state.params),
                                        jax.tree.map(split, mini))
        stats = {k: (v.max() if k == "ratio_max" else v.min() if k == "ratio_min" else v.sum())
                 for k, v in per_micro.items()}
    updates, opt_state = make_optimizer(spec.optim).update(grads, state.opt_state, state.params)
    stats["grad_norm"] = optax.global_norm(grads)
    stats["lr"] = make_schedule(spec.optim)(state.step)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return new, stats


_update_donating = jax.jit(_update, static_argnums=(0, 3, 4), donate_argnums=1)
_update_keeping = jax.jit(_update, static_argnums=(0, 3, 4))


def train_state_shardings(optim: OptimConfig, params, param_shardings, model_state, mesh: Mesh) -> TrainState:
    """Shardings of a TrainState: params as given, AdamW moments exactly like their params (FSDP memory),
    everything else replicated. `params` may be abstract (the AOT compiler builds the state from shapes)."""
    rep = NamedSharding(mesh, P())
    tx = make_optimizer(optim)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, params), param_shardings,
                                   transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=param_shardings, model_state=jax.tree.map(lambda _: rep, model_state),
                      opt_state=opt_sh, rng=rep)


class Trainer:
    """Owns the train state and the jitted update for one model; see module docstring.

    `batch_axes` are the mesh axes the batch dimension is sharded over (those present in the mesh)."""

    def __init__(self, model: nnx.Module, optim: OptimConfig, loss: LossConfig, steps: StepConfig = StepConfig(),
                 *, mesh: Mesh | None = None, batch_axes=("data", "fsdp"), donate: bool = True, seed: int = 0):
        self.optim_cfg, self.loss_cfg, self.step_cfg, self.mesh = optim, loss, steps, mesh
        self.schedule = make_schedule(optim)
        self.graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
        axes = tuple(a for a in batch_axes if mesh is not None and a in mesh.axis_names)
        self.batch_axes = axes
        self._row_sharding = NamedSharding(mesh, P(axes or None)) if mesh is not None else None
        self._spec = _Spec(self.graphdef, loss, optim, mesh, axes)
        # every position: the host API, and a batch with a row past loss.scored_tokens (exact, slower)
        self._full_spec = dataclasses.replace(self._spec, loss=dataclasses.replace(loss, scored_tokens=0))
        init = functools.partial(_init_state, self._spec)
        rng = jax.random.key_data(jax.random.key(seed))
        with self._mesh_ctx():
            if mesh is None:
                self.state = jax.jit(init)(params, model_state, rng)
            else:  # params by their logical rules; Adam moments exactly like their params (FSDP memory)
                params = jax.device_put(params, state_shardings(params, mesh))
                self.state = jax.jit(init, out_shardings=self._state_shardings(params, model_state))(
                    params, model_state, rng)
        self._warned_full = False
        self.ref_params = None
        if loss.kl_coef > 0:  # the reference is only materialised when the KL term is used
            self.ref_params = jax.tree.map(jnp.copy, self.state.params)
        self._update = _update_donating if donate else _update_keeping

    # ------------------------------------------------------------------ setup helpers
    def _state_shardings(self, params, model_state) -> TrainState:
        return train_state_shardings(self.optim_cfg, params, jax.tree.map(lambda x: x.sharding, params),
                                     model_state, self.mesh)

    def _mesh_ctx(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def model(self) -> nnx.Module:
        """The current policy as an NNX module (shares arrays with the state: re-fetch after each update
        when the trainer donates its buffers)."""
        return nnx.merge(self.graphdef, self.state.params, self.state.model_state)

    def set_reference(self, model: nnx.Module | None):
        """Use `model`'s params (same architecture) as the KL reference; None drops it."""
        if model is None:
            self.ref_params = None
            return
        ref = nnx.state(model, nnx.Param)
        if jax.tree.structure(ref) != jax.tree.structure(self.state.params):
            raise ValueError("set_reference: the reference model's params do not match the policy's structure")
        self.ref_params = ref if self.mesh is None else jax.device_put(ref, state_shardings(ref, self.mesh))

    def split_rng(self) -> jax.Array:
        """A fresh typed key for the driver; advances the checkpointed RNG."""
        key, sub = jax.random.split(jax.random.wrap_key_data(self.state.rng))
        self.state = self.state.replace(rng=jax.random.key_data(key))
        return sub

    def to_device(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host-local rows -> global arrays sharded over the batch axes (multi-process aware)."""
        if self._row_sharding is None:
            return {k: jnp.asarray(v) for k, v in local.items()}
        return {k: jax.make_array_from_process_local_data(self._row_sharding, np.asarray(v))
                for k, v in local.items()}

    def local_rows(self, global_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This process's rows of a batch every process holds whole (e.g. gathered rollouts): the contiguous
        block `to_device` expects. One process: the batch itself."""
        if self._row_sharding is None or jax.process_count() == 1:
            return dict(global_batch)
        b = int(np.shape(global_batch["input_ids"])[0])
        shape = (b,) + tuple(np.shape(global_batch["input_ids"])[1:])
        spans = sorted({(sl[0].start or 0, b if sl[0].stop is None else sl[0].stop)
                        for sl in self._row_sharding.addressable_devices_indices_map(shape).values()})
        lo, hi = spans[0][0], spans[-1][1]
        if sum(e - s for s, e in spans) != hi - lo:
            raise ValueError(f"process {jax.process_index()}'s rows {spans} of a {b}-row batch are not contiguous")
        return {k: np.asarray(v)[lo:hi] for k, v in global_batch.items()}

    def _spec_for(self, row_tokens: np.ndarray) -> _Spec:
        """The step's spec for a batch with `row_tokens` loss tokens per row (the global batch, the same on
        every process): loss positions only when no row holds more than loss.scored_tokens, else every
        position (the same loss; one more compiled shape)."""
        bound = self.loss_cfg.scored_tokens
        most = int(row_tokens.max(initial=0))
        if not bound or most <= bound:
            return self._spec
        if not self._warned_full:
            self._warned_full = True
            log.warning("a train batch has a row with %d loss tokens > loss.scored_tokens=%d: the LM head runs on "
                        "every position for such batches (exact, slower)", most, bound)
        return self._full_spec

    # ------------------------------------------------------------------ host API
    def compute_logprobs(self, local_batch: Mapping[str, np.ndarray], params=None) -> tuple[np.ndarray, np.ndarray]:
        """(logp, entropy) [B, T] for host-local rows under `params` (default: current policy), at every
        position. Runs `micro_batch_size` global rows at a time (memory), like the train step."""
        validate_batch({"loss_mask": np.zeros(np.shape(local_batch["input_ids"])), **local_batch}, "sft")
        with self._mesh_ctx():
            dev = self.to_device({k: local_batch[k] for k in ("input_ids", "attention_mask")})
            lp, ent = self._device_logprobs(dev, self._full_spec, params)
        return _local_rows(lp), _local_rows(ent)

    def _device_logprobs(self, dev: dict, spec: _Spec, params=None) -> tuple[jax.Array, jax.Array]:
        """(logp, entropy) of a global batch already on device, under `spec` (the scored spec reads
        loss_mask: the loss positions only)."""
        params = self.state.params if params is None else params
        keys = ("input_ids", "attention_mask") + (("loss_mask",) if spec.loss.scored_tokens else ())
        dev = {k: dev[k] for k in keys}
        b_global = dev["input_ids"].shape[0]
        micro = self.step_cfg.micro_batch_size or b_global
        if micro >= b_global:
            return _logprobs_jit(spec, params, self.state.model_state, dev)
        parts = [_logprobs_jit(spec, params, self.state.model_state,
                               _take_rows(dev, jnp.arange(i, min(i + micro, b_global)), self._row_sharding))
                 for i in range(0, b_global, micro)]
        return _concat_rows(parts, self._row_sharding)

    def _minibatch_plan(self, b_global: int, epoch: int, step0: int):
        """Global row indices of each mini-batch (same on every process) and the micro-batch count.

        Rows are picked from the whole global batch, so one process and N processes take identical steps."""
        sc = self.step_cfg
        mini = b_global if sc.mini_batch_size is None else sc.mini_batch_size
        micro = mini if sc.micro_batch_size is None else sc.micro_batch_size
        if mini <= 0 or b_global % mini:
            raise ValueError(f"batch of {b_global} rows is not a multiple of mini_batch_size {sc.mini_batch_size}")
        if micro <= 0 or mini % micro:
            raise ValueError(f"mini-batch of {mini} rows is not a multiple of micro_batch_size {sc.micro_batch_size}")
        order = np.arange(b_global)
        if sc.shuffle:
            order = np.random.default_rng([sc.seed, step0, epoch]).permutation(b_global)
        return [order[i:i + mini] for i in range(0, b_global, mini)], mini // micro

    def train_batch(self, local_batch: Mapping[str, np.ndarray], stage: str | None = None) -> dict[str, float]:
        """μ epochs over shuffled mini-batches of one rollout batch (one optimizer step per mini-batch).

        `stage` ("grpo" | "sft") overrides `loss.stage` for this call (SFT runs a single epoch).
        Returns metrics averaged over the optimizer steps (token-weighted where that is the meaning);
        `logprob_diff_first` is the sampler-vs-trainer agreement before any update on this batch."""
        c, sc = self.loss_cfg, self.step_cfg
        stage = c.stage if stage is None else stage
        validate_batch(local_batch, stage)
        batch = {k: np.asarray(v) for k, v in local_batch.items() if k in REQUIRED[stage] or k == "ref_logprobs"}
        kl = stage == "grpo" and c.kl_coef > 0
        if kl and "ref_logprobs" not in batch and self.ref_params is None:
            raise ValueError("kl_coef > 0 needs batch['ref_logprobs'] or a reference (set_reference)")
        if not kl:
            batch.pop("ref_logprobs", None)
        step0 = int(self.state.step)
        epochs = sc.ppo_epochs if stage == "grpo" else 1
        records, skipped = [], 0
        with self._mesh_ctx():
            dev = self.to_device(batch)
            b_global = dev["input_ids"].shape[0]
            row_tokens = _global_row_sums(_row_loss_tokens(dev))  # the same on every process
            spec = self._spec_for(row_tokens)
            if kl and "ref_logprobs" not in dev:
                dev["ref_logprobs"], _ = self._device_logprobs(dev, spec, self.ref_params)
            live = row_tokens > 0
            for epoch in range(epochs):
                idx_list, n_micro = self._minibatch_plan(b_global, epoch, step0)
                for idx in idx_list:
                    # A mini-batch without a loss token (all its groups masked: zero variance, an env error)
                    # is not a step: its gradient is zero, but AdamW would still move the weights by its
                    # decayed momentum and weight decay, and the schedule would advance. Decided here on the
                    # host, so the compiled step has no data-dependent select around its collectives.
                    if not live[idx].any():
                        skipped += 1
                        continue
                    mini = _take_rows(dev, jnp.asarray(idx, jnp.int32), self._row_sharding)
                    self.state, stats = self._update(spec, self.state, mini, n_micro, stage)
                    records.append(stats)
        if not records:   # the loss over no loss token is 0; nothing else was measured
            return {"loss": 0.0, "grad_norm": 0.0, "optimizer_steps": 0.0, "skipped_steps": float(skipped),
                    "tokens": 0.0, "lr": float(self.schedule(int(self.state.step)))}
        return {**_summarise(jax.device_get(records), stage), "skipped_steps": float(skipped)}


@jax.jit
def _row_loss_tokens(batch: dict) -> jax.Array:
    """Loss tokens per row [B], as the step's mask counts them."""
    return _policy_mask(batch).sum(axis=1)


def _global_row_sums(x: jax.Array) -> np.ndarray:
    """A batch-sharded [B] array, whole on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.partial(jax.jit, static_argnums=2)
def _take_rows(batch: dict, idx: jax.Array, sharding):
    """Rows `idx` of a (globally sharded) batch, re-sharded over the batch axes."""
    out = {k: jnp.take(v, idx, axis=0) for k, v in batch.items()}
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


@functools.partial(jax.jit, static_argnums=1)
def _concat_rows(parts, sharding):
    out = tuple(jnp.concatenate(xs, axis=0) for xs in zip(*parts))
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:
            seen.add(start)
            rows.append(np.asarray(s.data))
    return np.concatenate(rows, axis=0)


def _summarise(records: list[dict], stage: str) -> dict[str, float]:
    """Per-step stats -> one dict: losses averaged over steps, token stats token-weighted."""
    tok = sum(float(r["tokens"]) for r in records)
    out = {"loss": float(np.mean([r["loss"] for r in records])),
           "grad_norm": float(np.mean([r["grad_norm"] for r in records])),
           "grad_norm_max": float(np.max([r["grad_norm"] for r in records])),
           "lr": float(records[-1]["lr"]), "tokens": tok, "optimizer_steps": float(len(records)),
           "entropy": float(sum(float(r["entropy_sum"]) for r in records) / max(tok, 1.0)),
           "aux_loss": float(np.mean([r["aux_loss"] for r in records]))}
    if stage == "sft":
        out["nll"] = float(sum(float(r["nll_sum"]) for r in records) / max(tok, 1.0))
        return out
    per_tok = lambda k: float(sum(float(r[k]) for r in records) / max(tok, 1.0))  # noqa: E731
    out.update(pg_loss=float(np.mean([r["pg_loss"] for r in records])),
               clip_frac_low=per_tok("clip_low_sum"), clip_frac_high=per_tok("clip_high_sum"),
               ratio_mean=per_tok("ratio_sum"),
               ratio_max=float(np.max([r["ratio_max"] for r in records])),
               ratio_min=float(np.min([r["ratio_min"] for r in records])),
               logprob_diff=per_tok("logprob_absdiff_sum"),
               logprob_diff_first=float(records[0]["logprob_absdiff_sum"]) / max(float(records[0]["tokens"]), 1.0))
    out["clip_frac"] = out["clip_frac_low"] + out["clip_frac_high"]
    if "kl_sum" in records[0]:
        out["kl"] = per_tok("kl_sum")
    return out
