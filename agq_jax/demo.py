"""`make demo`: the tiny flywheel end to end (configs/tiny.py), then proof that it learned and exported.

1. Runs `Driver(configs/tiny.py)`: procedural round-0 data, a short SFT warm start, GRPO rounds with
   flywheel expansion, held-out evaluation after SFT and after every round, an HF export per round.
2. Prints the held-out metrics of the SFT-only checkpoint next to those after GRPO (same tasks, same seeds).
3. Loads the last export with transformers (AutoModelForCausalLM + AutoTokenizer) and prints one chat reply
   on a held-out task.

Environment: AGQ_DEMO_RUN_DIR (default runs/tiny_demo; an existing run there is resumed, delete it to
start over), AGQ_DEMO_SMALL=1 shrinks every phase to a few steps (tests / notebooks).
"""
from __future__ import annotations

import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(path: str | os.PathLike = ROOT / "configs" / "tiny.py"):
    """The ConfigDict of a config file (configs/tiny.py by default)."""
    from agq_jax.run_config import load_configdict

    return load_configdict(str(path))


def shrink(cfg):
    """A few-step version of a config (smoke runs of the notebook / demo)."""
    cfg.rounds = 2
    cfg.sft.steps, cfg.sft.batch_size = 2, 2
    cfg.rl.update(steps_per_round=1, tasks_per_step=2, group_size=2, mini_batch_tasks=2)
    cfg.data.heldout_tasks = 2
    cfg.eval.update(k=1, batch_size=4)
    cfg.rollout.update(max_new_tokens_per_turn=12)
    cfg.env.update(max_agent_turns=3)
    cfg.synth.agentic.update(num_procedural=4, procedural_per_round=1)
    cfg.model.overrides.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1)
    return cfg


BENCHMARK_FIGURES = ROOT / "docs" / "learning_benchmark.json"


def seed_spread(impl: str, path: str | os.PathLike = BENCHMARK_FIGURES) -> dict:
    """{metric: (SFT-only stats, after-GRPO stats)} over seeds from the learning benchmark's committed figures
    (benchmarks/bench_learning.py) for this attention_impl; {} when they are missing."""
    import json

    try:
        with open(path) as f:
            agg = json.load(f)["aggregate"].get(impl, {})
    except (OSError, KeyError, ValueError):
        return {}
    sft, grpo = agg.get("sft", {}).get("round0_sft", {}), agg.get("grpo", {}).get("round1", {})
    return {k: (sft[k], grpo[k]) for k in sft if k in grpo}


def comparison_table(evals: dict, before: str = "round0_sft", after: str | None = None,
                     spread: dict | None = None) -> str:
    """Held-out headline metrics of the SFT-only checkpoint next to those after GRPO, and beside them the
    mean ± std over seeds of the same recipe (the learning benchmark), so a run can be read against it."""
    if after is None:
        rounds = sorted((k for k in evals if k.startswith("round") and not k.endswith("_sft")),
                        key=lambda k: int(k[5:]))
        after = rounds[-1]
    a, b = evals.get(before, {}), evals[after]
    spread = spread or {}
    n = max((s[0]["n"] for s in spread.values()), default=0)
    head = f"{'held-out metric':22s}{'SFT only':>10s}{'after GRPO':>12s}{'delta':>8s}"
    if spread:
        head += f"   {'over ' + str(n) + ' seeds: SFT only':>26s}{'after GRPO':>16s}{'delta (± se)':>17s}"
    lines = [head]
    for k in b:
        if k in a:
            name = k.removeprefix("eval/all/")
            row = f"{name:22s}{a[k]:10.3f}{b[k]:12.3f}{b[k] - a[k]:+8.3f}"
            s = spread.get(f"all/{name}")
            if s:
                sa, sb = s
                d = [y - x for x, y in zip(sa["values"], sb["values"])]
                se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
                row += (f"   {sa['mean']:>19.3f} ± {sa['std']:.3f}{sb['mean']:>9.3f} ± {sb['std']:.3f}"
                        f"{float(np.mean(d)):>+10.3f} ± {se:.3f}")
            lines.append(row)
    return "\n".join(lines)


def chat_with_export(export_dir: str, rc, max_new_tokens: int = 96) -> str:
    """One greedy chat turn of the exported model (transformers) on the first held-out task's opening."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agq_jax.driver.data import heldout_items, make_env, make_world
    from agq_jax.tokenizer import SpecialIds

    item = heldout_items(rc)[0]
    env = make_env(item, make_world(rc.env, scripted=True))
    messages = env.reset()
    tools = None if env.embed_tools else (env.tool_schemas or None)  # as the rollouts render it
    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, enable_thinking=False,
                                  return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    special = SpecialIds.of(tok)   # the same stop ids as the rollouts
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(special.stop_ids),
                             pad_token_id=special.endoftext)
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
    return f"[{item.domain} / {item.branch}] user: {messages[-1]['content']}\n[agent, transformers] {reply}"


def main() -> int:
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from agq_jax.driver import Driver
    from agq_jax.run_config import RunConfig

    cfg = load_config()
    if os.environ.get("AGQ_DEMO_SMALL"):
        shrink(cfg)
    cfg.run_dir = os.environ.get("AGQ_DEMO_RUN_DIR", str(ROOT / "runs" / "tiny_demo"))
    rc = RunConfig.from_configdict(cfg)
    t0, cpu0 = time.time(), time.process_time()
    result = Driver(rc).run()
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    spread = {} if os.environ.get("AGQ_DEMO_SMALL") else seed_spread(rc.model.attention_impl)
    print("\n" + comparison_table(result["evals"], spread=spread))
    print(f"({rc.data.heldout_tasks} held-out tasks, same tasks and seeds for both columns. greedy_*: one greedy "
          f"episode per task; pass@1 / pass@k: mean / any success over {rc.eval.k} samples per task at "
          f"T={rc.eval.temperature}; pass^k: all k succeed; reward: the rubric's partial credit in [0, 1].)")
    if spread:
        print(f"(Right: mean ± std over seeds of the same config, attention_impl={rc.model.attention_impl}, from "
              f"{BENCHMARK_FIGURES.relative_to(ROOT)} (benchmarks/bench_learning.py); this run is seed {rc.seed}. "
              f"A column outside about 2 std of its mean is a finding, not noise.)")
    print(f"\nflywheel wall time: {wall:.0f}s (CPU time {cpu:.0f}s over {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}); export: {result['export']}")
    print("\n" + chat_with_export(result["export"], rc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
