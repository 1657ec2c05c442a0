"""The demo's procedural BPE (agq_jax/tokenizer_procedural.py): Qwen3's added tokens and chat template on a
small trained vocabulary, and files that transformers' AutoTokenizer loads to the very same ids — an HF
export of the demo is only usable if a transformers user tokenizes prompts as the trainer did."""
import json

import pytest

from agq_jax import tokenizer as qtok
from agq_jax import tokenizer_procedural as ptok


@pytest.fixture(scope="module")
def corpus():
    from agq_jax.driver.vocab import procedural_corpus

    return procedural_corpus(n_tasks=60, n_problems=10)


@pytest.fixture(scope="module")
def env_prompt():
    from agq_jax.envs import make_env
    from agq_jax.envs.worlds.generator import generate_tasks

    env = make_env(generate_tasks(1, seed=3, split="heldout")[0], user="scripted", tools="auto")
    return env.reset(), env.tool_schemas


@pytest.mark.parametrize("pretokenizer", ptok.PRETOKENIZERS)
def test_autotokenizer_matches_trainer_tokenizer(tmp_path, corpus, env_prompt, pretokenizer):
    from transformers import AutoTokenizer

    tok = ptok.train_procedural_tokenizer(corpus, 700, tmp_path / "tok", pretokenizer=pretokenizer)
    assert len(tok) == 700
    base = len(tok) - len(qtok.ADDED_TOKENS)
    assert [tok.convert_tokens_to_ids(c) for c, _ in qtok.ADDED_TOKENS] == list(range(base, len(tok)))

    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    messages, tools = env_prompt
    mine = qtok.encode_chat(tok, messages, tools, add_generation_prompt=True, enable_thinking=False)
    theirs = auto.apply_chat_template(messages, tools=tools, add_generation_prompt=True, enable_thinking=False)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert list(theirs) == mine
    text = "Order O-40312 refunded: $75.20 <tool_call>\n{\"name\": \"x\"}\n</tool_call><|im_end|>"
    assert auto.encode(text) == tok.encode(text) and tok.decode(tok.encode(text)) == text
    if pretokenizer == "phrases":
        digits = [tok.decode([i]) for i in tok.encode("40312")]
        assert digits == list("40312")  # ids are copied digit by digit
        assert len(mine) < 0.5 * len(qtok.encode_chat(
            ptok.train_procedural_tokenizer(corpus, 700, tmp_path / "q", pretokenizer="qwen2"),
            messages, tools, add_generation_prompt=True, enable_thinking=False))
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == qtok.QWEN3_CHAT_TEMPLATE and cfg["eos_token"] == "<|im_end|>"


def test_bad_pretokenizer_and_vocab_size(tmp_path, corpus):
    with pytest.raises(ValueError, match="pretokenizer must be one of"):
        ptok.train_procedural_tokenizer(corpus, 700, tmp_path / "a", pretokenizer="words")
    with pytest.raises(ValueError, match="too small"):
        ptok.train_procedural_tokenizer(corpus, 100, tmp_path / "b")
