"""The run config: every knob of a training run, defined once here with its default and its check.

`configs/*.py` files build an ml_collections ConfigDict from these defaults (so `--config.rl.group_size=8`
and the `:LAYOUT` suffix keep working); `RunConfig.from_configdict` turns it, once, into these frozen
sections, which the driver, trainer, sampler, data pipeline, exporter and compile-ahead tool receive.
A key that is not defined here is an error naming it; `tests/test_train_entry.py::test_every_knob_is_read`
runs the real entry points and fails on any field below that nothing reads. No jax import: loading a config
stays instant.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Mapping, NamedTuple

from agq_jax.models.config import DEFAULT_MAX_SHARD_BYTES
from agq_jax.run_config.tracking import Section


def _one_of(where: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"config {where}={value!r}: expected one of {tuple(allowed)}")


def _positive(where: str, value, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"config {where}={value!r}: must be {'>= 0' if zero_ok else '> 0'}")


DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
    """The policy. With `hf_path` the checkpoint's config.json is the architecture (`preset` then only names
    the family it must belong to, and is what compile-ahead / memory planning use when the weights are
    absent); without it, a random init of `preset`. `overrides` apply on top of either."""
    hf_path: str = ""
    preset: str = ""
    overrides: Mapping = field(default_factory=dict)
    dtype: str = "float32"               # compute
    param_dtype: str = "float32"         # master weights and optimizer moments
    remat: str = "none"                  # none | full | dots
    attention_impl: str = "xla"          # xla | auto | cudnn | blocked (models.config.ATTENTION_IMPLS)
    moe_impl: str = "auto"               # auto | ragged | tiled | dense (models.config.MOE_IMPLS)

    def __post_init__(self):
        from agq_jax.models.config import ATTENTION_IMPLS, MOE_IMPLS, PRESETS, REMAT_POLICIES
        _one_of("model.dtype", self.dtype, DTYPES)
        _one_of("model.param_dtype", self.param_dtype, DTYPES)
        _one_of("model.remat", self.remat, REMAT_POLICIES)
        _one_of("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _one_of("model.moe_impl", self.moe_impl, MOE_IMPLS)
        if self.preset:
            _one_of("model.preset", self.preset, sorted(PRESETS))


@dataclasses.dataclass(frozen=True)
class TokenizerSection(Section):
    kind: str = "qwen3"                  # qwen3 (the real vocabulary) | procedural (a BPE trained on the worlds)
    vocab_size: int = 0                  # procedural only
    pretokenizer: str = "qwen2"          # procedural only: qwen2 (word pieces) | phrases (digits single)

    def __post_init__(self):
        _one_of("tokenizer.kind", self.kind, ("qwen3", "procedural"))
        _one_of("tokenizer.pretokenizer", self.pretokenizer, ("qwen2", "phrases"))


class Hardware(NamedTuple):
    description: str
    hbm_bytes: float                     # memory per JAX device
    platform: str                        # the jax backend it runs on: tpu | gpu | cpu


# What a layout can be sized for (mesh.hardware). TPU v5p: one JAX device per chip (megacore).
HARDWARE = {
    "cpu": Hardware("host CPU devices", 0.0, "cpu"),
    "tpu-v5p": Hardware("TPU v5p chip", 95e9, "tpu"),
    "tpu-v5e": Hardware("TPU v5e chip", 16e9, "tpu"),
    "tpu-v6e": Hardware("TPU v6e (Trillium) chip", 32e9, "tpu"),
    "h100": Hardware("NVIDIA H100 SXM 80GB", 80e9, "gpu"),
    "h200": Hardware("NVIDIA H200 141GB", 141e9, "gpu"),
}


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
    """Mesh axis sizes (one may be -1 = the remaining devices) and the named layout they came from."""
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    enabled: bool = True                 # False: one device, no mesh (the CPU demo)
    layout: str = ""                     # the config's layout name (configs/NAME.py:LAYOUT); "" = none
    hardware: str = ""                   # what the layout was sized for; checked against the jax backend

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor, self.expert)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"config mesh: sizes {sizes} (data, fsdp, tensor, expert) must be >= 1, one may be -1")
        _one_of("mesh.hardware", self.hardware, ("",) + tuple(HARDWARE))


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
    agentic_weight: float = 1.0          # share of each GRPO batch from mock-world tasks
    reasoning_weight: float = 0.0        # share from verifiable reasoning problems
    schedule: str = "mixed"              # mixed (both in every batch) | staged (agentic rounds, then reasoning)
    heldout_tasks: int = 64              # evaluation tasks (same every round)
    domains: tuple = ()                  # agentic domains trained and evaluated; () = all procedural domains
    accumulate: bool = True              # round r trains on the datasets of rounds 0..r
    task_files: tuple = ()               # released-format task files trained on every round: tool_use_demo.json
                                         # lists, nine-column parquet, task JSONL (envs.sources.load_task_files)
    task_heldout_fraction: float = 0.0   # share of the task files' tasks held out for evaluation (hash split)

    def __post_init__(self):
        _one_of("data.schedule", self.schedule, ("mixed", "staged"))
        if not 0.0 <= self.task_heldout_fraction < 1.0:
            raise ValueError(f"config data.task_heldout_fraction={self.task_heldout_fraction!r}: must be in [0, 1)")
        if self.agentic_weight < 0 or self.reasoning_weight < 0 or self.agentic_weight + self.reasoning_weight <= 0:
            raise ValueError("config data.agentic_weight / data.reasoning_weight must be >= 0 with a positive sum")
        _positive("data.heldout_tasks", self.heldout_tasks, zero_ok=True)


@dataclasses.dataclass(frozen=True)
class EnvSection(Section):
    """The simulated world an episode runs in (training and evaluation alike; agq_jax.envs.world)."""
    user: str = "scripted"               # scripted (rules over hidden facts) | teacher (mock_user role) | auto
    tools: str = "auto"                  # auto | state (the task's world) | expected (pinned returns) | teacher
    judge: str = "none"                  # none | teacher (the judge role grades the rubric text: one more sub-goal)
    protocol: str = "plain"              # plain | reference (<policy> + requirements, <question>/<answer>, /no_think)
    gates: tuple = ("no_forbidden",)     # reward gates (envs.rewards.GATES); the reference's: + tool_response, clean_end
    max_agent_turns: int = 15            # agent replies per episode (reference: 15)
    max_user_turns: int = 15             # simulated-user replies after the opening (reference: 15)
    user_corrects: bool = False          # scripted user: "No. I'd like X." to a restated wrong option

    def __post_init__(self):
        from agq_jax.envs.world import JUDGES, TOOLS, USERS, WorldSpec

        _one_of("env.user", self.user, USERS)
        _one_of("env.tools", self.tools, TOOLS)
        _one_of("env.judge", self.judge, JUDGES)
        try:
            WorldSpec(user=self.user, protocol=self.protocol, gates=tuple(self.gates), user_corrects=self.user_corrects)
        except ValueError as e:
            raise ValueError(f"config env: {e}") from None
        _positive("env.max_agent_turns", self.max_agent_turns)
        _positive("env.max_user_turns", self.max_user_turns, zero_ok=True)


DECAYS = ("constant", "cosine", "linear", "wsd")  # rl.optim.make_schedule (wsd: see WSD_DECAY_FRACTION)


@dataclasses.dataclass(frozen=True)
class SFTSection(Section):
    enabled: bool = False                # supervised warm start on expert trajectories
    rounds: str = "first"                # first | every
    steps: int = 0
    batch_size: int = 16                 # rows per optimizer step
    micro_batch_rows: int = 0            # rows per forward/backward; 0 = the whole batch
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    decay: str = "constant"              # after warmup: constant | cosine | linear | wsd
    data: str = "round"                  # round (gold episodes of the round's dataset) | procedural (fresh tasks)
    loss_on: str = "policy"              # policy (agent tokens) | all (whole transcript: random-init warm start)
    loss_agg: str = "token-mean"         # rl.algo.AGGREGATIONS

    def __post_init__(self):
        _one_of("sft.rounds", self.rounds, ("first", "every"))
        _one_of("sft.decay", self.decay, DECAYS)
        _one_of("sft.data", self.data, ("round", "procedural"))
        _one_of("sft.loss_on", self.loss_on, ("policy", "all"))
        _positive("sft.batch_size", self.batch_size)
        if self.micro_batch_rows and self.batch_size % self.micro_batch_rows:
            raise ValueError(f"config sft.batch_size={self.batch_size} is not a multiple of "
                             f"sft.micro_batch_rows={self.micro_batch_rows}")


@dataclasses.dataclass(frozen=True)
class RLSection(Section):
    """GRPO. Unit names say what they count: `*_tasks` are task groups (x group_size rows), `*_rows` rows."""
    steps_per_round: int = 100
    tasks_per_step: int = 64             # task groups sampled per GRPO step
    group_size: int = 16                 # G rollouts per task
    mini_batch_tasks: int = 16           # task groups per optimizer step
    micro_batch_rows: int = 0            # rows per forward/backward (gradient accumulation); 0 = the mini-batch
    ppo_epochs: int = 1                  # mu
    reward: str = "rubric"               # rl.algo.TRAINING_REWARDS: rubric | success | rubric+success |
                                         # success_or_rubric (0/1; partial credit only in groups with no success) |
                                         # success_placebo (a control: each sample paid another's success)
    advantage: str = "grpo"              # rl.algo.ADVANTAGES
    std_normalize: bool = True           # grpo: divide by the group's std
    negative_weight: float = 1.0         # scale of negative advantages (1 = GRPO)
    policy_loss: str = "ppo_clip"        # ppo_clip | gspo
    clip_low: float = 0.2                # token-ratio clip (ppo_clip)
    clip_high: float = 0.28
    dual_clip_c: float = 0.0             # dual-clip bound on negative-advantage ratios (0 = off; reference: 10)
    gspo_clip_low: float = 3e-4          # sequence-ratio clip (gspo)
    gspo_clip_high: float = 4e-4
    loss_agg: str = "token-mean"         # rl.algo.AGGREGATIONS
    kl_coef: float = 0.0                 # > 0 keeps a frozen reference policy (the one GRPO starts from)
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    dynamic_sampling: bool = True        # drop zero-variance groups and re-sample
    max_refill_batches: int = 2
    overlong_filter: bool = True         # mask episodes cut by the token budget
    temperature: float = 1.0             # rollout sampling
    top_p: float = 1.0
    top_k: int = 0
    logprob_chunk: int = 512             # vocabulary rows per log-prob chunk (memory)

    def __post_init__(self):
        for name in ("steps_per_round", "tasks_per_step", "group_size", "mini_batch_tasks", "ppo_epochs"):
            _positive(f"rl.{name}", getattr(self, name), zero_ok=name == "steps_per_round")
        if self.tasks_per_step % self.mini_batch_tasks:
            raise ValueError(f"config rl.tasks_per_step={self.tasks_per_step} is not a multiple of "
                             f"rl.mini_batch_tasks={self.mini_batch_tasks}")
        rows = self.mini_batch_tasks * self.group_size
        if self.micro_batch_rows and rows % self.micro_batch_rows:
            raise ValueError(f"config rl.micro_batch_rows={self.micro_batch_rows} does not divide a mini-batch of "
                             f"{rows} rows (rl.mini_batch_tasks x rl.group_size)")
        _one_of("rl.policy_loss", self.policy_loss, ("ppo_clip", "gspo"))
        if self.dual_clip_c and self.dual_clip_c <= 1.0:
            raise ValueError(f"config rl.dual_clip_c={self.dual_clip_c}: must be 0 (off) or > 1")

    def rows_per_step(self) -> int:
        return self.tasks_per_step * self.group_size


@dataclasses.dataclass(frozen=True)
class OptimSection(Section):
    """AdamW for GRPO (SFT uses its own learning rate / warmup / decay and these moments and clipping)."""
    learning_rate: float = 1e-6
    warmup_steps: int = 0
    decay: str = "constant"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0           # 0 = no clipping
    b1: float = 0.9
    b2: float = 0.999
    mu_dtype: str = ""                   # "" = the param dtype; "bfloat16" halves the first moment
    total_steps: int = 0                 # optimizer steps the decay spans; 0 = rounds x steps x updates per step

    def __post_init__(self):
        _one_of("optim.decay", self.decay, DECAYS)
        _one_of("optim.mu_dtype", self.mu_dtype, ("",) + DTYPES)
        _positive("optim.total_steps", self.total_steps, zero_ok=True)


@dataclasses.dataclass(frozen=True)
class RolloutSection(Section):
    max_len: int = 12288                 # tokens per episode (prompt + replies + env turns): the KV cache size
    max_new_tokens_per_turn: int = 0     # 0 = the rest of the budget
    max_response_tokens: int = 0         # tokens after the prompt (replies + env turns); past it: overlong. 0 = max_len
    decode_batch_size: int = 0           # episodes one host decodes together (the rest wait for the next batch); 0 = all
    expert_shards: int = 0               # multi-host: expert shards of each bf16 rollout copy (0 = mesh.expert); tensor
                                         # x this many chips hold a copy, spanning hosts past one host's chips
    enable_thinking: bool = True         # the chat template's thinking mode for the policy
    max_workers: int = 32                # concurrent environment steps (teachers may be HTTP)
    stop_on_tool_call: bool = True       # a reply also ends at </tool_call> (the env suffix adds <|im_end|>)
    chunk_size: int = 256                # sampler prefill chunk (tokens)
    train_pad_multiple: int = 0          # 0: train rows padded to max_len (one shape); N: to the longest, rounded to N

    def __post_init__(self):
        _positive("rollout.max_len", self.max_len)
        for name in ("max_new_tokens_per_turn", "max_response_tokens", "decode_batch_size", "expert_shards",
                     "train_pad_multiple"):
            _positive(f"rollout.{name}", getattr(self, name), zero_ok=True)
        if self.max_response_tokens >= self.max_len:
            raise ValueError(f"config rollout.max_response_tokens={self.max_response_tokens} leaves no room for a "
                             f"prompt in rollout.max_len={self.max_len}")


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
    k: int = 4                           # sampled trials per task (pass@k / pass^k); 0 = none
    temperature: float = 1.0
    greedy_pass1: bool = True            # also pass@1 from one greedy episode per task
    batch_size: int = 64                 # episodes per evaluation rollout batch
    after_sft: bool = True               # also evaluate right after SFT (the SFT-only baseline)


@dataclasses.dataclass(frozen=True)
class CheckpointSection(Section):
    keep: int = 3
    every_steps: int = 10
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class ExportSection(Section):
    every_round: bool = True             # an HF directory (safetensors + config + tokenizer) per round
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES


@dataclasses.dataclass(frozen=True)
class FlywheelSection(Section):
    failure_threshold: float = 1.0       # a training task whose group mean reward is below this is a failure


@dataclasses.dataclass(frozen=True)
class SmokeSection(Section):
    """The `cpu-smoke` layout of a full-size config: the same recipe at toy size on forced CPU devices."""
    enabled: bool = False
    cpu_devices: int = 8                 # XLA host-platform devices (set before jax starts)
    model_sizes: Mapping = field(default_factory=dict)   # Qwen3Config sizes of the random checkpoint written first
