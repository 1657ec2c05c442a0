"""Defaults shared by every training config; a config file overrides what differs.

`python -m agq_jax.train --config=configs/NAME.py --config.rl.group_size=8` reads one of these.
Field names mirror the dataclasses they become (agq_jax.rl.optim.OptimConfig, agq_jax.rl.step.LossConfig,
agq_jax.rollout RolloutConfig / SamplingParams, agq_jax.models.sharding.MeshConfig, Qwen3Config).
"""
import ml_collections


def _load_synth_defaults():
    """configs/synth_tiny.py by file path (ml_collections execs config files outside any package)."""
    import importlib.util
    import pathlib
    import sys

    name = "agq_jax_configs_synth_tiny"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).resolve().with_name("synth_tiny.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0
    c.run_dir = ""                  # "" = runs/<name>
    c.rounds = 1                    # flywheel rounds: data -> (SFT) -> GRPO -> eval -> failures -> expansion

    # Policy model. Either weights from an HF directory, or a random init of a preset / explicit shape.
    c.model = ml_collections.ConfigDict(dict(
        hf_path="",                 # HF checkpoint dir (config.json + safetensors); "" = random init
        preset="",                  # a qwen3 PRESETS name, used when hf_path is ""
        overrides={},               # Qwen3Config fields to override (tiny shapes, vocab_size, ...)
        dtype="float32",            # compute dtype ("bfloat16" on GPU / TPU)
        param_dtype="float32",      # master weights + optimizer state dtype
        remat="none",               # none | full | dots
        attention_impl="xla",       # xla | auto (CPU: blocked training + KV-cache attention; GPU: cuDNN for bf16; TPU: splash) | cudnn | blocked | splash
        moe_impl="auto",            # auto (tiled on CPU, megablox on TPU, ragged on GPU) | ragged (ragged_dot) | tiled | megablox | dense (oracle)
    ))
    c.tokenizer = ml_collections.ConfigDict(dict(
        kind="qwen3",               # qwen3 (the real 151,669-token vocabulary) | procedural (trained on the worlds)
        vocab_size=0,               # procedural only
        pretokenizer="qwen2",       # procedural only: qwen2 (word pieces) | phrases (merges across words; digits single)
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1,
                                            enabled=True))  # False: one device, no mesh (CPU demo)

    # Which task families are trained and how they are mixed.
    c.data = ml_collections.ConfigDict(dict(
        agentic_weight=1.0,         # share of each GRPO batch from mock-world tasks
        reasoning_weight=0.0,       # share from verifiable reasoning problems (python + search tools)
        schedule="mixed",           # mixed (both in every batch) | staged (agentic rounds, then reasoning)
        heldout_tasks=64,           # evaluation tasks per round (held-out seeds / domains)
        domains=(),                 # agentic domains trained and evaluated; () = all procedural domains
        accumulate=True,            # round r trains on the datasets of rounds 0..r (not only round r)
    ))

    c.sft = ml_collections.ConfigDict(dict(
        enabled=False,              # supervised warm start on expert trajectories
        rounds="first",             # first | every
        steps=0,
        batch_size=16,
        learning_rate=1e-5,
        warmup_steps=0,
        micro_batch_size=0,         # rows per forward/backward; 0 = the whole batch
        data="round",               # round (gold episodes of the round's dataset) | procedural (a fresh task per row)
        loss_on="policy",           # policy (agent tokens) | all (whole transcript: random-init warm start)
        decay="constant",           # constant | cosine | linear (after warmup)
    ))

    c.rl = ml_collections.ConfigDict(dict(
        steps_per_round=100,
        tasks_per_step=64,          # prompts per GRPO step
        group_size=16,              # G rollouts per task
        mini_batch_size=16,         # tasks per optimizer step (x group_size rows)
        micro_batch_size=0,         # rows per forward/backward (gradient accumulation); 0 = mini-batch
        ppo_epochs=1,               # mu
        reward="rubric",            # what GRPO optimises: rubric (partial credit) | success (0/1) | rubric+success
        advantage="grpo",           # grpo | drgrpo | rloo
        std_normalize=True,
        negative_weight=1.0,        # scale of negative advantages (1 = GRPO; < 1 leans on reinforcing successes)
        policy_loss="ppo_clip",     # ppo_clip | gspo
        clip_low=0.2,
        clip_high=0.28,
        gspo_clip_low=3e-4,         # GSPO's sequence-ratio clip range (policy_loss="gspo")
        gspo_clip_high=4e-4,
        loss_agg="token-mean",      # token-mean | seq-mean-token-mean | seq-mean-token-sum | drgrpo
        kl_coef=0.0,                # > 0 loads a frozen reference policy
        kl_estimator="k3",
        entropy_coef=0.0,
        dynamic_sampling=True,      # drop zero-variance groups and refill
        max_refill_batches=2,
        overlong_filter=True,       # mask episodes cut by the token budget
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        logprob_chunk=512,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-6,
        warmup_steps=0,
        decay="constant",
        min_lr_ratio=0.0,
        weight_decay=0.01,
        max_grad_norm=1.0,
        b1=0.9,
        b2=0.999,
        mu_dtype="",                # "" = param dtype; "bfloat16" halves the first moment
        total_steps=0,              # for cosine / linear decay; 0 = rounds x (sft + rl) steps
    ))
    c.rollout = ml_collections.ConfigDict(dict(
        max_len=12288,              # tokens per episode (prompt + replies + env turns): the KV cache size
        max_new_tokens_per_turn=0,  # 0 = the rest of the budget
        max_response_tokens=0,      # policy tokens per episode (the reference: 10,000); 0 = no cap beyond max_len
        decode_batch_size=0,        # episodes decoded together; 0 = all of a step's rollouts at once
        max_agent_turns=15,
        max_user_turns=15,
        enable_thinking=True,
        max_workers=32,             # concurrent environment steps (teachers may be HTTP)
        stop_on_tool_call=True,     # a reply also ends at </tool_call> (the env suffix adds <|im_end|>)
        chunk_size=256,             # sampler prefill chunk (tokens)
        train_pad_multiple=0,       # 0: train batches padded to max_len (one shape); N: to the longest row, rounded up to N
    ))
    c.eval = ml_collections.ConfigDict(dict(
        k=4,                        # trials per task for pass^k / pass@k
        temperature=1.0,
        greedy_pass1=True,          # pass@1 from a greedy run
        batch_size=64,              # episodes per evaluation rollout batch
        after_sft=True,             # also evaluate right after SFT (the SFT-only baseline, same tasks / seeds)
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(keep=3, every_steps=10, async_save=True))
    c.export = ml_collections.ConfigDict(dict(every_round=True, max_shard_bytes=5 * 2**30))

    # Teachers (OpenAI-compatible endpoints, e.g. SGLang). Empty base_url = offline procedural flywheel.
    c.teachers = ml_collections.ConfigDict(dict(
        base_url="",
        api_key_env="OPENAI_API_KEY",
        synthesizer="", mock_user="", mock_tool="", judge="", solvers=(),
        max_concurrency=16,
        timeout_s=120.0,
    ))
    # The flywheel (data_synth.run_round) config: agentic / reasoning sub-configs of configs/synth_tiny.py.
    # The driver points its runs_dir / name at <run_dir>/data and enables the families with non-zero weight.
    synth = _load_synth_defaults()
    agentic_defaults, reasoning_defaults = synth.agentic_defaults, synth.reasoning_defaults
    c.synth = ml_collections.ConfigDict(dict(
        name="data", runs_dir="", progress=True, teachers=ml_collections.ConfigDict(), cache_dir="",
        check_health=True, health_timeout_s=30.0,
        agentic=agentic_defaults(), reasoning=reasoning_defaults()))
    c.flywheel = ml_collections.ConfigDict(dict(
        failure_threshold=1.0,      # a training item whose GRPO group mean reward is below this is a failure
    ))
    c.verbose = True                # progress bars, round summaries and synthesis tables on the console
    return c
