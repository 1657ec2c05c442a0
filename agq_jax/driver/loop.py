"""The flywheel driver: rounds of data -> (SFT) -> GRPO -> held-out eval -> failures -> expansion.

Progress is a sequence of numbered units (`global_step`): every SFT step, every GRPO step, and one
boundary unit after SFT and after each round (where evaluations are logged). A checkpoint taken after
unit g holds the train state (params, optimizer, step, RNG) and, in its metadata, the round, phase,
step within the phase, data-stream positions and the failures seen so far; every log record with
global_step <= g is final. Resuming restores the latest checkpoint, truncates the logs past it and
re-runs the tail: rollouts, data order and evaluation are pure functions of that state, so a killed and
resumed run logs exactly what an uninterrupted one does.
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Optional

import jax
import numpy as np

from agq_jax.driver import data as D
from agq_jax.driver.build import (build_model, export_hf, loss_temperature, make_mesh, startup_banner,
                                  trainer_configs)
from agq_jax.driver.evaluate import episode_for_failure, evaluate, headline
from agq_jax.driver.logs import MetricsLogger, round_summary
from agq_jax.driver.policy import Policy
from agq_jax.driver.sft import build_sft_examples, procedural_sft_examples, sft_batch
from agq_jax.driver.vocab import load_run_tokenizer
from agq_jax.tokenizer import SpecialIds
from agq_jax.envs.rewards import SUCCESS_THRESHOLD
from agq_jax.envs.runtime import Termination
from agq_jax.envs.tools import SharedToolCache
from agq_jax.rl.batch import collate
from agq_jax.run_config import RunConfig, dump

MAX_FAILURES_KEPT = 256


class StopRequested(Exception):
    """Raised by `stop_after` (tests: simulate a kill after a given global step)."""


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=float)
    os.replace(tmp, path)


def _check_rl_names(rl):
    """Fail before any work on a misspelt registry name, naming the config key."""
    from agq_jax.rl import algo

    for key, name, table, kind in (("reward", rl.reward, algo.TRAINING_REWARDS, "training reward"),
                                   ("advantage", rl.advantage, algo.ADVANTAGES, "advantage estimator"),
                                   ("loss_agg", rl.loss_agg, algo.AGGREGATIONS, "loss aggregation"),
                                   ("kl_estimator", rl.kl_estimator, algo.KL_ESTIMATORS, "KL estimator")):
        if name not in table:
            raise ValueError(f"config rl.{key}={name!r}: unknown {kind}; registered: {sorted(table)}")


class Driver:
    def __init__(self, rc: RunConfig, *, stop_after: Optional[int] = None, progress: bool = True, tokenizer=None,
                 train_items: Optional[list] = None, heldout_items: Optional[list] = None):
        """`rc`: the typed run config (`RunConfig.from_configdict(configdict)`). `tokenizer` (with
        tokenizer.kind="procedural") replaces the trained BPE and is saved into the run dir; `train_items` /
        `heldout_items` replace the flywheel datasets / the held-out set (tests)."""
        if not isinstance(rc, RunConfig):
            raise TypeError(f"Driver needs an agq_jax.run_config.RunConfig, got {type(rc).__name__} "
                            f"(convert a ConfigDict with RunConfig.from_configdict)")
        self.rc = rc
        _check_rl_names(rc.rl)
        self.run_dir = rc.resolved_run_dir
        self.is_writer = jax.process_index() == 0
        self.stop_after = stop_after
        self.progress = progress and rc.verbose and self.is_writer
        os.makedirs(self.run_dir, exist_ok=True)
        if self.is_writer:
            dump(rc, os.path.join(self.run_dir, "config.json"))
        if tokenizer is not None:
            if rc.tokenizer.kind != "procedural":
                raise ValueError("Driver(tokenizer=...) needs config tokenizer.kind='procedural'")
            if self.is_writer and not os.path.isfile(os.path.join(self.run_dir, "tokenizer", "tokenizer.json")):
                tokenizer.save_pretrained(os.path.join(self.run_dir, "tokenizer"))
        self.train_items = train_items
        self.tok = tokenizer if tokenizer is not None else load_run_tokenizer(rc.tokenizer, self.run_dir,
                                                                              is_writer=self.is_writer)
        self.ids = SpecialIds.of(self.tok)
        from data_synth.run import teacher_client

        self.teachers = teacher_client(rc)  # None offline; mock user / tools / judge and synthesis share it
        self.world = D.make_world(rc.env, self.teachers)   # training and evaluation episodes alike
        self.mesh = self.model = self.policy = None  # built after round 0's data (synthesis needs no model)
        self._teacher_seen: dict = {}  # teacher usage already logged (per-step deltas)
        from agq_jax.rl.checkpoint import CheckpointManager

        self.ckpt = CheckpointManager(os.path.join(self.run_dir, "checkpoints"), max_to_keep=rc.checkpoint.keep,
                                      async_save=rc.checkpoint.async_save)
        self.trainer = None
        self.phase_kind = None  # "sft" | "grpo": which optimizer the trainer holds
        self.meta = {"round": 0, "phase": "round_start", "sft_step": 0, "grpo_step": 0, "cursors": {},
                     "global_step": 0, "failed": {}, "evals": {}}
        resume = self.ckpt.latest_step()
        if resume is not None:
            self._build_policy()
            self._restore(resume)
        self.log = MetricsLogger(self.run_dir, enabled=self.is_writer, resume_step=resume if resume is not None else None)
        self.heldout = heldout_items if heldout_items is not None else D.fitting(D.heldout_items(rc), rc.env,
                                                                                  self.tok, rc.rollout)[0]

    def _build_policy(self):
        """The mesh, the model (after its memory preflight) and the sampler; once, after round 0's dataset
        exists or at a resume."""
        if self.model is not None:
            return
        rc = self.rc
        self.mesh = make_mesh(rc)
        self.model = build_model(rc, self.tok, self.ids, self.mesh)
        self.policy = Policy(rc, self.model, self.tok, self.ids, self.mesh,
                             make_env=lambda item, tool_cache=None: D.make_env(item, self.world, tool_cache))
        if self.progress:
            print(startup_banner(rc, self.model, self.mesh, self.teachers), flush=True)

    # ------------------------------------------------------------------ trainers and checkpoints
    def _make_trainer(self, kind: str):
        from agq_jax.rl.step import Trainer

        tr = Trainer(self.model, *trainer_configs(self.rc, kind), mesh=self.mesh,
                     seed=self.rc.seed + (0 if kind == "grpo" else 1))
        self.trainer, self.phase_kind = tr, kind
        return tr

    def _train_padding(self) -> dict:
        """Padding of train batches: every batch to rollout.max_len (one compiled shape), or with
        rollout.train_pad_multiple > 0 to its longest row rounded up to that multiple — a few shapes, but
        attention cost grows with T^2, so short episodes in a long budget train several times faster."""
        r = self.rc.rollout
        mult = r.train_pad_multiple
        return {"pad_to_multiple": mult, "max_len": None} if mult > 0 else {"max_len": r.max_len}

    def _sync_model(self):
        self.model = self.trainer.model()
        self.policy.model = self.model

    def _save(self):
        # A deep copy: an async save serializes the metadata later, after the next step has already
        # advanced the (nested, mutable) data cursors and failures in place; a resumed run then skipped
        # the items of the step it re-runs.
        meta = copy.deepcopy(dict(self.meta, trainer=self.phase_kind))
        trees = {"train": self.trainer.state}
        if self.trainer.ref_params is not None:  # the KL reference is the policy GRPO started from (after SFT)
            trees["kl_reference"] = self.trainer.ref_params
        self.ckpt.save(int(self.meta["global_step"]), trees, meta, force=True)

    def _restore(self, step: int):
        # SFT and GRPO trainers share the state structure (same optimizer chain), so restore into a GRPO
        # trainer, read which one was running from the metadata and hand the state to that kind.
        self._make_trainer("grpo")
        targets = {"train": self.trainer.state}
        if self.trainer.ref_params is not None and "kl_reference" in self.ckpt.saved_trees(step):
            targets["kl_reference"] = self.trainer.ref_params
        trees, meta = self.ckpt.restore(targets, step)
        kind = meta.pop("trainer", None) or "grpo"
        if kind != "grpo":
            self._make_trainer(kind)
        self.trainer.state = trees["train"]
        if "kl_reference" in trees:
            self.trainer.ref_params = trees["kl_reference"]
        self.meta.update(meta)
        self._sync_model()
        if self.progress:
            print(f"[resume] global step {step}: round {self.meta['round']}, phase {self.meta['phase']}, "
                  f"sft step {self.meta['sft_step']}, grpo step {self.meta['grpo_step']}", flush=True)

    def _tick(self):
        self.meta["global_step"] += 1

    def _maybe_stop(self):
        if self.stop_after is not None and self.meta["global_step"] >= self.stop_after:
            self.ckpt.wait()
            raise StopRequested(self.meta["global_step"])

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        """Run (or resume) every round; returns {"evals": {tag: headline}, "export": path}."""
        rounds = self.rc.rounds
        export = None
        try:
            while self.meta["round"] < rounds:
                export = self._run_round(int(self.meta["round"]))
        finally:
            self.ckpt.wait()
            self.log.close()
            if self.policy is not None:
                self.policy.close()
            if self.teachers is not None:
                self.teachers.close()
        return {"evals": self.meta["evals"], "export": export or self._export_path(rounds - 1)}

    def _export_path(self, r: int) -> str:
        return os.path.join(self.run_dir, "export", f"round_{r}")

    def _sft_this_round(self, r: int) -> bool:
        s = self.rc.sft
        return s.enabled and s.steps > 0 and (s.rounds == "every" or r == 0)

    def _run_round(self, r: int) -> str:
        rc, m = self.rc, self.meta
        t0 = time.time()
        if self.train_items is not None:
            agentic = [it for it in self.train_items if it.kind == D.AGENTIC]
            reasoning = [it for it in self.train_items if it.kind == D.REASONING]
        else:
            failures = self._read_failures(r)
            agentic, reasoning, _ = D.build_round_dataset(rc, r, failures, client=self.teachers,
                                                          is_writer=self.is_writer)
        if rc.data.accumulate and self.train_items is None:
            for prev in range(r):
                a, q, _ = D.build_round_dataset(rc, prev, None, is_writer=False)
                agentic, reasoning = a + agentic, q + reasoning
        self._build_policy()
        if self.teachers is not None:  # synthesis usage is in the round's manifest; steps log their own
            self._teacher_seen = self.teachers.stats_dict()
        doms = set(rc.data.domains)
        if doms:
            agentic = [it for it in agentic if it.obj.domain in doms]
        if self.train_items is None:
            agentic = agentic + D.task_file_items(rc, heldout=False)   # released / exported task files
        agentic, long_a = D.fitting(agentic, rc.env, self.tok, rc.rollout)
        reasoning, long_r = D.fitting(reasoning, rc.env, self.tok, rc.rollout)
        pools = {D.AGENTIC: agentic, D.REASONING: reasoning}
        counts = {"agentic": len(agentic), "reasoning": len(reasoning),
                  "with_gold": sum(bool(it.gold) for it in agentic + reasoning), "prompt_too_long": long_a + long_r}
        if m["phase"] == "round_start":
            m.update(phase="sft" if self._sft_this_round(r) else "grpo", sft_step=0, grpo_step=0, cursors={})
            if m["phase"] == "grpo" and self.phase_kind != "grpo":
                self._make_trainer("grpo")
        if m["phase"] == "sft":
            self._run_sft(r, agentic + reasoning)
        grpo_rows = self._run_grpo(r, pools)
        res = evaluate(self.policy, self.heldout, rc.eval, rc.seed, tag=f"round{r}")
        m["evals"][f"round{r}"] = headline(res)
        export = self._export_path(r)
        if self.is_writer and (rc.export.every_round or r == rc.rounds - 1):
            export_hf(self.model, rc, self.run_dir, export)
        self._write_failures(r + 1, pools)
        self._tick()
        self.log.log("eval", m["global_step"], res["flat"], round=r, tag=f"round{r}")
        summary = round_summary(r, grpo_rows, {k: v for k, v in self._round_evals(r, res).items()}, counts,
                                time.time() - t0)
        if self.progress:
            print(summary, flush=True)
        if self.is_writer:
            with open(os.path.join(self.run_dir, f"summary_round_{r}.txt"), "w") as f:
                f.write(summary + "\n")
            _atomic_json(os.path.join(self.run_dir, "evals.json"), m["evals"])
        m.update(round=r + 1, phase="round_start", sft_step=0, grpo_step=0, cursors={}, failed={})
        self._save()
        self._maybe_stop()
        return export

    def _round_evals(self, r: int, final: dict) -> dict:
        out = {}
        if getattr(self, "_sft_eval", None) is not None and self._sft_eval[0] == r:
            out["after SFT"] = self._sft_eval[1]
        out["after GRPO"] = final
        return out

    # ------------------------------------------------------------------ SFT
    def _run_sft(self, r: int, items: list[D.Item]):
        rc, m = self.rc, self.meta
        s = rc.sft
        source = s.data
        examples = build_sft_examples(items, self.tok, self.ids, rc) if source == "round" else None
        if source == "round" and not examples:
            raise RuntimeError(f"round {r}: SFT is enabled but no item has verified gold replies that fit "
                               f"rollout.max_len={rc.rollout.max_len}")
        if self.phase_kind != "sft":
            self._make_trainer("sft")
        bar = self._bar(s.steps, m["sft_step"], f"round {r} SFT")
        while m["sft_step"] < s.steps:
            t = time.time()
            if source == "round":
                batch = sft_batch(examples, m["sft_step"], s.batch_size, rc.seed, r, self.ids.pad,
                                  **self._train_padding())
            else:
                rows = procedural_sft_examples(rc, self.tok, self.ids, r, m["sft_step"], s.batch_size)
                batch = collate(rows, self.ids.pad, **self._train_padding())
            stats = self.trainer.train_batch(self.trainer.local_rows(batch), stage="sft")
            m["sft_step"] += 1
            self._tick()
            stats = {f"sft/{k}": v for k, v in stats.items()}
            stats["perf/step_s"] = time.time() - t
            self.log.log("sft", m["global_step"], stats, round=r, step=m["sft_step"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats.get('sft/loss', float('nan')):.3f}")
            if m["sft_step"] % rc.checkpoint.every_steps == 0 or m["sft_step"] == s.steps:
                self._save()
            self._maybe_stop()
        if bar is not None:
            bar.close()
        self._sync_model()
        after_sft = rc.eval.after_sft
        if after_sft:
            res = evaluate(self.policy, self.heldout, rc.eval, rc.seed, tag=f"round{r}_sft")
            m["evals"][f"round{r}_sft"] = headline(res)
            self._sft_eval = (r, res)
        self._make_trainer("grpo")
        m.update(phase="grpo", grpo_step=0, cursors={})
        self._tick()
        if after_sft:
            self.log.log("eval", m["global_step"], res["flat"], round=r, tag=f"round{r}_sft")
        self._save()
        self._maybe_stop()

    # ------------------------------------------------------------------ GRPO
    def _run_grpo(self, r: int, pools: dict) -> list[dict]:
        rc, m = self.rc, self.meta
        n_steps = rc.rl.steps_per_round
        have = {k: len(v) for k, v in pools.items()}
        streams = {k: D.TaskStream(v, rc.seed, r, salt=i) for i, (k, v) in enumerate(pools.items()) if v}
        rows = []
        bar = self._bar(n_steps, m["grpo_step"], f"round {r} GRPO")
        while m["grpo_step"] < n_steps:
            t = time.time()
            stats = self._grpo_step(r, streams, have)
            m["grpo_step"] += 1
            self._tick()
            stats["perf/step_s"] = time.time() - t
            self.log.log("grpo", m["global_step"], stats, round=r, step=m["grpo_step"])
            rows.append(stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{stats['rollout/reward_mean']:.3f}", zv=f"{stats['grpo/zero_variance_frac']:.2f}")
            if m["grpo_step"] % rc.checkpoint.every_steps == 0:
                self._save()
            self._maybe_stop()
        if bar is not None:
            bar.close()
        return rows

    def _draw(self, r: int, streams: dict, have: dict, n: int) -> list[D.Item]:
        counts = D.family_counts(self.rc, r, n, have)
        cur = self.meta["cursors"]
        out = []
        for fam, k in counts.items():
            if k:
                pos = int(cur.get(fam, 0))
                out += streams[fam].take(pos, k)
                cur[fam] = pos + k
        return out

    def _grpo_step(self, r: int, streams: dict, have: dict) -> dict:
        from agq_jax.rl import algo
        from agq_jax.rollout import RolloutBatch, pack_episodes

        rl = self.rc.rl
        g, need = rl.group_size, rl.tasks_per_step
        params = self.policy.sampling()
        t_roll = time.time()
        valid, dropped, all_eps, fams, n_groups, n_error = [], [], [], [], 0, 0
        ask, refills = need, 0
        while True:
            items = self._draw(r, streams, have, ask)
            caches = [SharedToolCache() for _ in items]   # a group's rollouts see one consistent world
            envs = [self.policy.make_env(it, tool_cache=c) for it, c in zip(items, caches) for _ in range(g)]
            batch = self.policy.rollouts(envs, params=params, rng=self.trainer.split_rng(),
                                         group_ids=[i for i in range(len(items)) for _ in range(g)])
            all_eps += batch.episodes
            fams += [it.kind for it in items for _ in range(g)]
            for i, it in enumerate(items):
                eps = batch.episodes[i * g:(i + 1) * g]
                rewards = np.asarray([e.reward for e in eps], np.float32)
                n_groups += 1
                # An episode the environment ended (a teacher outage, a tool backend's bug) says nothing about
                # the policy: its group is neither a flywheel failure nor a training signal (masked like a
                # zero-variance group, refilled under dynamic sampling).
                if any(e.termination == Termination.ERROR for e in eps):
                    n_error += 1
                    dropped.append(eps)
                    continue
                self._note_failure(it, eps, rewards)
                shaped = np.asarray(algo.training_reward(rl.reward, rewards, success_threshold=SUCCESS_THRESHOLD))
                keep = not rl.dynamic_sampling or not bool(algo.zero_variance_groups(shaped[None])[0])
                (valid if keep else dropped).append(eps)
            if len(valid) >= need or refills >= rl.max_refill_batches or not rl.dynamic_sampling:
                break
            refills += 1  # a refill is a full batch again: one sampler shape, no recompiles
        t_roll = time.time() - t_roll
        groups = valid[:need]
        n_valid = len(groups)
        groups += dropped[:need - len(groups)]  # fill with zero-variance groups, loss-masked below
        eps = [e for grp in groups for e in grp]
        packed = pack_episodes(eps, pad_id=self.ids.pad, **self._train_padding(),
                               logprob_source="sampling" if loss_temperature(rl) != 1.0 else "policy")
        rewards = np.asarray(algo.training_reward(rl.reward, np.reshape(packed["rewards"], (len(groups), g)),
                                                  success_threshold=SUCCESS_THRESHOLD))
        kw = {"std_normalize": rl.std_normalize} if rl.advantage == "grpo" else {}
        adv = np.array(algo.compute_advantages(rewards, rl.advantage, **kw), np.float32)
        adv = np.array(algo.weight_negative_advantages(adv, rl.negative_weight), np.float32)  # 1.0: unchanged
        adv[n_valid:] = 0.0
        loss_mask = packed["loss_mask"].copy()
        loss_mask[n_valid * g:] = 0.0
        if rl.overlong_filter:
            loss_mask = np.asarray(algo.overlong_filter(loss_mask, packed["truncated"]), np.float32)
        train_batch = {"input_ids": packed["input_ids"], "attention_mask": packed["attention_mask"],
                       "loss_mask": loss_mask, "old_logprobs": packed["old_logprobs"], "advantages": adv.reshape(-1)}
        t_train = time.time()
        stats = self.trainer.train_batch(self.trainer.local_rows(train_batch), stage="grpo")  # rollouts are gathered
        self._sync_model()
        t_train = time.time() - t_train
        out = RolloutBatch(all_eps).metrics()
        out.update({f"train/{k}": v for k, v in stats.items()})
        gen_tokens = sum(e.num_policy_tokens for e in all_eps)
        out.update({"grpo/zero_variance_frac": (n_groups - n_error - len(valid)) / max(n_groups, 1),
                    "grpo/error_groups": float(n_error),
                    "grpo/valid_groups": float(n_valid), "grpo/refills": float(refills),
                    "grpo/groups_sampled": float(n_groups), "rollout/reward_std": float(np.std([e.reward for e in all_eps])),
                    "rollout/success_rate": float(np.mean([e.reward >= SUCCESS_THRESHOLD for e in all_eps])),
                    "grpo/train_reward_mean": float(rewards.mean()),
                    "perf/rollout_s": t_roll, "perf/train_s": t_train,
                    "perf/tokens_per_s": gen_tokens / max(t_roll, 1e-9),
                    "perf/train_tokens_per_s": float(packed["attention_mask"].sum()) / max(t_train, 1e-9)})
        for fam in (D.AGENTIC, D.REASONING):
            fam_r = [e.reward for e, f in zip(all_eps, fams) if f == fam]
            if fam_r:
                out[f"rollout/{fam}/reward_mean"] = float(np.mean(fam_r))
        out.update(self._teacher_usage())
        return out

    def _teacher_usage(self) -> dict:
        """Teacher calls and failed requests (malformed, timeouts... retried) per role since the last step."""
        if self.teachers is None:
            return {}
        now, out = self.teachers.stats_dict(), {}
        for role in sorted(self.teachers.endpoints):  # every configured role, called or not (same keys each step)
            st, prev = now.get(role, {}), self._teacher_seen.get(role, {})
            out[f"teachers/{role}/calls"] = float(st.get("calls", 0) - prev.get("calls", 0))
            out[f"teachers/{role}/errors"] = float(sum(st.get("errors", {}).values())
                                                   - sum(prev.get("errors", {}).values()))
        self._teacher_seen = now
        return out

    # ------------------------------------------------------------------ failures (flywheel input)
    def _note_failure(self, item: D.Item, eps, rewards: np.ndarray):
        failed = self.meta["failed"]
        mean = float(rewards.mean())
        if mean >= self.rc.flywheel.failure_threshold:
            failed.pop(item.id, None)
            return
        worst = eps[int(np.argmin(rewards))]
        failed[item.id] = {"reward": mean, "episode": episode_for_failure(worst) if item.kind == D.AGENTIC else None}
        if len(failed) > MAX_FAILURES_KEPT:
            drop = max(failed, key=lambda k: failed[k]["reward"])
            failed.pop(drop)

    def _write_failures(self, next_round: int, pools: dict):
        if not self.is_writer:
            return
        by_id = {it.id: it for pool in pools.values() for it in pool}
        rows = [by_id[i].failure_row(f["reward"], f.get("episode")) for i, f in sorted(self.meta["failed"].items())
                if i in by_id]
        os.makedirs(os.path.join(self.run_dir, "failures"), exist_ok=True)
        from data_synth.io_utils import atomic_write_jsonl

        atomic_write_jsonl(os.path.join(self.run_dir, "failures", f"round_{next_round}.jsonl"), rows)

    def _read_failures(self, r: int) -> Optional[list[dict]]:
        path = os.path.join(self.run_dir, "failures", f"round_{r}.jsonl")
        if r == 0 or not os.path.exists(path):
            return None
        from data_synth.io_utils import read_jsonl

        return read_jsonl(path)

    def _bar(self, total: int, done: int, desc: str):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=done, desc=desc, dynamic_ncols=True, leave=False)
