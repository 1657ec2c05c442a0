"""A small byte-level BPE trained on the procedural worlds, for the CPU demo.

The real Qwen3 vocabulary has 151,936 rows; for a tiny model on a 2-core CPU the embedding and LM head
would cost more than the whole transformer body (2·H·V FLOPs per token), so `configs/tiny.py` trains a
BPE of a few thousand tokens on text rendered from the procedural worlds instead. Everything else is
Qwen3's: the same pre-tokenizer (Qwen2 split regex + byte level, so any text encodes), the same 26
added tokens in the same order (at ids after the trained vocabulary), the same chat template. Code that
needs a special-token id asks the tokenizer (`tok.convert_tokens_to_ids("<|im_end|>")`), never a constant.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from agq_jax import tokenizer as qtok


def train_procedural_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE of `vocab_size` tokens (added tokens included) on `texts`; save and load it.

    The files are written to a temp dir and renamed into `out_dir` (replacing it), so an interrupted
    run never leaves a half-written tokenizer behind.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    n_added = len(qtok.ADDED_TOKENS)
    if vocab_size < 256 + n_added + 1:
        raise ValueError(f"vocab_size={vocab_size} too small: need > {256 + n_added} (bytes + added tokens)")
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qtok.QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
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


def special_ids(tok) -> dict[str, int]:
    """Ids of the tokens the sampler and packer need, asked of the tokenizer (works for both vocabularies)."""
    get = tok.convert_tokens_to_ids
    return {"im_end": get("<|im_end|>"), "endoftext": get("<|endoftext|>"), "im_start": get("<|im_start|>"),
            "tool_call_end": get("</tool_call>"), "pad": get(tok.pad_token or "<|endoftext|>")}
