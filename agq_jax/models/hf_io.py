"""HF safetensors <-> agq_jax Qwen3 params.

Loading opens each shard lazily and reads one HF tensor at a time, writing it (transposed / stacked into the
[layers, ...] NNX layout) straight into the target sharding via `jax.make_array_from_callback`, so no host ever
holds more than one stacked param's local shard. Export gathers one safetensors shard at a time, writes into a
temp dir and renames it into place.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from agq_jax.models.config import DEFAULT_MAX_SHARD_BYTES, Qwen3Config
from agq_jax.models.qwen3 import Qwen3ForCausalLM

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
QWEN3_TOKENIZER_SIZE = 151669
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_NP_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    """A checkpoint does not match the config: missing / unexpected key or wrong shape."""


def _ident(w, c):
    return w


def _t(w, c):
    return w.T


def _heads_in(n_attr):
    return lambda w, c: w.T.reshape(c.hidden_size, getattr(c, n_attr), c.head_dim)


def _heads_out(w, c):
    return w.reshape(c.hidden_size, -1).T


def _bias_in(n_attr):
    return lambda w, c: w.reshape(getattr(c, n_attr), c.head_dim)


def _flat(w, c):
    return w.reshape(-1)


# our path inside a decoder layer -> (HF key suffix, HF->ours, ours->HF, per-expert)
_LAYER = {
    ("self_attn", "q_proj"): ("self_attn.q_proj.weight", _heads_in("num_attention_heads"), _heads_out, False),
    ("self_attn", "k_proj"): ("self_attn.k_proj.weight", _heads_in("num_key_value_heads"), _heads_out, False),
    ("self_attn", "v_proj"): ("self_attn.v_proj.weight", _heads_in("num_key_value_heads"), _heads_out, False),
    ("self_attn", "o_proj"): ("self_attn.o_proj.weight",
                              lambda w, c: w.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size),
                              lambda w, c: w.reshape(-1, c.hidden_size).T, False),
    ("self_attn", "q_bias"): ("self_attn.q_proj.bias", _bias_in("num_attention_heads"), _flat, False),
    ("self_attn", "k_bias"): ("self_attn.k_proj.bias", _bias_in("num_key_value_heads"), _flat, False),
    ("self_attn", "v_bias"): ("self_attn.v_proj.bias", _bias_in("num_key_value_heads"), _flat, False),
    ("self_attn", "o_bias"): ("self_attn.o_proj.bias", _ident, _ident, False),
    ("self_attn", "q_norm", "weight"): ("self_attn.q_norm.weight", _ident, _ident, False),
    ("self_attn", "k_norm", "weight"): ("self_attn.k_norm.weight", _ident, _ident, False),
    ("input_layernorm", "weight"): ("input_layernorm.weight", _ident, _ident, False),
    ("post_attention_layernorm", "weight"): ("post_attention_layernorm.weight", _ident, _ident, False),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", _t, _t, False),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", _t, _t, False),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", _t, _t, False),
    ("mlp", "gate"): ("mlp.gate.weight", _t, _t, False),
    ("mlp", "experts_gate_proj"): ("mlp.experts.{e}.gate_proj.weight", _t, _t, True),
    ("mlp", "experts_up_proj"): ("mlp.experts.{e}.up_proj.weight", _t, _t, True),
    ("mlp", "experts_down_proj"): ("mlp.experts.{e}.down_proj.weight", _t, _t, True),
}
_TOP = {
    ("embed_tokens",): ("model.embed_tokens.weight", _ident, _ident),
    ("norm", "weight"): ("model.norm.weight", _ident, _ident),
    ("lm_head",): ("lm_head.weight", _t, _t),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One NNX param and the HF tensors it is made of."""

    path: tuple
    template: str  # HF key, with {l} / {e} placeholders for stacked params
    to_ours: Callable
    to_hf: Callable
    layers: tuple[int, ...] | None  # global layer index of each stacked row
    num_experts: int | None

    def items(self):
        """(hf_key, layer row, expert) for every HF tensor of this param."""
        if self.layers is None:
            return [(self.template, None, None)]
        return [(self.template.format(l=l, e=e), i, e) for i, l in enumerate(self.layers)
                for e in (range(self.num_experts) if self.num_experts else [None])]


def param_entries(cfg: Qwen3Config, state) -> list[Entry]:
    """Map every Variable path of a model's state to its HF keys (fails loudly on an unmapped path)."""
    entries = []
    for path, _ in nnx.to_flat_state(state):
        path = tuple(path)
        if path[0] == "blocks":
            _, start, count = cfg.layer_groups()[int(path[1])]
            key = path[3:]
            if key not in _LAYER:
                raise KeyError(f"no HF mapping for param {'.'.join(map(str, path))}")
            suffix, fwd, bwd, per_expert = _LAYER[key]
            entries.append(Entry(path, "model.layers.{l}." + suffix, fwd, bwd, tuple(range(start, start + count)),
                                 cfg.num_experts if per_expert else None))
        else:
            if path not in _TOP:
                raise KeyError(f"no HF mapping for param {'.'.join(map(str, path))}")
            name, fwd, bwd = _TOP[path]
            entries.append(Entry(path, name, fwd, bwd, None, None))
    return entries


def _item_shape(entry: Entry, shape) -> tuple:
    """Shape of one layer / expert slice of a param (the stacked axes removed)."""
    drop = (entry.layers is not None) + (entry.num_experts is not None)
    return tuple(shape[drop:])


def _hf_shape(entry: Entry, cfg, shape) -> tuple:
    item = jax.ShapeDtypeStruct(_item_shape(entry, shape), jnp.float32)
    return tuple(jax.eval_shape(lambda x: entry.to_hf(x, cfg), item).shape)


# ---- reading ---------------------------------------------------------------------------------------

def read_config(path) -> Qwen3Config:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found (an HF checkpoint directory needs config.json)")
    return Qwen3Config.from_hf_dict(json.loads(cfg_file.read_text()))


class _Checkpoint:
    """Key -> shard file map over an HF directory; shard files are opened lazily (memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        index = path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map'")
            for fname in sorted(set(weight_map.values())):
                if not (path / fname).is_file():
                    raise FileNotFoundError(f"shard {path / fname} listed in {index} does not exist")
            self.key_file = dict(weight_map)
        elif (path / SINGLE_NAME).is_file():
            with safe_open(path / SINGLE_NAME, framework="np") as f:
                self.key_file = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise FileNotFoundError(f"no {INDEX_NAME} or {SINGLE_NAME} in {path}")
        self._handles: dict[str, object] = {}

    def _open(self, key):
        fname = self.key_file[key]
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.path / fname, framework="np")
        return self._handles[fname]

    def shape(self, key) -> tuple:
        return tuple(self._open(key).get_slice(key).get_shape())

    def read(self, key) -> np.ndarray:
        return self._open(key).get_tensor(key)

    def where(self, key) -> str:
        return str(self.path / self.key_file.get(key, "?"))


def _check_keys(ckpt: _Checkpoint, cfg: Qwen3Config, entries, abs_flat):
    expected = {}
    for e in entries:
        hf_shape = _hf_shape(e, cfg, abs_flat[e.path].shape)
        for key, _, _ in e.items():
            expected[key] = hf_shape
    present = set(ckpt.key_file)
    missing = sorted(set(expected) - present)
    if missing:
        shown = ", ".join(f"{k} (expected shape {expected[k]})" for k in missing[:5])
        raise CheckpointError(f"{ckpt.path}: {len(missing)} missing key(s): {shown}")
    unexpected = sorted(k for k in present - set(expected) if not k.endswith(_IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        log.warning("%s: ignoring lm_head.weight because tie_word_embeddings=True", ckpt.path)
        unexpected.remove("lm_head.weight")
    if unexpected:
        shown = ", ".join(f"{k} in {ckpt.where(k)}" for k in unexpected[:5])
        raise CheckpointError(f"{ckpt.path}: {len(unexpected)} unexpected key(s) for this config.json: {shown}")
    for key, shape in expected.items():
        actual = ckpt.shape(key)
        if actual != shape:
            raise CheckpointError(f"{key} in {ckpt.where(key)} has shape {actual}, config.json implies {shape}")


def _loader(ckpt: _Checkpoint, cfg, entry: Entry, shape, np_dtype):
    """Callback for make_array_from_callback: builds only the requested index of the NNX array."""
    def tensor(layer_row, expert, rest):
        key = entry.template.format(l=entry.layers[layer_row] if layer_row is not None else 0, e=expert)
        return np.asarray(entry.to_ours(ckpt.read(key), cfg)[rest], dtype=np_dtype)

    def callback(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if entry.layers is None:
            return tensor(None, None, index)
        out = np.empty([len(range(n)[s]) for n, s in zip(shape, index)], np_dtype)
        for i, row in enumerate(range(shape[0])[index[0]]):
            if entry.num_experts is None:
                out[i] = tensor(row, None, index[1:])
            else:
                for j, e in enumerate(range(shape[1])[index[1]]):
                    out[i, j] = tensor(row, e, index[2:])
        return out
    return callback


def abstract_model(cfg: Qwen3Config, dtype=jnp.float32, param_dtype=None):
    """(graphdef, abstract state) of a model, no memory allocated."""
    param_dtype = param_dtype or dtype
    return nnx.split(nnx.eval_shape(
        lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)))


def from_pretrained(path, dtype=jnp.float32, mesh=None, param_dtype=None, config: Qwen3Config | None = None,
                    **config_overrides) -> Qwen3ForCausalLM:
    """Load an HF Qwen3 / Qwen3-MoE directory; with `mesh`, every param lands directly in its sharding.

    `config`: the Qwen3Config to build (a run's, from agq_jax.run_config.model_config: the checkpoint's
    architecture plus training fields); default the directory's config.json. `config_overrides` set fields on
    top (remat, attention_impl, moe_impl, scan_layers). Shapes are checked against the safetensors.
    """
    from agq_jax.models import sharding as shd
    path = Path(path)
    cfg = (read_config(path) if config is None else config).replace(**config_overrides)
    param_dtype = param_dtype or dtype
    np_dtype = np.dtype(param_dtype)
    graphdef, abs_state = abstract_model(cfg, dtype, param_dtype)
    abs_flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(abs_state)}
    entries = param_entries(cfg, abs_state)
    ckpt = _Checkpoint(path)
    _check_keys(ckpt, cfg, entries, abs_flat)
    shardings = None
    if mesh is not None:
        shardings = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(shd.state_shardings(abs_state, mesh))}
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    values = {}
    for entry in entries:
        shape = abs_flat[entry.path].shape
        target = shardings[entry.path] if shardings else single
        values[entry.path] = jax.make_array_from_callback(shape, target, _loader(ckpt, cfg, entry, shape, np_dtype))
    state = nnx.from_flat_state([(p, v.replace(values[tuple(p)])) for p, v in nnx.to_flat_state(abs_state)])
    return nnx.merge(graphdef, state)


# ---- writing ---------------------------------------------------------------------------------------

@jax.jit
def _take1(a, i):
    return a[i]


@jax.jit
def _take2(a, i, j):
    return a[i, j]


def _fetch(arr, layer_row, expert) -> np.ndarray:
    if layer_row is None:
        return np.asarray(jax.device_get(arr))
    if expert is None:
        return np.asarray(jax.device_get(_take1(arr, layer_row)))
    return np.asarray(jax.device_get(_take2(arr, layer_row, expert)))


def _write_tokenizer(out: Path, cfg: Qwen3Config, tokenizer_dir):
    if tokenizer_dir is False:
        return
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        found = [n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) in {tokenizer_dir}")
        for name in found:
            shutil.copyfile(tokenizer_dir / name, out / name)
        return
    if cfg.vocab_size < QWEN3_TOKENIZER_SIZE:
        log.warning("vocab_size=%d is smaller than the Qwen3 tokenizer; not writing tokenizer files", cfg.vocab_size)
        return
    try:
        from agq_jax.tokenizer import save_qwen3_tokenizer
    except ImportError as e:
        log.warning("agq_jax.tokenizer unavailable (%s); export has no tokenizer files", e)
        return
    save_qwen3_tokenizer(str(out))


def _dtype_name(dt) -> str:
    return {np.dtype(np.float32): "float32", np.dtype(jnp.bfloat16): "bfloat16",
            np.dtype(np.float16): "float16"}.get(np.dtype(dt), str(np.dtype(dt)))


def save_pretrained(model: Qwen3ForCausalLM, out_dir, tokenizer_dir=None, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
                    dtype=None, generation_config: dict | None = None) -> Path:
    """Write HF safetensors shards (<= max_shard_bytes each, unless one tensor is larger) + index, config.json,
    generation_config.json and tokenizer files into `out_dir`, atomically (temp dir, then rename).

    `dtype` casts on export (e.g. "bfloat16"); default keeps the params' dtype. `tokenizer_dir=False` skips the
    tokenizer; None writes the real Qwen3 tokenizer when the vocab is Qwen3's.
    """
    cfg = model.config
    out = Path(out_dir).absolute()
    state = nnx.state(model, nnx.Param)
    flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}
    entries = param_entries(cfg, state)
    np_dtype = np.dtype(_NP_DTYPES[dtype] if isinstance(dtype, str) else dtype) if dtype is not None else None

    items = []  # (order, hf_key, entry, layer_row, expert, nbytes)
    for entry in entries:
        arr = flat[entry.path]
        item_dtype = np_dtype or np.dtype(arr.dtype)
        nbytes = int(np.prod(_item_shape(entry, arr.shape))) * item_dtype.itemsize
        for key, row, e in entry.items():
            order = -1 if entry.layers is None and entry.path == ("embed_tokens",) else (
                entry.layers[row] if row is not None else 1 << 30)
            items.append((order, key, entry, row, e, nbytes))
    items.sort(key=lambda t: (t[0], t[1]))
    shards, current, size = [], [], 0
    for it in items:
        if current and size + it[5] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(it)
        size += it[5]
    if current:
        shards.append(current)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weight_map, total = {}, 0
        for n, shard in enumerate(shards):
            fname = SINGLE_NAME if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for _, key, entry, row, e, nbytes in shard:
                t = entry.to_hf(_fetch(flat[entry.path], row, e), cfg)
                tensors[key] = np.ascontiguousarray(t, dtype=np_dtype or t.dtype)
                weight_map[key] = fname
                total += nbytes
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True) + "\n")
        saved_dtype = np_dtype or np.dtype(flat[("embed_tokens",)].dtype)
        hf_cfg = cfg.replace(torch_dtype=_dtype_name(saved_dtype)).to_hf_dict()
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {k: v for k, v in (("bos_token_id", hf_cfg["bos_token_id"]), ("eos_token_id", hf_cfg["eos_token_id"]),
                                  ("pad_token_id", hf_cfg["pad_token_id"])) if v is not None}
        gen.update(generation_config or {})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_tokenizer(tmp, cfg, tokenizer_dir)
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "prev")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
