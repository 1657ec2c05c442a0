"""The run's tokenizer: the real Qwen3 vocabulary, or a small BPE trained on the procedural worlds.

Why a procedural vocabulary exists: with a tiny model (hidden 64-128) the 151,936-row LM head costs ~50x
the transformer body per token, so the CPU demo trains a few-thousand-token BPE with Qwen3's added tokens
and chat template instead (configs/tiny.py, tokenizer.kind="procedural"). Every special id the driver
needs is asked of the tokenizer, never taken from the real-vocabulary constants.
"""
from __future__ import annotations

import os
from pathlib import Path

from agq_jax import tokenizer as qtok
from agq_jax import tokenizer_procedural as ptok


def procedural_corpus(n_tasks: int = 600, seed: int = 12345, n_problems: int = 200) -> list[str]:
    """Texts the procedural BPE is trained on: rendered gold trajectories of every domain / branch at
    levels 0-2 plus procedural reasoning problems (a fixed seed stream, disjoint from training seeds)."""
    from agq_jax.envs.worlds.generator import Knobs, generate_tasks
    from agq_jax.envs.reasoning_problems import generate_seed_set

    real = qtok.load_qwen3_tokenizer()  # only for the template render; the text is vocabulary-independent
    texts = []
    for level in (0, 1, 2):
        for t in generate_tasks(n_tasks // 3, seed=seed + level, knobs=Knobs(level=level), split="corpus"):
            tools = t.openai_tools(include_outputs=t.metadata.get("render_outputs", True))  # as the env renders them
            texts.append(real.apply_chat_template(t.gold_trajectory, tools=tools, tokenize=False, enable_thinking=False))
    for p in generate_seed_set(n_problems, seed):
        texts.append(f"{p.question}\n\\boxed{{{p.answer}}}\n" + "\n".join(d["text"] for d in p.documents))
    return texts


def load_run_tokenizer(tc, run_dir: str | os.PathLike, *, is_writer: bool = True):
    """The tokenizer of `tc` (the run config's `tokenizer` section: kind qwen3 | procedural). A procedural one
    is trained once into `run_dir/tokenizer` and reloaded from there afterwards (a resumed run keeps its ids)."""
    if tc.kind == "qwen3":
        return qtok.load_qwen3_tokenizer()
    path = Path(run_dir) / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        if not is_writer:
            raise FileNotFoundError(f"{path}: process 0 has not written the procedural tokenizer yet")
        if tc.vocab_size <= 0:
            raise ValueError("config tokenizer.vocab_size must be > 0 to train a procedural tokenizer")
        return ptok.train_procedural_tokenizer(procedural_corpus(), tc.vocab_size, path, pretokenizer=tc.pretokenizer)
    return ptok.load_procedural_tokenizer(path)
