"""A small byte-level BPE trained on the procedural worlds, for the CPU demo.

The real Qwen3 vocabulary has 151,936 rows; for a tiny model on a 2-core CPU the embedding and LM head
would cost more than the whole transformer body (2·H·V FLOPs per token), so `configs/tiny.py` trains a
BPE of a few thousand tokens on text rendered from the procedural worlds instead. Everything else is
Qwen3's: the same 26 added tokens in the same order (at ids after the trained vocabulary), the same chat
template, byte level (any text encodes). Code that needs a special-token id asks the tokenizer
(`tok.convert_tokens_to_ids("<|im_end|>")`), never a constant.

Two pre-tokenizers:
- "qwen2": Qwen2's split regex, so tokens stay inside words as in the real vocabulary;
- "phrases": only digits are split (one token each, so ids are copied digit by digit); BPE may merge
  across spaces and punctuation, so the worlds' fixed text (tool schemas, policy lines, stock replies)
  becomes a few phrase tokens. A level-0 episode shrinks from ~700 tokens to ~130, which is what lets a
  tiny model learn the worlds on a 2-core CPU in minutes (configs/tiny.py). The text is the same; only
  the segmentation differs, and every id the model sees is still one the env's text encodes to.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from agq_jax import tokenizer as qtok


PRETOKENIZERS = ("qwen2", "phrases")


def _without_added_tokens(texts: Iterable[str]) -> Iterable[str]:
    """The pieces of `texts` between added tokens: encoding splits on those first, so a merge across one
    would never be used."""
    pattern = re.compile("|".join(re.escape(c) for c, _ in qtok.ADDED_TOKENS))
    for text in texts:
        yield from (piece for piece in pattern.split(text) if piece)


def train_procedural_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                               pretokenizer: str = "qwen2"):
    """Train a byte-level BPE of `vocab_size` tokens (added tokens included) on `texts`; save and load it.

    `pretokenizer`: "qwen2" | "phrases" (see the module docstring). The files are written to a temp dir and
    renamed into `out_dir` (replacing it), so an interrupted run never leaves a half-written tokenizer.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    n_added = len(qtok.ADDED_TOKENS)
    if vocab_size < 256 + n_added + 1:
        raise ValueError(f"vocab_size={vocab_size} too small: need > {256 + n_added} (bytes + added tokens)")
    if pretokenizer not in PRETOKENIZERS:
        raise ValueError(f"pretokenizer must be one of {PRETOKENIZERS}, got {pretokenizer!r}")
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    split = (pre_tokenizers.Split(Regex(qtok.QWEN2_SPLIT_REGEX), behavior="isolated", invert=False)
             if pretokenizer == "qwen2" else pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_without_added_tokens(texts), trainer=trainer)
    base = tok.get_vocab_size()
    for content, special in qtok.ADDED_TOKENS:
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    ids = {c: tok.token_to_id(c) for c, _ in qtok.ADDED_TOKENS}
    if sorted(ids.values()) != list(range(base, base + n_added)):
        raise RuntimeError(f"added tokens not contiguous after the trained vocabulary: {ids}")

    config = qtok.tokenizer_config_dict()
    config["added_tokens_decoder"] = {
        str(ids[c]): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": s} for c, s in qtok.ADDED_TOKENS}
    config["model_max_length"] = 32768
    # Not Qwen2Tokenizer: AutoTokenizer would rebuild Qwen2's split regex over our pre-tokenizer, so a
    # transformers user of an export would feed the model ids it never saw ("phrases" prompts ~30x longer).
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_procedural_tokenizer(out)


def load_procedural_tokenizer(path: str | os.PathLike):
    """Load a tokenizer written by `train_procedural_tokenizer` (chat template attached)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}/tokenizer.json: no procedural tokenizer here (train one first)")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.chat_template = qtok.QWEN3_CHAT_TEMPLATE
    for content, _ in qtok.ADDED_TOKENS:
        if tok.convert_tokens_to_ids(content) in (None, tok.unk_token_id):
            raise RuntimeError(f"{path}: added token {content!r} missing")
    return tok



