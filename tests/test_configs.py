"""The full-size configs (0_6b, 8b, 30b_a3b, 235b_a22b) load through ml_collections' config_flags from any
working directory, carry the reference recipe, and their models build abstractly (shapes + shardings, no
weights) on simulated meshes of every named layout; Qwen3-30B-A3B also compiles on the 8 CPU devices.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ["0_6b", "8b", "30b_a3b", "235b_a22b"]
# Published sizes of the Qwen3 release (total, active) in billions; asserted to 2%.
PUBLISHED = {"0_6b": (0.6, 0.6), "8b": (8.2, 8.2), "30b_a3b": (30.5, 3.3), "235b_a22b": (235.0, 22.0)}
PRESETS = {"0_6b": "Qwen3-0.6B", "8b": "Qwen3-8B", "30b_a3b": "Qwen3-30B-A3B", "235b_a22b": "Qwen3-235B-A22B"}


def _load(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mesh_plan = _load(REPO / "launch" / "mesh_plan.py", "agq_jax_test_mesh_plan")


def _path(name: str) -> pathlib.Path:
    return REPO / "configs" / f"{name}.py"


def _module(name: str):
    return mesh_plan.load_config_module(_path(name))


def _flag_config(argv: list[str]):
    """Parse argv with a fresh absl FlagValues + config_flags.DEFINE_config_file, as the driver does."""
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        if hasattr(v, "items"):
            out |= _keys(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


ALL_LAYOUTS = [(n, lay) for n in CONFIGS for lay in _module(n).MESH_LAYOUTS]


# ---- loading ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,layout", ALL_LAYOUTS)
def test_loads_through_config_flags_from_another_cwd(name, layout, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", f"--config={_path(name)}:{layout}", "--config.rl.group_size=8", "--config.seed=3"]
    c = _flag_config(argv)
    assert c.mesh_layout == layout and c.rl.group_size == 8 and c.seed == 3
    lay = _module(name).MESH_LAYOUTS[layout]
    assert {k: c.mesh[k] for k in ("data", "fsdp", "tensor", "expert")} == {**dict(data=1, tensor=1, expert=1),
                                                                              **dict(lay.mesh)}
    with pytest.raises(AttributeError):  # config_flags locks the config: typos in overrides cannot add fields
        c.rl.grup_size = 4


def test_default_layout_and_unknown_layout_error():
    module = _module("30b_a3b")
    assert _flag_config(["t", f"--config={_path('30b_a3b')}"]).mesh_layout == module.DEFAULT_LAYOUT
    with pytest.raises(ValueError, match=r"unknown mesh layout 'v9-1'.*h100x16"):
        module.get_config("v9-1")


def test_loads_in_a_clean_interpreter_outside_the_repo(tmp_path):
    """No reliance on pytest's sys.path: a fresh python in another directory, as a launch script runs it."""
    code = ("import sys\nfrom absl import flags\nfrom ml_collections import config_flags\n"
            "argv = ['t', '--config=' + sys.argv[1], '--config.rl.clip_high=0.3']\n"
            "fv = flags.FlagValues()\n"
            "config_flags.DEFINE_config_file('config', None, flag_values=fv, sys_argv=argv)\n"
            "fv(argv)\nprint(fv.config.model.preset, fv.config.rl.policy_loss, fv.config.rl.clip_high)\n")
    out = subprocess.run([sys.executable, "-c", code, f"{_path('30b_a3b')}:h100x16"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Qwen3-30B-A3B", "gspo", "0.3"]


# ---- values -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_reference_recipe(name):
    module = _module(name)
    ref = module.ref
    c = module.get_config()
    base = ref.get_base_config()
    extra = _keys(c) - _keys(base)
    assert extra <= set(ref.EXTRA_FIELDS), f"fields not in configs/base.py: {sorted(extra - set(ref.EXTRA_FIELDS))}"
    assert c.name == name and c.model.preset == PRESETS[name] and c.tokenizer.kind == "qwen3"
    assert c.model.hf_path.endswith(PRESETS[name]) and not pathlib.Path(c.model.hf_path).is_absolute()
    assert (c.model.dtype, c.model.param_dtype, c.model.remat) == ("bfloat16", "float32", "full")
    # the reference's RL settings
    assert (c.rl.group_size, c.rl.tasks_per_step, c.rl.mini_batch_size) == (16, 64, 16)
    assert c.optim.learning_rate == 1e-6 and c.optim.decay == "constant"
    assert (c.rl.clip_low, c.rl.clip_high) == (0.2, 0.28)
    assert c.rl.kl_coef == 0.0 and c.rl.advantage == "grpo"
    assert c.rollout.max_response_tokens == 10_000 and c.rollout.max_len >= 10_000 + 2_048
    assert c.rollout.max_len % 128 == 0
    assert (c.rollout.max_agent_turns, c.rollout.max_user_turns) == (15, 15)
    assert c.rl.tasks_per_step % c.rl.mini_batch_size == 0
    mini_rows = c.rl.mini_batch_size * c.rl.group_size
    assert mini_rows % c.rl.micro_batch_size == 0
    if name in ("30b_a3b", "235b_a22b"):
        assert c.rl.policy_loss == "gspo" and c.rl.loss_agg == "seq-mean-token-mean"
        assert 0 < c.rl.gspo_clip_low <= c.rl.gspo_clip_high < 0.01
    else:
        assert c.rl.policy_loss == "ppo_clip" and c.rl.loss_agg == "token-mean"
    assert c.sft.enabled == (name == "0_6b")
    # teachers, rounds, checkpoints, export
    assert c.teachers.base_url.startswith("http") and c.teachers.base_url.endswith("/v1")
    for role in ("synthesizer", "mock_user", "mock_tool", "judge"):
        assert c.teachers[role] == ref.TEACHER_MODEL
    assert c.rounds >= 2 and c.checkpoint.keep >= 2 and c.checkpoint.async_save and c.export.every_round


@pytest.mark.parametrize("name", CONFIGS)
def test_values_build_the_consumers_dataclasses(name):
    """The fields validate in the dataclasses the driver turns them into (registered names, enums)."""
    from agq_jax.models.sharding import MeshConfig
    from agq_jax.rl import algo
    from agq_jax.rl.optim import OptimConfig
    from agq_jax.rl.step import LossConfig
    module = _module(name)
    for layout in module.MESH_LAYOUTS:
        c = module.get_config(layout)
        mesh = MeshConfig(**{k: c.mesh[k] for k in ("data", "fsdp", "tensor", "expert")})
        assert math.prod(mesh.shape(module.MESH_LAYOUTS[layout].devices)) == module.MESH_LAYOUTS[layout].devices
        cfg = mesh_plan.model_config(c)  # Qwen3Config.__post_init__ validates remat / attention / moe impl
        assert cfg.attention_impl == "auto"  # splash on TPU, cuDNN on GPU
    OptimConfig(**{k: c.optim[k] for k in ("learning_rate", "warmup_steps", "decay", "min_lr_ratio",
                                           "weight_decay", "max_grad_norm", "b1", "b2")})
    LossConfig(stage="grpo", **{k: c.rl[k] for k in ("policy_loss", "clip_low", "clip_high", "gspo_clip_low",
                                                     "gspo_clip_high", "loss_agg", "kl_coef", "kl_estimator",
                                                     "entropy_coef", "temperature", "logprob_chunk")})
    algo.lookup(algo.ADVANTAGES, c.rl.advantage, "advantage")


# ---- abstract model on simulated meshes ------------------------------------------------------------

_ABSTRACT_CACHE: dict = {}


@pytest.mark.parametrize("name,layout", ALL_LAYOUTS)
def test_layout_shards_the_full_model(name, layout):
    p = mesh_plan.plan(_path(name), layout, _cache=_ABSTRACT_CACHE)
    sizes, rows, c = p["mesh"], p["rows"], p["config_dict"]
    total, active = PUBLISHED[name]
    assert p["params"] / 1e9 == pytest.approx(total, rel=0.02)
    assert p["active_params"] / 1e9 == pytest.approx(active, rel=0.02)
    assert math.prod(sizes.values()) == p["devices"]
    assert p["divisibility_errors"] == []
    # nothing big is silently replicated: within 3% of fsdp x tensor (x expert for experts) sharding
    assert p["replication_overhead"] < 0.03, p["replication_overhead"]
    # resident train state (params + grads + AdamW, fp32) leaves at least half of HBM for rollouts
    assert p["state_fraction"] <= 0.5, p["state_fraction"]
    # ... and the train step's peak (state + one layer's materialised attention scores for the device's
    # rows of a micro-batch of full-length rows) fits with 10% to spare
    assert p["rows_per_device"] >= 1 and p["train_peak_fraction"] <= 0.9, p["train_peak_fraction"]
    # enough KV cache for every task of a step to have a full-length rollout in flight
    assert p["full_rollouts_global"] >= c.rl.tasks_per_step
    assert c.rl.micro_batch_size % p["batch_shards"] == 0
    cfg = p["model_config"]
    experts = [r for r in rows if "expert" in r["logical"]]
    assert bool(experts) == cfg.is_moe
    for r in experts:
        spec = dict(zip(r["logical"], r["spec"]))
        assert r["shape"][r["logical"].index("expert")] == cfg.num_experts
        if sizes["expert"] > 1:
            assert spec["expert"] == "expert", r
        # every expert weight is split over all of fsdp x tensor x expert
        assert r["size"] // math.prod(r["shard"]) == sizes["fsdp"] * sizes["tensor"] * sizes["expert"], r


def test_30b_has_an_expert_parallel_layout():
    layouts = _module("30b_a3b").MESH_LAYOUTS
    assert any(lay.mesh.get("expert", 1) > 1 for lay in layouts.values())


def test_30b_compiles_on_the_simulated_mesh():
    """The whole Qwen3-30B-A3B forward lowers and compiles SPMD-partitioned on the 8 forced CPU devices with the
    default layout's axes (fsdp filled to 2); XLA's per-device argument bytes equal the plan's."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from agq_jax.models import sharding as shd
    if jax.device_count() != 8:
        pytest.skip("needs the 8 forced CPU devices of tests/conftest.py")
    module = _module("30b_a3b")
    p = mesh_plan.plan(_path("30b_a3b"), module.DEFAULT_LAYOUT, devices=8, _cache=_ABSTRACT_CACHE)
    graphdef, state = _ABSTRACT_CACHE[(p["model_config"], "float32")]
    mesh = shd.make_mesh(shd.MeshConfig(**p["mesh"]))
    assert p["mesh"]["tensor"] > 1 and p["mesh"]["fsdp"] > 1
    shardings = shd.state_shardings(state, mesh)
    abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
    batch, seq = 2, 256
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=jax.sharding.NamedSharding(
        mesh, shd.logical_to_pspec(("batch", "seq"), (batch, seq), mesh)))

    def forward(st, input_ids):
        hidden, _, aux = nnx.merge(graphdef, st).hidden_states(input_ids)
        return hidden, aux

    with jax.set_mesh(mesh):
        compiled = jax.jit(forward, keep_unused=True).lower(abstract, ids).compile()  # lm_head too
    hidden_sharding, _ = compiled.output_shardings
    assert hidden_sharding.spec[0] in ("fsdp", ("data", "fsdp"))
    ids_bytes = batch * seq * 4 // (p["mesh"]["data"] * p["mesh"]["fsdp"])
    stats = compiled.memory_analysis()
    if stats is not None:
        assert stats.argument_size_in_bytes == pytest.approx(p["param_bytes_per_device"] + ids_bytes, rel=1e-3)


# ---- launch scripts (dry runs: the commands they would run) -----------------------------------------

def _script(rel: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    import os
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "AGQ_"))}
    full_env.update(DRY_RUN="1", **env)
    return subprocess.run(["bash", str(REPO / rel), *args], env=full_env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("rel", ["launch/tpu_vm/create.sh", "launch/tpu_vm/install.sh", "launch/tpu_vm/run.sh",
                                 "launch/gpu/install.sh", "launch/gpu/single_node.sh", "launch/gpu/multi_node.sh"])
def test_launch_script_help(rel):
    out = _script(rel, "--help")
    assert out.returncode == 0 and "Env vars" in out.stdout and "set -euo" not in out.stdout, out.stderr


def test_tpu_scripts_target_all_workers():
    create = _script("launch/tpu_vm/create.sh", ZONE="z1", ACCELERATOR_TYPE="v5p-64", SPOT="1")
    assert create.returncode == 0, create.stderr
    assert "tpu-vm create agq-jax --zone=z1 --accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot" in create.stdout
    run = _script("launch/tpu_vm/run.sh", "--", "--config.rl.group_size=8", ZONE="z1", LAYOUT="v5p-32",
                  RUN_DIR="gs://b/r", TPU_NAME="t1")
    assert run.returncode == 0, run.stderr
    cmd = run.stdout.replace("\\", "")
    assert "tpu-vm ssh t1 --zone=z1 --worker=all" in cmd
    assert "agq_jax.train --config=configs/30b_a3b.py:v5p-32 --config.run_dir=gs://b/r --config.rl.group_size=8" in cmd
    missing_zone = _script("launch/tpu_vm/run.sh")
    assert missing_zone.returncode == 2 and "ZONE" in missing_zone.stderr


def test_multi_node_sets_the_distributed_env():
    out = _script("launch/gpu/multi_node.sh", "--", "--config.seed=1", NNODES="2", NODE_RANK="1",
                  COORDINATOR="10.0.0.1:12355", CUDA_VISIBLE_DEVICES="0,1,2,3", CONFIG="configs/30b_a3b.py",
                  LAYOUT="h100x16")
    assert out.returncode == 0, out.stderr
    env = dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith("JAX_"))
    assert env == {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:12355", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                   "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}
    assert "-m agq_jax.train --config=configs/30b_a3b.py:h100x16 --config.seed=1" in out.stdout
    bad = _script("launch/gpu/multi_node.sh", NNODES="2", NODE_RANK="2", COORDINATOR="h:1")
    assert bad.returncode == 2 and "NODE_RANK=2 must be < NNODES=2" in bad.stderr
    slurm = _script("launch/gpu/multi_node.sh", SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="4")
    assert "srun --nodes=4 --ntasks=4 --ntasks-per-node=1" in slurm.stdout, slurm.stderr
