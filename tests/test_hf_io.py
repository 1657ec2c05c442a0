"""HF -> agq_jax -> HF: bit-exact tensors, transformers loads the export, sharded loading, clear errors."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from _tiny import VOCAB, build_hf, hf_logits
from agq_jax.models import hf_io, qwen3, sharding

NAMES = ["dense_tied", "moe_norm_mlp_only"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for name in NAMES:
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, build_hf(name, path, seed=7))
    return out


def _read_all(path):
    index = json.loads((path / hf_io.INDEX_NAME).read_text()) if (path / hf_io.INDEX_NAME).exists() else None
    files = sorted(set(index["weight_map"].values())) if index else [hf_io.SINGLE_NAME]
    tensors = {}
    for f in files:
        tensors.update(load_file(str(path / f)))
    return tensors


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_bit_exact_and_sharded(hf_dirs, tmp_path, name):
    src, _ = hf_dirs[name]
    model = qwen3.from_pretrained(src)
    out = qwen3.save_pretrained(model, tmp_path / "export", max_shard_bytes=20_000)
    original, exported = _read_all(src), _read_all(out)
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert np.array_equal(exported[key].view(np.uint8), value.view(np.uint8)), key
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in exported
    if model.config.is_moe:
        assert "model.layers.0.mlp.experts.7.down_proj.weight" in exported
        assert "model.layers.1.mlp.gate_proj.weight" in exported  # mlp_only layer stays dense
    index = json.loads((out / hf_io.INDEX_NAME).read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1
    for f in shard_files:
        with safe_open(str(out / f), framework="np") as fh:
            assert fh.metadata() == {"format": "pt"}
            sizes = [fh.get_tensor(k).nbytes for k in fh.keys()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1, f
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in original.values())
    assert json.loads((out / "generation_config.json").read_text()) == {}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temp dirs left


@pytest.mark.parametrize("name", NAMES)
def test_transformers_loads_export_with_identical_logits(hf_dirs, tmp_path, name):
    src, hf = hf_dirs[name]
    out = qwen3.save_pretrained(qwen3.from_pretrained(src), tmp_path / "export", max_shard_bytes=30_000)
    cfg = transformers.AutoConfig.from_pretrained(out)
    assert cfg.model_type == ("qwen3_moe" if "moe" in name else "qwen3")
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                                 dtype=torch.float32)
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 9))
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))


def test_config_round_trip_through_transformers(hf_dirs, tmp_path):
    src, _ = hf_dirs["moe_norm_mlp_only"]
    cfg = hf_io.read_config(src)
    out = qwen3.save_pretrained(qwen3.from_pretrained(src), tmp_path / "export")
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    assert hf_cfg.num_experts == cfg.num_experts and list(hf_cfg.mlp_only_layers) == [1]
    again = qwen3.Qwen3Config.from_hf_dict(hf_cfg.to_dict())
    assert again.replace(torch_dtype=cfg.torch_dtype) == cfg


def test_bf16_export(hf_dirs, tmp_path):
    src, _ = hf_dirs["dense_tied"]
    out = qwen3.save_pretrained(qwen3.from_pretrained(src), tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    original, exported = _read_all(src), _read_all(out)
    for key, value in original.items():
        assert exported[key].dtype == jnp.bfloat16
        np.testing.assert_array_equal(exported[key], value.astype(jnp.bfloat16))
    model = qwen3.from_pretrained(out, dtype=jnp.bfloat16)
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    assert model(jnp.zeros((1, 4), jnp.int32)).logits.dtype == jnp.bfloat16


def test_load_into_mesh_equals_single_device(hf_dirs):
    src, _ = hf_dirs["moe_norm_mlp_only"]
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
    sharded = qwen3.from_pretrained(src, mesh=mesh)
    single = qwen3.from_pretrained(src)
    experts = sharded.blocks[0].layer.mlp.experts_gate_proj[...]
    assert experts.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    assert len(experts.addressable_shards) == 8 and experts.addressable_shards[0].data.shape == (1, 4, 16, 8)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tokenizer_files_copied_and_loadable(hf_dirs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tok")
    src, _ = hf_dirs["dense_tied"]
    out = qwen3.save_pretrained(qwen3.from_pretrained(src), tmp_path / "export", tokenizer_dir=tmp_path / "tok")
    assert transformers.AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [0, 1]


def test_failed_export_keeps_previous_output(hf_dirs, tmp_path):
    src, _ = hf_dirs["dense_tied"]
    model = qwen3.from_pretrained(src)
    out = qwen3.save_pretrained(model, tmp_path / "export")
    before = sorted(p.name for p in out.iterdir())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        qwen3.save_pretrained(model, out, tokenizer_dir=tmp_path / "empty")
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "export"]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path, fn):
    f = path / hf_io.SINGLE_NAME
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_errors_name_file_key_and_shapes(hf_dirs, tmp_path):
    src, _ = hf_dirs["moe_norm_mlp_only"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qwen3.from_pretrained(tmp_path / "nope")
    d = _copy(src, tmp_path / "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen3.from_pretrained(d)
    d = _copy(src, tmp_path / "noweights")
    (d / hf_io.SINGLE_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        qwen3.from_pretrained(d)
    d = _copy(src, tmp_path / "missing")
    _edit_weights(d, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(hf_io.CheckpointError, match=r"missing.*layers\.2\.mlp\.experts\.3\.up_proj\.weight "
                                                     r"\(expected shape \(16, 32\)\)"):
        qwen3.from_pretrained(d)
    d = _copy(src, tmp_path / "extra")
    _edit_weights(d, lambda t: t.update({"model.layers.0.mlp.bogus.weight": np.zeros(3, np.float32)}))
    with pytest.raises(hf_io.CheckpointError, match=r"unexpected.*model\.layers\.0\.mlp\.bogus\.weight in .*extra"):
        qwen3.from_pretrained(d)
    d = _copy(src, tmp_path / "shape")
    _edit_weights(d, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((64, 31), np.float32)}))
    with pytest.raises(hf_io.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight in .*shape.* "
                                                     r"has shape \(64, 31\), config.json implies \(64, 32\)"):
        qwen3.from_pretrained(d)
    out = qwen3.save_pretrained(qwen3.from_pretrained(src), tmp_path / "sharded", max_shard_bytes=20_000)
    victim = sorted(out.glob("model-0000*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard .*{victim.name} listed in .*index.json"):
        qwen3.from_pretrained(out)


def test_export_cli(hf_dirs, tmp_path):
    import subprocess
    import sys
    src = _copy(hf_dirs["moe_norm_mlp_only"][0], tmp_path / "src")
    (src / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6}))
    res = subprocess.run([sys.executable, "-m", "agq_jax.export", f"--checkpoint={src}", f"--out={tmp_path / 'cli'}",
                          "--max_shard_gb=0.00002"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "cli"
    assert json.loads(res.stdout.strip().splitlines()[-1])["out"] == str(out)
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6
    assert len(list(out.glob("model-*.safetensors"))) > 1
    original, exported = _read_all(src), _read_all(out)
    assert all(np.array_equal(original[k], exported[k]) for k in original) and sorted(original) == sorted(exported)
    res = subprocess.run([sys.executable, "-m", "agq_jax.export", f"--checkpoint={tmp_path / 'missing'}",
                          f"--out={tmp_path / 'x'}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "agq_jax.export", f"--checkpoint={tmp_path}", f"--out={tmp_path / 'x'}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "neither an HF directory" in res.stderr and "Traceback" not in res.stderr
