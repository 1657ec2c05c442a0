"""Export a checkpoint to a Hugging Face directory.

    python -m agq_jax.export --checkpoint=DIR --out=DIR [--dtype=bfloat16] [--max_shard_gb=5]

DIR may be an HF Qwen3 / Qwen3-MoE directory. Other formats (the trainer's orbax checkpoints) plug in through
`register_checkpoint_loader(name, detect, load)`; the first loader whose `detect(path)` is true loads the model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from absl import app, flags, logging

_LOADERS: list[tuple[str, Callable[[Path], bool], Callable]] = []


def register_checkpoint_loader(name: str, detect: Callable[[Path], bool], load: Callable) -> None:
    """`load(path, dtype) -> Qwen3ForCausalLM`; registered loaders are tried before the built-in HF one."""
    _LOADERS.insert(0, (name, detect, load))


def _is_hf_dir(path: Path) -> bool:
    from agq_jax.models import hf_io
    return (path / hf_io.CONFIG_NAME).is_file() and (
        (path / hf_io.INDEX_NAME).is_file() or (path / hf_io.SINGLE_NAME).is_file())


def _looks_like_orbax(path: Path) -> bool:
    return (path / "_CHECKPOINT_METADATA").exists() or any(path.glob("*/_CHECKPOINT_METADATA")) or \
        any(path.glob("*.orbax-checkpoint*"))


def _load_hf(path: Path, dtype):
    from agq_jax.models import qwen3
    return qwen3.from_pretrained(path, dtype=dtype)


def load_checkpoint(path, dtype=None):
    """The model stored at `path`, through the first loader that recognises it."""
    import jax.numpy as jnp
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    dtype = dtype or jnp.float32
    for name, detect, load in _LOADERS + [("hf", _is_hf_dir, _load_hf)]:
        if detect(path):
            logging.info("loading %s checkpoint %s", name, path)
            return load(path, dtype)
    if _looks_like_orbax(path):
        raise NotImplementedError(
            f"{path} looks like an orbax checkpoint but no orbax loader is registered; the trainer provides one "
            "via agq_jax.export.register_checkpoint_loader")
    raise FileNotFoundError(f"{path} is neither an HF directory (config.json + safetensors) nor a known checkpoint")


def export(checkpoint, out, dtype: str | None = None, max_shard_bytes: int | None = None, tokenizer_dir=None) -> Path:
    """Load `checkpoint` and write it as an HF directory at `out`; returns `out`."""
    import jax.numpy as jnp

    from agq_jax.models import hf_io
    src = Path(checkpoint)
    model = load_checkpoint(src, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    gen = None
    if (src / "generation_config.json").is_file():
        gen = json.loads((src / "generation_config.json").read_text())
    if tokenizer_dir is None and (src / "tokenizer.json").is_file():
        tokenizer_dir = src
    return hf_io.save_pretrained(model, out, tokenizer_dir=tokenizer_dir, dtype=dtype,
                                 max_shard_bytes=max_shard_bytes or hf_io.DEFAULT_MAX_SHARD_BYTES,
                                 generation_config=gen)


def _define_flags():
    """Defined only when run as a script, so importing this module never clashes with the trainer's flags."""
    flags.DEFINE_string("checkpoint", None, "HF directory (or a registered checkpoint format) to export.")
    flags.DEFINE_string("out", None, "Output HF directory (replaced atomically).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Cast params on export (default: keep).")
    flags.DEFINE_float("max_shard_gb", 5.0, "Maximum safetensors shard size in GiB.")
    flags.DEFINE_string("tokenizer_dir", None, "Directory with tokenizer files to copy (default: the source dir's, "
                        "else the Qwen3 tokenizer from agq_jax.tokenizer when the vocab is Qwen3's).")
    flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    out = export(FLAGS.checkpoint, FLAGS.out, dtype=FLAGS.dtype, max_shard_bytes=int(FLAGS.max_shard_gb * 1024 ** 3),
                 tokenizer_dir=FLAGS.tokenizer_dir)
    print(json.dumps({"out": str(out), "files": sorted(p.name for p in out.iterdir())}))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
