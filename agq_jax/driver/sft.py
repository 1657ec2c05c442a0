"""Supervised warm start on expert trajectories, tokenized exactly as the sampler would produce them.

For each item the gold replies are replayed through a fresh env and the sequence is built by appending,
as `rollout.multiturn` does: the prompt (`encode_chat(add_generation_prompt=True)`, loss 0), then per
reply its tokens with loss 1 — closed by `<|im_end|>` (loss 1) unless the reply ends in `</tool_call>`,
where the sampler stops and the env suffix supplies `<|im_end|>` (loss 0) — then the env turns
(`encode_env_turns`, loss 0). So SFT and GRPO train on the same token stream the policy sees.
"""
from __future__ import annotations

import numpy as np

from agq_jax import tokenizer as qtok
from agq_jax.driver.data import Item, make_env, make_world
from agq_jax.tokenizer import SpecialIds


def expert_sequence(item: Item, tok, ids: SpecialIds, rc) -> dict | None:
    """{token_ids, loss_mask} of the item's gold episode (replayed in the scripted world), or None without
    verified gold replies."""
    if not item.gold:
        return None
    thinking = rc.rollout.enable_thinking
    stop_on_tool_call = rc.rollout.stop_on_tool_call
    env = make_env(item, make_world(rc.env, scripted=True))
    msgs = env.reset()
    tools = None if env.embed_tools else (env.tool_schemas or None)
    token_ids = qtok.encode_chat(tok, msgs, tools, add_generation_prompt=True, enable_thinking=thinking)
    mask = [0] * len(token_ids)
    for reply in item.gold:
        reply_ids = tok.encode(reply, add_special_tokens=False)
        stops_on_tool = stop_on_tool_call and bool(reply_ids) and reply_ids[-1] == ids.tool_call_end
        if not stops_on_tool:
            reply_ids = reply_ids + [ids.im_end]
        token_ids += reply_ids
        mask += [1] * len(reply_ids)
        res = env.step(reply, num_tokens=len(reply_ids))
        if res.done:
            break
        suffix = qtok.encode_env_turns(tok, res.new_messages, enable_thinking=thinking, after_im_end=not stops_on_tool)
        token_ids += suffix
        mask += [0] * len(suffix)
    return {"token_ids": token_ids, "loss_mask": mask, "task_id": item.id}


def build_sft_examples(items: list[Item], tok, ids: SpecialIds, rc) -> list[dict]:
    """Expert sequences of every item with gold replies that fit in rollout.max_len tokens.

    sft.loss_on: "policy" (default) trains on the agent's tokens only; "all" also on the system prompt,
    user and tool turns — a warm start for a randomly initialised model, which must first learn the worlds'
    language (tool responses repeat ids from the calls: several times the copying signal per sequence)."""
    out = []
    for item in items:
        ex = _training_example(item, tok, ids, rc)
        if ex is not None:
            out.append(ex)
    return out


def _training_example(item: Item, tok, ids: SpecialIds, rc) -> dict | None:
    """The item's expert sequence with sft.loss_on applied, or None (no gold / longer than rollout.max_len)."""
    ex = expert_sequence(item, tok, ids, rc)
    if ex is None or len(ex["token_ids"]) > rc.rollout.max_len:
        return None
    if rc.sft.loss_on == "all":
        ex["loss_mask"] = [0] + [1] * (len(ex["token_ids"]) - 1)
    return ex


def sft_batch(examples: list[dict], step: int, batch_size: int, seed: int, round_idx: int, pad_id: int,
              max_len: int | None = None, pad_to_multiple: int = 64) -> dict[str, np.ndarray]:
    """Batch `step` of the SFT stream: epoch permutations seeded by (seed, round, epoch) — resumable by step."""
    from agq_jax.rl.batch import collate

    n = len(examples)
    rows = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        perm = np.random.default_rng([seed, round_idx, 7, j // n]).permutation(n)
        rows.append(examples[int(perm[j % n])])
    return collate(rows, pad_id, pad_to_multiple=pad_to_multiple, max_len=max_len)


def procedural_sft_examples(rc, tok, ids: SpecialIds, round_idx: int, step: int, batch_size: int) -> list[dict]:
    """Batch `step` of a never-repeating stream of fresh procedural tasks' gold episodes (sft.data =
    "procedural"): row g = step * batch_size + j is task g of the domains x branch-types cycle, seeded by
    (seed, round, g) on its own split, so it is resumable by step and disjoint from the round's dataset and
    the held-out set. Why: a randomly initialised tiny model trained on a fixed few thousand tasks memorises
    them (measured: 95% next-token accuracy on its training tasks, 69% on fresh ones) instead of learning
    to read the policy and copy ids; on a stream it cannot memorise."""
    import zlib

    from agq_jax.driver.data import AGENTIC, verify_gold
    from agq_jax.envs.worlds.generator import BRANCH_TYPES, Knobs, all_domains, generate_task

    world = make_world(rc.env, scripted=True)
    domains = sorted(rc.data.domains) if rc.data.domains else all_domains()
    combos = [(d, b) for d in domains for b in BRANCH_TYPES]
    knobs = Knobs(level=rc.synth.agentic.level)
    out = []
    g = step * batch_size
    while len(out) < batch_size:
        d, b = combos[g % len(combos)]
        seed = zlib.crc32(f"{rc.seed}|{round_idx}|{g}".encode())
        g += 1
        task = generate_task(d, b, seed, knobs, split="sft")
        item = Item(AGENTIC, task.id, task)
        item.gold = verify_gold(item, world)
        ex = _training_example(item, tok, ids, rc)
        if ex is not None:
            out.append(ex)
    return out

