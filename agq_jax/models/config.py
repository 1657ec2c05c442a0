"""Qwen3 / Qwen3-MoE hyperparameters: one frozen dataclass read from (and written to) HF config.json.

Every architectural number comes from the HF file; training-side choices (remat, attention kernel, MoE
implementation) live here too but are never written back to HF.
"""
from __future__ import annotations

import dataclasses
from typing import Any

MODEL_TYPES = ("qwen3", "qwen3_moe")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30   # safetensors shard size of an HF export (run_config export.max_shard_bytes)
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn", "auto", "blocked", "splash")
MOE_IMPLS = ("ragged", "tiled", "megablox", "dense", "auto")

_ARCH = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


class UnsupportedConfigError(ValueError):
    """A config.json field asks for something this implementation does not compute."""


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """All hyperparameters of a Qwen3 dense or MoE causal LM (HF names where HF has one)."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    initializer_range: float = 0.02
    model_type: str = "qwen3"
    # MoE (model_type == "qwen3_moe")
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    # Token ids / dtype carried through to the exported config and generation_config.
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # Training-side choices (not HF): rematerialisation of each scanned layer, attention kernel,
    # expert computation (ragged = jax.lax.ragged_dot grouped GEMM, for GPU; megablox = Pallas grouped GEMMs
    # with a grouped dW, for TPU; tiled = a tile-padded looped grouped matmul, fast on CPU; dense = all-experts
    # oracle; auto = by backend), scan over layers (False = python loop over the same stacked params; debugging).
    remat: str = "none"
    attention_impl: str = "xla"
    moe_impl: str = "ragged"
    scan_layers: bool = True

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise UnsupportedConfigError(f"model_type={self.model_type!r}; expected one of {MODEL_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise UnsupportedConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.remat not in REMAT_POLICIES:
            raise UnsupportedConfigError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise UnsupportedConfigError(f"attention_impl={self.attention_impl!r}; expected {ATTENTION_IMPLS}")
        if self.moe_impl not in MOE_IMPLS:
            raise UnsupportedConfigError(f"moe_impl={self.moe_impl!r}; expected one of {MOE_IMPLS}")
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.is_moe and self.num_experts > 0:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise UnsupportedConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
            if self.moe_intermediate_size <= 0:
                raise UnsupportedConfigError("moe_intermediate_size must be > 0 for a MoE config")

    # ---- derived structure -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen3_moe"

    def layer_is_moe(self, i: int) -> bool:
        """HF's rule (Qwen3MoeDecoderLayer): sparse unless listed in mlp_only_layers or off the sparse step."""
        return (self.is_moe and i not in self.mlp_only_layers and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)

    def layer_groups(self) -> tuple[tuple[bool, int, int], ...]:
        """Runs of consecutive same-kind layers as (is_moe, first_layer, count); each run is one scan."""
        groups: list[list] = []
        for i in range(self.num_hidden_layers):
            kind = self.layer_is_moe(i)
            if groups and groups[-1][0] == kind:
                groups[-1][2] += 1
            else:
                groups.append([kind, i, 1])
        return tuple(tuple(g) for g in groups)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.layer_is_moe(i) for i in range(self.num_hidden_layers))

    def replace(self, **kw) -> "Qwen3Config":
        return dataclasses.replace(self, **kw)

    # ---- HF config.json ----------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> "Qwen3Config":
        """Parse an HF config.json dict (transformers 4.x or 5.x keys); `overrides` set training-side fields."""
        model_type = d.get("model_type")
        if model_type is None:
            archs = d.get("architectures") or []
            model_type = "qwen3_moe" if any("Moe" in a for a in archs) else "qwen3"
        if model_type not in MODEL_TYPES:
            raise UnsupportedConfigError(f"config.json model_type={model_type!r}; expected one of {MODEL_TYPES}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise UnsupportedConfigError(f"config.json is missing required key {key!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise UnsupportedConfigError(f"hidden_act={d['hidden_act']!r}; only 'silu' is implemented")
        if d.get("use_sliding_window", False):
            raise UnsupportedConfigError("use_sliding_window=True is not implemented (Qwen3 releases use False)")
        layer_types = d.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise UnsupportedConfigError(f"layer_types={sorted(set(layer_types))}; only full_attention is implemented")
        rope_theta = d.get("rope_theta")
        rope_params = d.get("rope_parameters")
        if isinstance(rope_params, dict):
            rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
            if rope_type != "default":
                raise UnsupportedConfigError(f"rope_parameters.rope_type={rope_type!r}; only 'default' is implemented")
            rope_theta = rope_params.get("rope_theta", rope_theta)
        scaling = d.get("rope_scaling")
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise UnsupportedConfigError(f"rope_scaling={scaling}; only default RoPE is implemented")
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        num_experts = d.get("num_experts", d.get("num_local_experts", 0)) if model_type == "qwen3_moe" else 0
        eos = d.get("eos_token_id")
        kwargs = dict(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d.get("intermediate_size", 0)),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            model_type=model_type,
            num_experts=int(num_experts or 0),
            num_experts_per_tok=int(d.get("num_experts_per_tok", 0) or 0) if model_type == "qwen3_moe" else 0,
            moe_intermediate_size=int(d.get("moe_intermediate_size", 0) or 0) if model_type == "qwen3_moe" else 0,
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            decoder_sparse_step=int(d.get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json that transformers 4.57 and 5.x both read (4.x and 5.x key styles side by side)."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d: dict[str, Any] = {
            "architectures": [_ARCH[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,  # transformers 4.x
            "rope_scaling": None,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},  # transformers 5.x
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,  # transformers 4.x
            "dtype": self.torch_dtype,  # transformers 5.x
        }
        if self.is_moe:
            d.update({
                "num_experts": self.num_experts,  # 4.x name; 5.x maps it onto num_local_experts
                "num_experts_per_tok": self.num_experts_per_tok,
                "moe_intermediate_size": self.moe_intermediate_size,
                "norm_topk_prob": self.norm_topk_prob,
                "decoder_sparse_step": self.decoder_sparse_step,
                "mlp_only_layers": list(self.mlp_only_layers),
                "router_aux_loss_coef": self.router_aux_loss_coef,
                "output_router_logits": False,
            })
        return d


def _dense(h, i, layers, q, kv, tied):
    return Qwen3Config(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=q,
                       num_key_value_heads=kv, tie_word_embeddings=tied)


def _moe(h, i, moe_i, layers, q, kv):
    return Qwen3Config(hidden_size=h, intermediate_size=i, moe_intermediate_size=moe_i, num_hidden_layers=layers,
                       num_attention_heads=q, num_key_value_heads=kv, tie_word_embeddings=False,
                       model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                       router_aux_loss_coef=0.001)


# Published hyperparameters of the Qwen3 release (Hugging Face config.json of each model).
PRESETS: dict[str, Qwen3Config] = {
    "Qwen3-0.6B": _dense(1024, 3072, 28, 16, 8, True),
    "Qwen3-1.7B": _dense(2048, 6144, 28, 16, 8, True),
    "Qwen3-4B": _dense(2560, 9728, 36, 32, 8, True),
    "Qwen3-8B": _dense(4096, 12288, 36, 32, 8, False),
    "Qwen3-14B": _dense(5120, 17408, 40, 40, 8, False),
    "Qwen3-32B": _dense(5120, 25600, 64, 64, 8, False),
    "Qwen3-30B-A3B": _moe(2048, 6144, 768, 48, 32, 4),
    "Qwen3-235B-A22B": _moe(4096, 12288, 1536, 94, 64, 4),
}
