"""The AgenticQwen reference recipe shared by the full-size configs (0_6b, 8b, 30b_a3b, 235b_a22b).

Not a config itself (no `get_config`): each config file loads this module by path, calls `build(...)`
with its model preset and named mesh layouts, and overrides what differs. Everything here is plain
Python (no jax import), so loading a config stays instant.

Reference settings (AgenticQwen paper / its verl recipe): G=16 rollouts per task, 64 tasks per step,
mini-batch 16 tasks, lr 1e-6 constant, PPO-clip with clip-higher 0.2 / 0.28, no KL, 10,000-token
responses, at most 15 agent turns and 15 simulated-user turns; GSPO for Qwen3-30B-A3B.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys
from typing import Mapping, NamedTuple

import ml_collections


def load_sibling(name: str):
    """Import configs/<name>.py by file path (works from any cwd, with or without the repo on sys.path)."""
    mod_name = f"agq_jax_configs_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    path = pathlib.Path(__file__).resolve().with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load config module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


try:  # the normal case: run from the repo root (`python -m agq_jax.train --config=configs/NAME.py`)
    from configs.base import get_base_config
except ImportError:  # loaded by path from elsewhere: ml_collections execs config files without a package
    get_base_config = load_sibling("base").get_base_config


# ---- reference numbers -------------------------------------------------------------------------------
GROUP_SIZE = 16
TASKS_PER_STEP = 64
MINI_BATCH_TASKS = 16
LEARNING_RATE = 1e-6
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
RESPONSE_TOKENS = 10_000          # policy + environment tokens after the prompt, per episode
PROMPT_TOKENS = 4_096             # system prompt + tool schemas + opening user turn (headroom)
MAX_AGENT_TURNS = 15
MAX_USER_TURNS = 15
# GSPO's sequence-ratio clip range (the GSPO paper's values; much tighter than token-level PPO-clip).
GSPO_CLIP_LOW, GSPO_CLIP_HIGH = 3e-4, 4e-4

# Teachers: one OpenAI-compatible endpoint (SGLang / sglang-jax, see launch/teachers/ and docs/teachers.md).
# Start the server with `--served-model-name qwen3-235b-a22b` so these names match.
TEACHER_URL = "http://127.0.0.1:30000/v1"
TEACHER_MODEL = "qwen3-235b-a22b"   # Qwen3-235B-A22B(-Instruct-2507): synthesizer, simulated user/tools, judge

# Fields a full-size config adds on top of configs/base.py (the driver may not read them yet).
EXTRA_FIELDS = ("mesh_layout", "rollout.max_response_tokens", "rl.gspo_clip_low", "rl.gspo_clip_high")


# ---- hardware and mesh layouts -----------------------------------------------------------------------
class Hardware(NamedTuple):
    name: str
    hbm_bytes: float          # memory per JAX device
    kind: str                 # tpu | gpu


HARDWARE = {
    "tpu-v5p": Hardware("TPU v5p chip", 95e9, "tpu"),          # 1 JAX device per chip (megacore)
    "tpu-v6e": Hardware("TPU v6e (Trillium) chip", 32e9, "tpu"),
    "h100": Hardware("NVIDIA H100 SXM 80GB", 80e9, "gpu"),
    "h200": Hardware("NVIDIA H200 141GB", 141e9, "gpu"),
}


class Layout(NamedTuple):
    """A named mesh for one slice / cluster shape.

    `mesh` uses MeshConfig sizes (one axis may be -1 = all remaining devices, so a bigger slice of the same
    kind still works); `devices` is the device count the layout was sized for (what tests and the memory
    plan resolve -1 against); `micro_batch_size` is global rows per forward/backward, a multiple of the
    batch shards (data x fsdp)."""

    hardware: str
    devices: int
    mesh: Mapping[str, int]
    micro_batch_size: int
    note: str = ""


def mesh_shape(layout: Layout, devices: int | None = None) -> dict[str, int]:
    """The layout's mesh with -1 resolved against `devices` (default: the layout's own device count)."""
    n = layout.devices if devices is None else devices
    sizes = dict(layout.mesh)
    fill = [k for k, v in sizes.items() if v == -1]
    known = 1
    for v in sizes.values():
        known *= v if v != -1 else 1
    if len(fill) > 1 or n % known:
        raise ValueError(f"mesh {dict(layout.mesh)} does not fit {n} devices")
    if fill:
        sizes[fill[0]] = n // known
    return sizes


def pick_layout(layouts: Mapping[str, Layout], name: str) -> Layout:
    if name not in layouts:
        raise ValueError(f"unknown mesh layout {name!r}; this config defines {sorted(layouts)} "
                         f"(select one with --config=configs/NAME.py:LAYOUT)")
    return layouts[name]


# ---- the shared config -------------------------------------------------------------------------------
def build(name: str, preset: str, hf_path: str, layouts: Mapping[str, Layout], layout: str) -> ml_collections.ConfigDict:
    """configs/base.py with the reference recipe, the model preset and one named mesh layout applied."""
    lay = pick_layout(layouts, layout)
    c = get_base_config()
    c.name = name
    c.seed = 0
    c.rounds = 3
    c.mesh_layout = layout

    c.model.preset = preset
    c.model.hf_path = hf_path
    c.model.dtype = "bfloat16"          # compute
    c.model.param_dtype = "float32"     # master weights and AdamW moments (lr 1e-6 updates vanish in bf16)
    c.model.remat = "full"              # 14k-token rows: keep only each layer's input
    c.model.attention_impl = "auto"     # splash attention on TPU, cuDNN flash attention on GPU (bf16)
    c.model.moe_impl = "auto"           # megablox grouped matmuls on TPU, ragged_dot on GPU
    c.tokenizer.kind = "qwen3"
    c.tokenizer.vocab_size = 0

    c.mesh.data = int(lay.mesh.get("data", 1))
    c.mesh.fsdp = int(lay.mesh.get("fsdp", 1))
    c.mesh.tensor = int(lay.mesh.get("tensor", 1))
    c.mesh.expert = int(lay.mesh.get("expert", 1))

    c.data.agentic_weight = 0.5         # both task families of the paper in every batch
    c.data.reasoning_weight = 0.5
    c.data.schedule = "mixed"
    c.data.heldout_tasks = 256

    c.sft.enabled = False               # the Qwen3 checkpoints already speak the tool-call format

    c.rl.steps_per_round = 50
    c.rl.tasks_per_step = TASKS_PER_STEP
    c.rl.group_size = GROUP_SIZE
    c.rl.mini_batch_size = MINI_BATCH_TASKS
    c.rl.micro_batch_size = lay.micro_batch_size
    c.rl.ppo_epochs = 1
    c.rl.advantage = "grpo"
    c.rl.std_normalize = True
    c.rl.policy_loss = "ppo_clip"
    c.rl.clip_low = CLIP_LOW
    c.rl.clip_high = CLIP_HIGH
    c.rl.gspo_clip_low = GSPO_CLIP_LOW
    c.rl.gspo_clip_high = GSPO_CLIP_HIGH
    c.rl.loss_agg = "token-mean"
    c.rl.kl_coef = 0.0
    c.rl.entropy_coef = 0.0
    c.rl.dynamic_sampling = True
    c.rl.overlong_filter = True
    c.rl.temperature = 1.0
    c.rl.top_p = 1.0
    c.rl.top_k = 0
    c.rl.logprob_chunk = 512

    c.optim.learning_rate = LEARNING_RATE
    c.optim.warmup_steps = 0
    c.optim.decay = "constant"
    c.optim.weight_decay = 0.01
    c.optim.max_grad_norm = 1.0

    c.rollout.max_len = PROMPT_TOKENS + RESPONSE_TOKENS + 240  # 14,336 = 112 x 128: the KV cache length
    c.rollout.max_response_tokens = RESPONSE_TOKENS
    c.rollout.max_new_tokens_per_turn = 0
    c.rollout.max_agent_turns = MAX_AGENT_TURNS
    c.rollout.max_user_turns = MAX_USER_TURNS
    c.rollout.enable_thinking = True
    c.rollout.max_workers = 64

    c.eval.k = 4
    c.eval.temperature = 1.0
    c.eval.greedy_pass1 = True

    c.checkpoint.keep = 3
    c.checkpoint.every_steps = 10
    c.checkpoint.async_save = True
    c.export.every_round = True
    c.export.max_shard_bytes = 5 * 2**30

    c.teachers.base_url = TEACHER_URL
    c.teachers.api_key_env = "OPENAI_API_KEY"   # any value works for a server started without --api-key
    c.teachers.synthesizer = TEACHER_MODEL
    c.teachers.mock_user = TEACHER_MODEL
    c.teachers.mock_tool = TEACHER_MODEL
    c.teachers.judge = TEACHER_MODEL
    c.teachers.solvers = (TEACHER_MODEL,)
    c.teachers.max_concurrency = 64
    c.teachers.timeout_s = 300.0
    return c
