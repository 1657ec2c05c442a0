"""The full-size configs (0_6b, 8b, 30b_a3b, 235b_a22b) load through ml_collections' config_flags from any
working directory into the typed run config (unknown keys and bad values are errors naming the key), derive
their model one way, have cpu-smoke variants that differ only in sizes, and their models build abstractly
(shapes + shardings, no weights) on simulated meshes of every named layout.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
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
    sys.modules.pop("config_config", None)  # a fresh module per file, as run_config.load_configdict does
    fv(argv)
    return fv.config


ALL_LAYOUTS = [(n, lay) for n in CONFIGS for lay in _module(n).MESH_LAYOUTS]


# ---- loading ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,layout", ALL_LAYOUTS)
def test_loads_through_config_flags_from_another_cwd(name, layout, tmp_path, monkeypatch):
    """`--config=configs/NAME.py:LAYOUT --config.FIELD=VALUE` from any directory gives the typed run config
    of that layout, with the override applied."""
    from agq_jax.run_config import RunConfig

    monkeypatch.chdir(tmp_path)
    argv = ["train", f"--config={_path(name)}:{layout}", "--config.rl.group_size=8", "--config.seed=3"]
    rc = RunConfig.from_configdict(_flag_config(argv))
    assert rc.mesh.layout == layout and rc.rl.group_size == 8 and rc.seed == 3
    lay = _module(name).MESH_LAYOUTS[layout]
    assert {k: getattr(rc.mesh, k) for k in ("data", "fsdp", "tensor", "expert")} == \
        {**dict(data=1, tensor=1, expert=1), **dict(lay.mesh)}
    assert rc.rl.micro_batch_rows == lay.micro_batch_rows and rc.mesh.hardware == lay.hardware


def test_unknown_keys_and_bad_values_name_the_key():
    from agq_jax.run_config import RunConfig, load
    from agq_jax.run_config.core import UnknownKnobError

    c = _flag_config(["t", f"--config={_path('30b_a3b')}"])
    with pytest.raises(UnknownKnobError, match=r"'rl.grup_size'.*did you mean 'rl.group_size'"):
        RunConfig.from_configdict({**c.to_dict(), "rl": {**c.rl.to_dict(), "grup_size": 4}})
    with pytest.raises(UnknownKnobError, match="'mesh_layout'"):  # a removed knob is an error, not ignored
        RunConfig.from_configdict({**c.to_dict(), "mesh_layout": "v5p-64"})
    with pytest.raises(TypeError, match=r"config rl.group_size='8': expected an integer"):
        RunConfig.from_configdict({**c.to_dict(), "rl": {**c.rl.to_dict(), "group_size": "8"}})
    with pytest.raises(ValueError, match=r"rl.tasks_per_step=64 is not a multiple of rl.mini_batch_tasks=7"):
        load(f"{_path('30b_a3b')}", ["--config.rl.mini_batch_tasks=7"])
    with pytest.raises(ValueError, match=r"config model.remat='most'"):
        load(f"{_path('8b')}", ["--config.model.remat=most"])


def test_default_layout_and_unknown_layout_error():
    module = _module("30b_a3b")
    assert _flag_config(["t", f"--config={_path('30b_a3b')}"]).mesh.layout == module.DEFAULT_LAYOUT
    with pytest.raises(ValueError, match=r"unknown mesh layout 'v9-1'.*h100x16"):
        module.get_config("v9-1")


def test_loads_in_a_clean_interpreter_outside_the_repo(tmp_path):
    """No reliance on pytest's sys.path: a fresh python in another directory, as a launch script runs it."""
    code = ("import sys\nfrom agq_jax.run_config import load\n"
            "rc = load(sys.argv[1], ['--config.rl.clip_high=0.3'])\n"
            "print(rc.model.preset, rc.rl.policy_loss, rc.rl.clip_high, 'jax' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, f"{_path('30b_a3b')}:h100x16"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Qwen3-30B-A3B", "gspo", "0.3", "False"]  # no jax import to load a config


def test_a_config_loaded_after_another_equals_it_loaded_alone():
    """ml_collections executes every config file into one module object: configs/8b.py loaded after
    configs/30b_a3b.py (as `make aot` and the tests do) once kept the 30B's `recipe` and trained with GSPO."""
    from agq_jax.run_config import load

    code = ("import json, sys\nfrom agq_jax.run_config import load\n"
            "print(json.dumps(load(sys.argv[1]).to_dict(), default=list))\n")
    spec = f"{_path('8b')}:v5p-16"
    out = subprocess.run([sys.executable, "-c", code, spec], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    alone = json.loads(out.stdout)
    before = load(f"{_path('30b_a3b')}:v5p-32")
    after = json.loads(json.dumps(load(spec).to_dict(), default=list))
    assert before.rl.policy_loss == "gspo" and alone["rl"]["policy_loss"] == "ppo_clip"
    assert after == alone


# ---- one derivation of the model config -------------------------------------------------------------

def test_model_config_checkpoint_wins_and_training_fields_apply(tmp_path):
    """With hf_path set the checkpoint's config.json is the architecture (not the preset), and the training
    fields (remat, attention / MoE kernels) and model.overrides still apply; a checkpoint of another family
    than the preset is an error; without the weights, planning falls back to the preset."""
    from agq_jax.models.config import PRESETS
    from agq_jax.run_config import load, model_config

    arch = PRESETS["Qwen3-30B-A3B"].replace(hidden_size=64, num_hidden_layers=2, num_experts=8,
                                            num_experts_per_tok=2, moe_intermediate_size=32)
    (tmp_path / "config.json").write_text(json.dumps(arch.to_hf_dict()))
    rc = load(f"{_path('30b_a3b')}:h100x16", [f"--config.model.hf_path={tmp_path}", "--config.model.remat=dots",
                                             "--config.model.moe_impl=dense", "--config.model.attention_impl=xla"])
    cfg = model_config(rc.replace(**{"model.overrides": {"rope_theta": 5000.0}}))
    assert (cfg.hidden_size, cfg.num_experts, cfg.num_hidden_layers) == (64, 8, 2)
    assert (cfg.remat, cfg.moe_impl, cfg.attention_impl, cfg.rope_theta) == ("dots", "dense", "xla", 5000.0)
    with pytest.raises(ValueError, match="holds a qwen3_moe checkpoint but model.preset='Qwen3-8B'"):
        model_config(load(str(_path("8b")), [f"--config.model.hf_path={tmp_path}"]))
    missing = load(str(_path("8b")), ["--config.model.hf_path=/nonexistent/Qwen3-8B"])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_config(missing)
    assert model_config(missing, weights_optional=True).hidden_size == PRESETS["Qwen3-8B"].hidden_size


def test_cpu_smoke_differs_from_its_layout_only_in_sizes():
    """Field by field, a cpu-smoke run config equals the real layout's except for the size and harness
    knobs listed in configs/_reference.py SMOKE_FIELDS (so the smoke runs the shipped recipe)."""
    from agq_jax.run_config import RunConfig

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("overrides", "model_sizes"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    for name in CONFIGS:
        module = _module(name)
        for layout in module.MESH_LAYOUTS:
            real = flat(RunConfig.from_configdict(module.get_config(layout)).to_dict())
            smoke = flat(RunConfig.from_configdict(module.get_config(f"cpu-smoke@{layout}")).to_dict())
            assert real.keys() == smoke.keys()
            differ = {k for k in real if real[k] != smoke[k]}
            assert differ <= set(module.ref.SMOKE_FIELDS), (name, layout, sorted(differ - set(module.ref.SMOKE_FIELDS)))
            assert smoke["smoke.enabled"] and smoke["mesh.layout"] == layout
            used = [a for a in ("data", "fsdp", "tensor", "expert") if real[f"mesh.{a}"] != 1]
            assert all(smoke[f"mesh.{a}"] > 1 for a in used)  # every axis the layout splits is exercised
            assert math.prod(smoke[f"mesh.{a}"] for a in ("data", "fsdp", "tensor", "expert")) == 8
        assert module.get_config("cpu-smoke").mesh.layout == module.DEFAULT_LAYOUT


# ---- abstract model on simulated meshes ------------------------------------------------------------

_ABSTRACT_CACHE: dict = {}


@pytest.mark.parametrize("name,layout", ALL_LAYOUTS)
def test_layout_shards_the_full_model(name, layout):
    p = mesh_plan.plan(_path(name), layout, _cache=_ABSTRACT_CACHE)
    sizes, rows, c = p["mesh"], p["rows"], p["run_config"]
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
    assert c.rl.micro_batch_rows % p["batch_shards"] == 0
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
