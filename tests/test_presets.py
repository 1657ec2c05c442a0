"""Presets have the published shapes: parameter counts equal transformers' (meta device, no weights)."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from agq_jax.models import qwen3
from agq_jax.models.config import PRESETS, Qwen3Config, UnsupportedConfigError

# "Non-Embedding" parameter counts from the Qwen3 model cards, in billions (rounded there).
CARD_NON_EMBEDDING_B = {"Qwen3-0.6B": 0.44, "Qwen3-1.7B": 1.4, "Qwen3-4B": 3.6, "Qwen3-8B": 6.95,
                        "Qwen3-14B": 13.2, "Qwen3-32B": 31.2, "Qwen3-30B-A3B": 29.9, "Qwen3-235B-A22B": 234.0}


def _our_count(cfg) -> int:
    abstract = nnx.eval_shape(lambda: qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_equals_transformers(name, tmp_path):
    cfg = PRESETS[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    ours = _our_count(cfg)
    assert ours == hf_count, name
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    assert abs((ours - embed) / 1e9 - CARD_NON_EMBEDDING_B[name]) <= 0.02 * CARD_NON_EMBEDDING_B[name] + 0.01
    assert Qwen3Config.from_hf_dict(hf_cfg.to_dict()) == cfg


def test_published_hyperparameters():
    moe = PRESETS["Qwen3-30B-A3B"]
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size, moe.num_key_value_heads) == \
        (128, 8, 768, 4)
    assert moe.norm_topk_prob and moe.layer_groups() == ((True, 0, 48),)
    for cfg in PRESETS.values():
        assert (cfg.vocab_size, cfg.head_dim, cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == \
            (151936, 128, 1e6, 1e-6, 40960)


def test_config_reads_transformers_4_and_5_keys():
    common = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=16, num_experts_per_tok=2,
                  decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=False)
    v4 = Qwen3Config.from_hf_dict({**common, "rope_theta": 5e5, "num_experts": 8, "torch_dtype": "bfloat16"})
    v5 = Qwen3Config.from_hf_dict({**common, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"},
                                   "num_local_experts": 8, "dtype": "bfloat16"})
    assert v4 == v5
    assert (v4.head_dim, v4.num_experts, v4.rope_theta) == (8, 8, 5e5)  # head_dim defaults to hidden / heads
    assert [v4.layer_is_moe(i) for i in range(4)] == [False, True, False, False]
    assert v4.layer_groups() == ((False, 0, 1), (True, 1, 1), (False, 2, 2))
    assert Qwen3Config.from_hf_dict(v4.to_hf_dict()) == v4


@pytest.mark.parametrize("field,value,match", [
    ("use_sliding_window", True, "use_sliding_window"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling"),
    ("rope_parameters", {"rope_theta": 1e6, "rope_type": "yarn"}, "rope_type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "llama", "model_type"),
])
def test_unsupported_config_fields_raise(field, value, match):
    d = PRESETS["Qwen3-0.6B"].to_hf_dict()
    d[field] = value
    with pytest.raises(UnsupportedConfigError, match=match):
        Qwen3Config.from_hf_dict(d)
