"""The one derivation of a run's Qwen3Config, used by the driver, from_pretrained, the compile-ahead tool and
the cpu-smoke checkpoint writer.

Architecture: the HF checkpoint's config.json when `model.hf_path` holds one (it wins over `model.preset`,
which must then name the same family), else the preset (also what compile-ahead planning uses when the
weights are not on this machine). Then `model.overrides`, the training fields (remat, attention kernel,
MoE kernel), and for a procedural vocabulary its size and special ids.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from agq_jax.models.config import PRESETS, Qwen3Config


def checkpoint_config(hf_path: str) -> Qwen3Config | None:
    """The architecture in `hf_path`/config.json, or None when there is no such file."""
    path = pathlib.Path(hf_path) / "config.json"
    if not hf_path or not path.is_file():
        return None
    try:
        return Qwen3Config.from_hf_dict(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None


def model_config(rc, *, vocab=None, weights_optional: bool = False) -> Qwen3Config:
    """Qwen3Config of `rc` (a RunConfig).

    vocab: (vocab_size, pad_id, eos_ids) of a procedural tokenizer (tokenizer.kind="procedural"); required
    then. weights_optional: with model.hf_path set but absent on this machine, fall back to model.preset
    (compile-ahead / memory planning) instead of failing."""
    m = rc.model
    base = checkpoint_config(m.hf_path) if m.hf_path else None
    preset = PRESETS[m.preset] if m.preset else None
    if base is None and m.hf_path and not weights_optional:
        raise FileNotFoundError(f"config model.hf_path={m.hf_path!r}: no config.json there (an HF checkpoint "
                                f"directory: config.json + *.safetensors; docs/launch.md, 'Weights')")
    if base is not None and preset is not None and base.model_type != preset.model_type:
        raise ValueError(f"config model.hf_path={m.hf_path!r} holds a {base.model_type} checkpoint but "
                         f"model.preset={m.preset!r} is {preset.model_type}: point hf_path at the right weights")
    if base is None:
        if preset is None and m.hf_path:
            raise FileNotFoundError(f"config model.hf_path={m.hf_path!r} is absent and model.preset is empty: "
                                    f"nothing defines the architecture")
        base = preset if preset is not None else Qwen3Config()
    names = {f.name for f in dataclasses.fields(Qwen3Config)}
    over = dict(m.overrides)
    bad = sorted(set(over) - names)
    if bad:
        raise ValueError(f"config model.overrides: unknown Qwen3Config fields {bad}")
    over.update(remat=m.remat, attention_impl=m.attention_impl, moe_impl=m.moe_impl)
    if rc.tokenizer.kind == "procedural":
        if vocab is None:
            raise ValueError("model_config: tokenizer.kind='procedural' needs the trained tokenizer's vocab")
        size, pad, eos = vocab
        over.update(vocab_size=-(-int(size) // 64) * 64, bos_token_id=None, eos_token_id=tuple(eos),
                    pad_token_id=int(pad), torch_dtype="float32")
    for k in ("eos_token_id", "mlp_only_layers"):
        if isinstance(over.get(k), list):
            over[k] = tuple(over[k])
    return dataclasses.replace(base, **over)
