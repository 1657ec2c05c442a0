"""Export a checkpoint to a Hugging Face directory.

    python -m agq_jax.export --checkpoint=DIR --out=DIR [--dtype=bfloat16] [--max_shard_gb=5]

DIR is an HF Qwen3 / Qwen3-MoE directory, a training run's directory (its latest checkpoint) or one of its
`checkpoints/<step>` directories: a run stopped mid-round, or an SFT-only run, exports like a finished round
(the run's config, vocabulary and weights; its procedural tokenizer travels with it).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags


def _is_hf_dir(path: Path) -> bool:
    from agq_jax.models import hf_io
    return (path / hf_io.CONFIG_NAME).is_file() and (
        (path / hf_io.INDEX_NAME).is_file() or (path / hf_io.SINGLE_NAME).is_file())


def load_checkpoint(path, dtype=None):
    """(model, tokenizer dir or None, shard size or None) of the checkpoint at `path`: a run's orbax checkpoint
    (weights in the run's param dtype, shards of its export.max_shard_bytes) or an HF directory (in `dtype`,
    default float32)."""
    import jax.numpy as jnp

    from agq_jax.driver import build
    from agq_jax.models import qwen3
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    run = build.run_checkpoint(path)
    if run is not None:
        model, rc = build.load_run_model(*run)
        tok_dir = run[0] / "tokenizer" if rc.tokenizer.kind == "procedural" else None
        return model, tok_dir, rc.export.max_shard_bytes
    if _is_hf_dir(path):
        tok_dir = path if (path / "tokenizer.json").is_file() else None
        return qwen3.from_pretrained(path, dtype=dtype or jnp.float32), tok_dir, None
    raise FileNotFoundError(f"{path} is neither an HF directory (config.json + safetensors), a training run's "
                            "directory (config.json + checkpoints/) nor one of its checkpoints/<step> directories")


def export(checkpoint, out, dtype: str | None = None, max_shard_bytes: int | None = None, tokenizer_dir=None) -> Path:
    """Load `checkpoint` and write it as an HF directory at `out`; returns `out`."""
    import jax.numpy as jnp

    from agq_jax.models import hf_io
    src = Path(checkpoint)
    model, own_tokenizer, shard_bytes = load_checkpoint(src, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    gen = None
    if (src / "generation_config.json").is_file():
        gen = json.loads((src / "generation_config.json").read_text())
    tokenizer_dir = tokenizer_dir or own_tokenizer
    return hf_io.save_pretrained(model, out, tokenizer_dir=tokenizer_dir, dtype=dtype,
                                 max_shard_bytes=max_shard_bytes or shard_bytes or hf_io.DEFAULT_MAX_SHARD_BYTES,
                                 generation_config=gen)


def _define_flags():
    """Defined only when run as a script, so importing this module never clashes with the trainer's flags."""
    flags.DEFINE_string("checkpoint", None, "HF directory, training run directory or run/checkpoints/<step>.")
    flags.DEFINE_string("out", None, "Output HF directory (replaced atomically).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Cast params on export (default: keep).")
    flags.DEFINE_float("max_shard_gb", None, "Maximum safetensors shard size in GiB (default: a run's "
                       "export.max_shard_bytes, else 5).")
    flags.DEFINE_string("tokenizer_dir", None, "Directory with tokenizer files to copy (default: the source dir's, "
                        "else the Qwen3 tokenizer from agq_jax.tokenizer when the vocab is Qwen3's).")
    flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    shard = int(FLAGS.max_shard_gb * 1024 ** 3) if FLAGS.max_shard_gb else None
    try:
        out = export(FLAGS.checkpoint, FLAGS.out, dtype=FLAGS.dtype, max_shard_bytes=shard,
                     tokenizer_dir=FLAGS.tokenizer_dir)
    except (FileNotFoundError, KeyError, ValueError) as e:  # bad input: the message names it, no traceback
        sys.exit(f"agq_jax.export: {e}")
    print(json.dumps({"out": str(out), "files": sorted(p.name for p in out.iterdir())}))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
