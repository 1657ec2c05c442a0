"""The policy side of the driver: the sampler of the live model and its rollouts.

Rollouts decode `rollout.decode_batch_size` episodes per host at a time (all of them with 0): a batch's KV
cache is what bounds rollout memory at scale, so the compile-ahead tool sizes it per layout. An episode's
sampling noise follows its row in the whole batch (`Sampler.decode(row_ids=...)`), so it gets the same noise
whatever the batching or the number of processes.
"""
from __future__ import annotations

import jax
from flax import nnx

from agq_jax.tokenizer import SpecialIds
from agq_jax.rollout import multihost

_SAMPLERS: dict = {}


def shared_sampler(model, *, mesh, pad_id: int, chunk_size: int):
    """One Sampler per (architecture, mesh, pad id, chunk): a Sampler holds only the graphdef and its jitted
    prefill/decode (weights are call arguments), so drivers built in the same process (a resumed run, the
    SFT-only vs GRPO comparison, tests) reuse the compiled executables instead of recompiling them."""
    from agq_jax.rollout import Sampler

    graphdef, _ = nnx.split(model)
    key = (graphdef, id(mesh) if mesh is not None else None, int(pad_id), int(chunk_size))
    try:
        hit = _SAMPLERS.get(key)
    except TypeError:  # an unhashable graphdef: no sharing
        return Sampler(model, mesh=mesh, pad_id=pad_id, chunk_size=chunk_size)
    if hit is None or hit.mesh is not mesh:
        hit = _SAMPLERS[key] = Sampler(model, mesh=mesh, pad_id=pad_id, chunk_size=chunk_size)
    return hit


class Policy:
    """Samples episodes from the live model: `policy.model` is swapped in after every train step."""

    def __init__(self, rc, model, tok, ids: SpecialIds, mesh=None, *, make_env=None):
        """`make_env(item, tool_cache=None) -> env` builds the env of a task item (the driver's, bound to its
        world; rollouts of one task share a tool cache)."""
        from agq_jax.driver.build import rollout_config

        self.rc, self.model, self.tok, self.ids, self.mesh = rc, model, tok, ids, mesh
        self.make_env = make_env
        r = rc.rollout
        self.chunk_size = r.chunk_size
        self.decode_batch = r.decode_batch_size
        self.expert_shards = r.expert_shards  # of each rollout copy on a multi-host mesh (rollout.placement)
        self.max_workers = r.max_workers
        self.stop_ids = ids.stop_ids if r.stop_on_tool_call else (ids.im_end,)
        self.sampler = shared_sampler(model, mesh=mesh, pad_id=ids.pad, chunk_size=self.chunk_size)
        self.rollout_cfg = rollout_config(rc)
        rl = rc.rl
        self._train_sampling = dict(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k)
        self._pool = None
        self._local = None  # (model, sampler, weights) of the multi-host path
        self._meshes = None  # (rollout mesh, this process's group mesh) of the multi-host path

    def sampling(self, *, greedy: bool = False, temperature: float | None = None):
        """The training sampling params (rl.temperature / top_p / top_k), greedy, or those at `temperature`."""
        from agq_jax.rollout import SamplingParams

        if greedy:
            return SamplingParams(temperature=0.0, stop_ids=self.stop_ids)
        kw = dict(self._train_sampling)
        if temperature is not None:
            kw["temperature"] = float(temperature)
        return SamplingParams(stop_ids=self.stop_ids, **kw)

    def rollouts(self, envs, *, params, rng, group_ids):
        """Run one episode per env; with several processes each runs its slice and all get every episode."""
        if jax.process_count() > 1:
            return self._multihost_rollouts(envs, params=params, rng=rng, group_ids=group_ids)
        return self._run(self.sampler, self.model, envs, params=params, rng=rng, group_ids=group_ids)

    def _run(self, sampler, model, envs, *, params, rng, group_ids, row0: int = 0):
        """Episodes of `envs` in decode batches; `row0` is the first env's row in the whole batch (its noise).
        On a group spanning hosts every process runs as many batches as the busiest (some maybe empty)."""
        import concurrent.futures as cf

        from agq_jax.driver.data import score_env
        from agq_jax.rollout import RolloutBatch, run_rollouts

        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=self.max_workers)
        step = self.decode_batch or int(sampler.lockstep_max([max(len(envs), 1)])[0])
        rounds = int(sampler.lockstep_max([-(-len(envs) // step)])[0])
        episodes = []
        for start in range(0, rounds * step, step):
            stop = min(start + step, len(envs))
            if stop <= start and sampler.processes == 1:
                break
            batch = run_rollouts(sampler, model, envs[start:stop], self.tok, params=params, config=self.rollout_cfg,
                                 rng=rng, group_ids=list(group_ids)[start:stop], score_fn=score_env,
                                 executor=self._pool, row0=row0 + start)
            episodes += batch.episodes
        return RolloutBatch(episodes, pad_id=self.ids.pad)

    def _multihost_rollouts(self, envs, *, params, rng, group_ids):
        from agq_jax.rollout import RolloutBatch

        n, group_ids = len(envs), list(group_ids)
        if len(group_ids) != n:
            raise ValueError(f"Policy.rollouts: {len(group_ids)} group_ids for {n} envs")
        bounds = multihost.row_bounds(n, jax.process_count())
        start, stop = bounds[jax.process_index()]
        sampler, state = self._local_sampler()  # collective (the rollout copies): every process calls it
        local = self._run(sampler, state, envs[start:stop], params=params, rng=rng, group_ids=group_ids[start:stop],
                          row0=start).episodes
        return RolloutBatch(multihost.gather_episodes(local, bounds), pad_id=self.ids.pad)

    def _local_sampler(self):
        """(sampler on this process's rollout group, its view of the group's rollout copy: compute dtype, split
        over the copy's tensor x expert chips; `rollout.placement`), re-made once per model version."""
        from agq_jax.rollout import placement

        if self._local is None or self._local[0] is not self.model:
            if self.mesh is None:
                raise ValueError("multi-process rollouts need the global mesh (config mesh.enabled)")
            if self._meshes is None:
                rmesh = placement.rollout_mesh(self.mesh, self.expert_shards)
                self._meshes = (rmesh, placement.group_mesh(rmesh))
            rmesh, gmesh = self._meshes
            copy = placement.reshard(nnx.state(self.model), self.mesh, rmesh, self.model.dtype)
            state = placement.local_view(copy, gmesh)
            sampler = shared_sampler(self.model, mesh=gmesh, pad_id=self.ids.pad, chunk_size=self.chunk_size)
            self._local = (self.model, sampler, state)
        return self._local[1], self._local[2]

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._local = None
