"""Tiny random HF Qwen3 / Qwen3-MoE reference models (built with transformers, saved with save_pretrained)."""
from __future__ import annotations

import numpy as np

VOCAB = 256

# name -> (model class, config kwargs). Shapes cover: tied / untied, head_dim != hidden/heads, attention bias,
# norm_topk_prob both ways, mlp_only_layers, decoder_sparse_step.
TINY = {
    "dense_tied": ("qwen3", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    "dense_untied_bias": ("qwen3", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                        num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                                        tie_word_embeddings=False, attention_bias=True)),
    "moe_norm_mlp_only": ("qwen3_moe", dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                            mlp_only_layers=[1])),
    "moe_nonorm_sparse_step": ("qwen3_moe", dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                                 head_dim=8, num_experts=4, num_experts_per_tok=3,
                                                 norm_topk_prob=False, decoder_sparse_step=2)),
}


def build_hf(name: str, out_dir, seed: int = 0):
    """Random HF model of TINY[name] in fp32 with eager attention, saved to out_dir; returns the torch model."""
    import torch
    import transformers

    model_type, kw = TINY[name]
    common = dict(vocab_size=VOCAB, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512,
                  initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if model_type == "qwen3":
        cfg = transformers.Qwen3Config(**common, **kw)
        cls = transformers.Qwen3ForCausalLM
    else:
        cfg = transformers.Qwen3MoeConfig(**common, **kw)
        cls = transformers.Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; randomise so they are exercised
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if n.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    model.eval()
    model.save_pretrained(str(out_dir))
    return model


def hf_logits(model, ids, mask=None, positions=None):
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(ids)),
                    attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask)),
                    position_ids=None if positions is None else torch.as_tensor(np.asarray(positions)))
    return out.logits.numpy()


def random_model(cfg, seed: int = 0, scale: float = 0.2):
    """A Qwen3ForCausalLM with numpy-random params (no XLA RNG compiles: much faster than init in tests)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from agq_jax.models import qwen3

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.RandomState(seed)

    def fill(v):
        x = scale * rng.standard_normal(v.get_value().shape).astype(np.float32)
        if v.get_metadata()["logical_axes"][-1] == "norm":
            x = 1.0 + x / 2
        return v.replace(jnp.asarray(x))
    state = jax.tree.map(fill, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)
