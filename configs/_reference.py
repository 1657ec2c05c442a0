"""The AgenticQwen reference recipe shared by the full-size configs (0_6b, 8b, 30b_a3b, 235b_a22b).

Not a config itself (no `get_config`): each config file loads it with `sibling(__file__, "_reference")`,
calls `build(...)` with its model preset and named mesh layouts, and overrides what differs. Plain Python
(no jax import), so loading a config stays instant.

Reference settings (AgenticQwen paper / its verl recipe, RL/my_script/scripts/run_virtual_tool.sh): G=16
rollouts per task, 64 tasks per step, mini-batch 16 tasks, lr 1e-6 constant, PPO-clip with clip-higher
0.2 / 0.28 and dual clip c = 10, no KL, no dynamic sampling and no overlong filtering, 10,000-token
responses, at most 15 agent turns and 15 simulated-user turns, non-thinking policy (/no_think); GSPO for
Qwen3-30B-A3B. Episodes run in the paper's world: a teacher mock user, teacher mock tools and the rubric
judge, under the reference agent protocol and its reward gate; the released AgenticQwen tasks (the demo
file when the shared data sits beside the repository) are trained on beside the flywheel's, a tenth held out.

Every layout also has a `cpu-smoke` variant (`--config=configs/NAME.py:cpu-smoke`, or
`cpu-smoke@LAYOUT`): the same recipe and code path at toy size on 8 forced CPU devices — a random model of
the same family written as an HF checkpoint and loaded through model.hf_path, the real Qwen3 tokenizer,
every teacher role served by the scripted loopback teacher, the layout's mesh axes shrunk onto 8 devices,
2 rounds x 2 steps. Only the fields in SMOKE_FIELDS differ from the real layout (tests/test_configs.py).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

from agq_jax.envs import sources
from agq_jax.run_config import defaults

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

# Teachers: one OpenAI-compatible endpoint for every role (SGLang / sglang-jax, see launch/teachers/ and
# docs/teachers.md). Start the server with `--served-model-name qwen3-235b-a22b` so the name matches, or
# override `--config.teachers.default.base_url=... --config.teachers.default.model=...`.
TEACHER_URL = "http://127.0.0.1:30000/v1"
TEACHER_MODEL = "qwen3-235b-a22b"   # Qwen3-235B-A22B(-Instruct-2507): synthesizer, simulated user/tools, judge
DUAL_CLIP_C = 10.0                  # the reference's clip_ratio_c
REFERENCE_GATES = ("no_forbidden", "tool_response", "clean_end")   # + its gate: a tool response and a clean end

# The released AgenticQwen demo tasks live in shared/ beside the repository (or $AGQ_SHARED: envs.sources'
# one lookup); without them the run trains on the flywheel's tasks alone.
TASK_FILES = tuple(filter(None, [sources.released_file(sources.DEMO_TASKS)]))

# The paper's 5K personas seed the agentic flywheel: the release beside the repository (or under $AGQ_SHARED),
# else data_synth.personas' built-in set.
PERSONAS = sources.released_file(sources.PERSONAS) or ""
PERSONAS_PER_ROUND = 16


# ---- mesh layouts ------------------------------------------------------------------------------------
class Layout(NamedTuple):
    """A named mesh for one slice / cluster shape.

    `mesh` uses MeshSection sizes (one axis may be -1 = all remaining devices, so a bigger slice of the same
    kind still works); `devices` is the device count the layout was sized for; `micro_batch_rows` is global
    rows per forward/backward, a multiple of the batch shards (data x fsdp)."""

    hardware: str                 # a key of agq_jax.run_config.schema.HARDWARE
    devices: int
    mesh: Mapping[str, int]
    micro_batch_rows: int
    note: str = ""
    topology: str = ""            # TPU slice for `python -m agq_jax.aot` (get_topology_desc name); "" on GPU
    decode_batch_size: int = 0    # episodes one host decodes together (from its compiled memory); 0 = all
    expert_shards: int = 0        # expert shards of each rollout copy (0 = the mesh's); past a host: multi-host groups


def mesh_shape(layout: Layout, devices: int | None = None) -> dict[str, int]:
    """The layout's mesh with -1 resolved against `devices` (default: the layout's own device count)."""
    n = layout.devices if devices is None else devices
    sizes = {k: int(layout.mesh.get(k, 1)) for k in ("data", "fsdp", "tensor", "expert")}
    fill = [k for k, v in sizes.items() if v == -1]
    known = 1
    for v in sizes.values():
        known *= v if v != -1 else 1
    if len(fill) > 1 or n % known:
        raise ValueError(f"mesh {dict(layout.mesh)} does not fit {n} devices")
    if fill:
        sizes[fill[0]] = n // known
    return sizes


SMOKE = "cpu-smoke"
SMOKE_DEVICES = 8


def smoke_mesh(layout: Layout) -> dict[str, int]:
    """The layout's mesh axes on 8 CPU devices: every axis the layout splits gets 2, then axes grow towards
    the layout's own size, tensor first (v5p-64 fsdp x tensor=4 -> 2 x 4; with expert=2 -> 2 x 2 x 2)."""
    full = mesh_shape(layout)
    sizes = {k: (2 if v > 1 else 1) for k, v in full.items()}
    while _prod(sizes) < SMOKE_DEVICES:
        grow = [k for k in ("tensor", "expert", "fsdp", "data") if 1 < sizes[k] < full[k]]
        grow = grow or [k for k in ("fsdp", "data", "tensor", "expert") if sizes[k] > 1]  # a layout under 8
        if not grow:
            break
        sizes[grow[0]] *= 2
    if _prod(sizes) != SMOKE_DEVICES:
        raise ValueError(f"layout {dict(layout.mesh)} cannot be shrunk onto {SMOKE_DEVICES} devices")
    return sizes


def _prod(d):
    out = 1
    for v in d.values():
        out *= v
    return out


def split_layout(arg: str | None, default: str) -> tuple[str, bool]:
    """(layout name, smoke?) of the `:LAYOUT` suffix: LAYOUT, cpu-smoke, or cpu-smoke@LAYOUT."""
    arg = arg or default
    if arg == SMOKE:
        return default, True
    if arg.startswith(SMOKE + "@"):
        return arg[len(SMOKE) + 1:], True
    return arg, False


def pick_layout(layouts: Mapping[str, Layout], name: str) -> Layout:
    if name not in layouts:
        raise ValueError(f"unknown mesh layout {name!r}; this config defines {sorted(layouts)} and "
                         f"{SMOKE}[@LAYOUT] (select one with --config=configs/NAME.py:LAYOUT)")
    return layouts[name]


# ---- the shared config -------------------------------------------------------------------------------
def build(name: str, preset: str, hf_path: str, layouts: Mapping[str, Layout], layout: str):
    """The run-config defaults with the reference recipe, the model preset and one named mesh layout."""
    lay = pick_layout(layouts, layout)
    c = defaults()
    c.name = name
    c.seed = 0
    c.rounds = 3

    c.model.preset = preset
    c.model.hf_path = hf_path
    c.model.dtype = "bfloat16"          # compute
    c.model.param_dtype = "float32"     # master weights and AdamW moments (lr 1e-6 updates vanish in bf16)
    c.model.remat = "full"              # 14k-token rows: keep only each layer's input
    c.model.attention_impl = "auto"     # splash attention on TPU, cuDNN flash attention on GPU (bf16)
    c.model.moe_impl = "auto"           # megablox grouped matmuls on TPU, ragged_dot on GPU
    c.tokenizer.kind = "qwen3"

    mesh_shape(lay)                     # the layout fits the device count it was sized for
    for axis in ("data", "fsdp", "tensor", "expert"):
        c.mesh[axis] = int(lay.mesh.get(axis, 1))
    c.mesh.layout = layout
    c.mesh.hardware = lay.hardware

    c.data.agentic_weight = 0.5         # both task families of the paper in every batch
    c.data.reasoning_weight = 0.5
    c.data.schedule = "mixed"
    c.data.heldout_tasks = 256
    c.data.task_files = TASK_FILES
    c.data.task_heldout_fraction = 0.1

    c.sft.enabled = False               # the Qwen3 checkpoints already speak the tool-call format

    c.rl.steps_per_round = 50
    c.rl.tasks_per_step = TASKS_PER_STEP
    c.rl.group_size = GROUP_SIZE
    c.rl.mini_batch_tasks = MINI_BATCH_TASKS
    c.rl.micro_batch_rows = lay.micro_batch_rows
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
    c.rl.dual_clip_c = DUAL_CLIP_C
    c.rl.dynamic_sampling = False       # the reference recipe has neither (rl.dynamic_sampling / overlong_filter
    c.rl.overlong_filter = False        # remain options)

    c.optim.learning_rate = LEARNING_RATE
    c.optim.warmup_steps = 0
    c.optim.decay = "constant"
    c.optim.weight_decay = 0.01
    c.optim.max_grad_norm = 1.0

    c.rollout.max_len = PROMPT_TOKENS + RESPONSE_TOKENS + 240  # 14,336 = 112 x 128: the KV cache length
    c.rollout.max_response_tokens = RESPONSE_TOKENS
    c.rollout.max_new_tokens_per_turn = 0
    c.rollout.enable_thinking = False   # the paper's models are non-thinking (the protocol's /no_think)
    c.rollout.max_workers = 64
    c.rollout.decode_batch_size = lay.decode_batch_size
    c.rollout.expert_shards = lay.expert_shards
    c.env.user = "teacher"              # the paper's world: LLM mock user and tools, rubric judge
    c.env.tools = "teacher"
    c.env.judge = "teacher"
    c.env.protocol = "reference"
    c.env.gates = REFERENCE_GATES
    c.env.max_agent_turns = MAX_AGENT_TURNS
    c.env.max_user_turns = MAX_USER_TURNS

    c.eval.k = 4
    c.eval.temperature = 1.0
    c.eval.greedy_pass1 = True

    d = c.teachers.default
    d.base_url = TEACHER_URL
    d.model = TEACHER_MODEL
    d.api_key_env = ""                  # set to the env var's name if the server was started with --api-key
    d.concurrency = 64
    d.timeout_s = 300.0
    d.max_tokens = 4096
    c.teachers.mock_user.temperature = 0.3
    c.teachers.mock_user.max_tokens = 512
    c.teachers.mock_tool.temperature = 0.0
    c.teachers.mock_tool.max_tokens = 1024
    c.teachers.judge.temperature = 0.0
    c.teachers.judge.max_tokens = 1024
    c.teachers.solver.temperature = 0.6
    c.synth.agentic.persona_path = PERSONAS
    c.synth.agentic.num_personas = PERSONAS_PER_ROUND
    c.synth.reasoning.persona_path = PERSONAS
    return c


# Knobs a cpu-smoke config may change relative to the real layout: sizes and the harness, nothing else.
SMOKE_FIELDS = (
    "name", "rounds",
    "model.hf_path",
    "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.expert", "mesh.hardware",
    "data.heldout_tasks",
    "env.max_agent_turns", "env.max_user_turns",
    "sft.steps", "sft.batch_size", "sft.warmup_steps", "sft.micro_batch_rows",
    "rl.steps_per_round", "rl.tasks_per_step", "rl.group_size", "rl.mini_batch_tasks", "rl.micro_batch_rows",
    "rl.max_refill_batches",
    "rollout.max_len", "rollout.max_response_tokens", "rollout.max_new_tokens_per_turn",
    "rollout.decode_batch_size", "rollout.expert_shards", "rollout.max_workers", "rollout.chunk_size",
    "eval.k", "eval.batch_size",
    "checkpoint.every_steps", "export.max_shard_bytes",
    "teachers.default.base_url", "teachers.default.concurrency", "teachers.default.timeout_s",
    "synth.agentic.num_procedural", "synth.agentic.procedural_per_round", "synth.agentic.num_personas",
    "synth.reasoning.num_procedural", "synth.reasoning.fresh_procedural_per_round",
    "synth.reasoning.k_solutions",
    "smoke.enabled", "smoke.cpu_devices", "smoke.model_sizes",
)

# The random checkpoint's shape per family: the preset's structure (tied embeddings, GQA ratio family,
# MoE routing) at toy width; the real 151,936-token vocabulary so the real tokenizer runs.
SMOKE_MODEL = {
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=16),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=16, num_experts=8,
                      num_experts_per_tok=2),
}


def shrink(c, layout: Layout):
    """The cpu-smoke variant of a built config `c` (see the module docstring): only SMOKE_FIELDS change."""
    c.name = f"{c.name}_cpu_smoke"
    c.rounds = 2
    c.model.hf_path = ""                # the smoke run writes a random checkpoint into its run dir and loads it
    for axis, size in smoke_mesh(layout).items():
        c.mesh[axis] = size
    c.mesh.hardware = "cpu"
    c.data.heldout_tasks = 4
    c.env.max_agent_turns = 3
    c.env.max_user_turns = 3
    if c.sft.enabled:
        c.sft.steps, c.sft.batch_size, c.sft.warmup_steps = 2, max(4, c.mesh.data * c.mesh.fsdp), 1
    shards = c.mesh.data * c.mesh.fsdp  # micro-batches are split over data x fsdp
    c.rl.steps_per_round = 2
    c.rl.group_size = 2
    c.rl.mini_batch_tasks = max(1, shards // 2)     # mini-batch rows >= the batch shards
    c.rl.tasks_per_step = 2 * c.rl.mini_batch_tasks  # two optimizer steps per GRPO step, as the recipe's four
    c.rl.micro_batch_rows = max(shards, 2)
    c.rl.max_refill_batches = 1
    c.rollout.max_len = 2560                # demo prompts of 1.9k-2.5k tokens fit; longer ones are left out, counted
    c.rollout.max_response_tokens = 384
    c.rollout.max_new_tokens_per_turn = 32
    c.rollout.decode_batch_size = 4
    if c.rollout.expert_shards:         # one smoke process holds every copy: the smallest multi-shard copy
        c.rollout.expert_shards = 2 * c.mesh.expert
    c.rollout.max_workers = 8
    c.rollout.chunk_size = 512
    c.eval.k = 2
    c.eval.batch_size = 8
    c.checkpoint.every_steps = 1
    c.export.max_shard_bytes = 4 * 2**20   # several shards, as a real export has
    c.teachers.default.base_url = "loopback?malformed_rate=0.15"  # garbage too: counted, retried, survived
    c.teachers.default.concurrency = 4
    c.teachers.default.timeout_s = 60.0
    c.synth.agentic.num_procedural = 4
    c.synth.agentic.procedural_per_round = 2
    c.synth.agentic.num_personas = min(c.synth.agentic.num_personas, 2)
    c.synth.reasoning.num_procedural = 4
    c.synth.reasoning.fresh_procedural_per_round = 2
    c.synth.reasoning.k_solutions = 2
    c.smoke.enabled = True
    c.smoke.cpu_devices = SMOKE_DEVICES
    from agq_jax.models.config import PRESETS

    c.smoke.model_sizes = dict(SMOKE_MODEL[PRESETS[c.model.preset].model_type])
    return c


def get_config_for(module_globals: dict, name: str, layout: str | None):
    """The body of every full-size config's get_config: build the named (or default) layout, cpu-smoke
    variants included. `module_globals` supplies PRESET, HF_PATH, MESH_LAYOUTS, DEFAULT_LAYOUT and an
    optional `recipe(c)` that applies the config's own changes."""
    g = module_globals
    lay_name, smoke = split_layout(layout, g["DEFAULT_LAYOUT"])
    c = build(name, g["PRESET"], g["HF_PATH"], g["MESH_LAYOUTS"], lay_name)
    if "recipe" in g:
        g["recipe"](c)
    if smoke:
        shrink(c, g["MESH_LAYOUTS"][lay_name])
    return c
