"""Where a policy mis-copies: teacher-forced next-token accuracy on gold episodes (a diagnostic, not in `run_all`).

Gold episodes of fresh level-0 procedural tasks are replayed through the scripted world and fed to an HF
export of a run (agq_jax's own forward, no sampling); at every agent token the argmax is compared with the
gold token. Tokens are sorted into `digit` (an ID or amount digit), `choice` (a token holding the value of
the write tool's enum parameter: the payee, slot, channel the user named) and `text`. For choice tokens the
swaps (gold -> predicted value) are counted, and how many errors pick the enum's first option.

Why: `failure_modes.py` says a sampled episode wrote the wrong payee; this says whether the model could have
copied it at all when every earlier token was right, and from where it takes the value instead (the first
option of the tool schema's enum, seen in the system prompt, means it reads the schema, not the user).

Usage: python benchmarks/copy_probe.py RUN_DIR [RUN_DIR ...] [--export round_1|checkpoint] [--tasks 8] [--json]
RUN_DIR is a training run directory (its tokenizer/, config.json and export/<round>/, or with `--export
checkpoint` its latest checkpoints/<step>: an SFT-only run has no export of its own).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BRANCHES = ("legal", "clarification")       # the branch types whose gold path writes a chosen value
LISTED_WITHIN = 24                          # characters between two options' starts that make them a listing


def token_classes(tok, token_ids: list[int], options: list[str]) -> list[str]:
    """digit | choice | text per token (`options`: the write tool's enum values). A token is `choice` when it
    overlaps an occurrence of a word-valued option in the decoded text (a value may span several tokens, or
    share one with fixed text: "...(payee: savings)?"), unless another option stands next to it (a listing,
    "(landlord or savings)", is fixed text, not a choice); options that are digits are copied as digits."""
    pieces = [tok.decode([t]) for t in token_ids]
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    text = "".join(pieces)
    found = [(m.start(), m.end(), o) for o in options if not o[:1].isdigit()
             for m in re.finditer(r"\b" + re.escape(o) + r"\b", text)]
    marked = [False] * len(text)
    for a, b, o in found:
        if not any(o2 != o and abs(a2 - a) <= LISTED_WITHIN for a2, _, o2 in found):
            marked[a:b] = [True] * (b - a)
    out = []
    for p, a in zip(pieces, starts):
        if p.strip().isdigit():
            out.append("digit")
        else:
            out.append("choice" if any(marked[a:a + len(p)]) else "text")
    return out


def _value(piece: str, options: list[str]) -> str | None:
    """The option a token stands for: one it contains, else the only one containing it (a piece of a value)."""
    hits = [o for o in options if o in piece]
    if hits:
        return max(hits, key=len)
    inside = [o for o in options if len(piece.strip()) >= 2 and piece.strip() in o]
    return inside[0] if len(inside) == 1 else None


def probe(rc, tok, predict, n_tasks: int) -> dict:
    """Counts over `n_tasks` gold episodes per domain x branch type; `predict(token_ids) -> argmax per position`."""
    from agq_jax.driver.data import AGENTIC, Item, make_world, verify_gold
    from agq_jax.driver.sft import expert_sequence
    from agq_jax.envs.users import wanted_options
    from agq_jax.envs.worlds.generator import Knobs, all_domains, generate_task
    from agq_jax.tokenizer import SpecialIds

    ids = SpecialIds.of(tok)
    world = make_world(rc.env, scripted=True)
    right, seen, swaps, first = (collections.Counter() for _ in range(4))
    for domain in all_domains():
        for branch in BRANCHES:
            for s in range(n_tasks):
                task = generate_task(domain, branch, 10_000 + s, Knobs(level=0), split="probe")
                item = Item(AGENTIC, task.id, task)
                item.gold = verify_gold(item, world)
                ex = expert_sequence(item, tok, ids, rc)
                (_, options), = wanted_options(task)   # the write's enum, in the schema's order
                x = ex["token_ids"]
                pred = predict(x)
                classes = token_classes(tok, x, options)
                for j in range(1, len(x)):
                    if not ex["loss_mask"][j]:
                        continue
                    seen[(branch, classes[j])] += 1
                    ok = int(pred[j - 1]) == x[j]
                    right[(branch, classes[j])] += ok
                    if classes[j] == "choice" and not ok:
                        want = _value(tok.decode([x[j]]), options)
                        got = _value(tok.decode([int(pred[j - 1])]), options)
                        swaps[(domain, f"{want} -> {got}" if got != want else f"{want} (other token)")] += 1
                        first[branch] += got == options[0] and want != options[0]
    acc = {f"{b}/{c}": {"right": right[(b, c)], "n": seen[(b, c)], "accuracy": right[(b, c)] / seen[(b, c)]}
           for b, c in sorted(seen)}
    errors = {b: seen[(b, "choice")] - right[(b, "choice")] for b in BRANCHES}
    return {"tasks_per_domain": n_tasks, "accuracy": acc,
            "choice_errors_first_option": {b: (first[b], errors[b]) for b in BRANCHES},
            "swaps": {f"{d}: {s}": n for (d, s), n in swaps.most_common()}}


def probe_run(run_dir: str, export: str, n_tasks: int) -> dict:
    """`probe` of a run's export (agq_jax's forward, jitted per padded length)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from agq_jax.models import qwen3
    from agq_jax.run_config import RunConfig
    from agq_jax.tokenizer_procedural import load_procedural_tokenizer

    with open(os.path.join(run_dir, "config.json")) as f:
        rc = RunConfig.from_configdict(json.load(f))
    tok = load_procedural_tokenizer(os.path.join(run_dir, "tokenizer"))
    if export == "checkpoint":  # the run's latest checkpoint: an SFT-only run, or one stopped mid-round
        from agq_jax.driver import build
        model, _ = build.load_run_model(*build.run_checkpoint(run_dir))
    else:
        model = qwen3.from_pretrained(os.path.join(run_dir, "export", export), dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t).logits.argmax(-1))

    def predict(token_ids):
        x = np.asarray(token_ids, np.int32)[None]
        x = np.pad(x, ((0, 0), (0, -x.shape[1] % 64)))   # causal: the padded tail changes nothing before it
        return np.asarray(forward(state, jnp.asarray(x)))[0]

    return {"run": run_dir, "export": export, **probe(rc, tok, predict, n_tasks)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--export", default="round_1",
                    help="export/<this> of each run, or 'checkpoint': its latest training checkpoint")
    ap.add_argument("--tasks", type=int, default=8, help="tasks per domain and branch type")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for run in args.runs:
        r = probe_run(run, args.export, args.tasks)
        if args.json:
            print(json.dumps(r))
            continue
        print(f"== {run} (export {args.export}, {args.tasks} tasks per domain x branch)")
        for k, v in r["accuracy"].items():
            print(f"  {k:24s} {v['accuracy']:6.1%}  ({v['right']}/{v['n']} tokens)")
        for b, (n_first, n_err) in r["choice_errors_first_option"].items():
            print(f"  {b}: {n_err} choice tokens wrong, {n_first} of them the enum's first option")
        print("  swaps: " + ", ".join(f"{k} x{n}" for k, n in list(r["swaps"].items())[:8]))


if __name__ == "__main__":
    main()
