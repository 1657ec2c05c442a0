"""CPU inference with the weights split per layer (qwen3.split_layer_stacks / merge_split, what the Sampler does
on CPU): the same tokens and log-probs as the scanned, stacked path, and no per-step copies of layer weights
in the compiled decode loop (the copies the split exists to remove)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agq_jax.models import qwen3
from agq_jax.rollout.sampler import Sampler, SamplingParams

DENSE = qwen3.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.3,
                          tie_word_embeddings=True)
MOE = DENSE.replace(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
                    moe_impl="auto")
PROMPTS = [[5, 17, 99, 3, 250], [7, 8, 9, 10, 11, 12, 13, 14, 15], [200, 1, 2, 100, 42, 42, 42, 6]]


def _samplers(cfg):
    model = qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    split, stacked = Sampler(model, pad_id=0, chunk_size=16), Sampler(model, pad_id=0, chunk_size=16)
    stacked._split = False  # the scanned path over stacked weights (what GPU / TPU run)
    return model, split, stacked


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_split_weights_sample_what_stacked_weights_sample(cfg, temperature):
    assert qwen3.split_weights_for_inference("cpu") and not qwen3.split_weights_for_inference("tpu")
    model, split, stacked = _samplers(cfg)
    assert split._split, "the Sampler splits the weights on CPU"
    params = SamplingParams(temperature=temperature, stop_ids=())
    a = split.generate(model, PROMPTS, params=params, max_new_tokens=12, rng=jax.random.key(3))
    b = stacked.generate(model, PROMPTS, params=params, max_new_tokens=12, rng=jax.random.key(3))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    # one split per weight version: the second call reuses it; new weights are split again
    state = nnx.state(model)
    assert split._state(state) is split._state(state)
    assert split._state(jax.tree.map(lambda x: x + 0, state)) is not split._state(state)


def _weight_copies(sampler, model, cfg) -> list[str]:
    """Instructions of the compiled decode loop that write a buffer the size of one layer's MLP weight
    through a slice: the per-step weight copies."""
    state = sampler._state(model)
    cache = sampler.init_cache(2, 32)
    logits = jnp.zeros((2, cfg.vocab_size), jnp.float32)
    hlo = sampler._decode.lower(sampler.graphdef, state, cache, logits, jax.random.key(0), np.ones(2, bool),
                                np.full(2, 4, np.int32), np.arange(2, dtype=np.int32), jnp.int32(32),
                                params=SamplingParams(temperature=0.0),
                                max_new=4, pad_id=0).compile().as_text()
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = (f"f32[{h},{i}]", f"f32[{i},{h}]")
    return [ln for ln in hlo.splitlines() if re.search(r"slice", ln.split("=")[0]) and any(s in ln.split("=")[1][:40]
                                                                                      for s in shapes)]


def test_split_decode_reads_weights_in_place():
    model, split, stacked = _samplers(DENSE)
    assert _weight_copies(stacked, model, DENSE), "the stacked path copies layer weights (what this test detects)"
    assert _weight_copies(split, model, DENSE) == []
