"""The AOT compiler tool (`python -m agq_jax.aot`): its loop-aware HLO accounting, and its figures for a small
model of each family compiled for a real TPU topology by libtpu in .venv-tpu: the dense model on one v5e 2x2
host, the MoE model on a two-host v5p 2x2x2 slice whose rollout copy spans both hosts (rollout groups); the
megablox kernels' FLOPs / bytes scaled to a device's expert shard; the search for the largest decode batch
that fits (`--fit_decode_batch`).

The TPU check runs in a subprocess under .venv-tpu (`make tpu-venv`: .venv plus libtpu); it skips, saying so,
only when that interpreter is missing and libtpu cannot be installed from the package index.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_PY = REPO / ".venv-tpu" / "bin" / "python"


def test_hlo_counts_every_loop_iteration():
    """cost_analysis() counts a scan body once; hlo.analyze multiplies it by the trip count (nested too)."""
    import jax
    import jax.numpy as jnp

    from agq_jax.aot import hlo

    m, k, layers, outer = 64, 128, 6, 3

    def f(x, ws):
        def inner(h, w):
            return jnp.tanh(h @ w), None

        def outer_body(h, _):
            return jax.lax.scan(inner, h, ws)[0], None

        return jax.lax.scan(outer_body, x, None, length=outer)[0]

    x = jax.ShapeDtypeStruct((m, k), jnp.float32)
    ws = jax.ShapeDtypeStruct((layers, k, k), jnp.float32)
    compiled = jax.jit(f).lower(x, ws).compile()
    cost = hlo.analyze(compiled.as_text())
    assert cost.unknown_loops == 0
    assert cost.flops == 2 * m * k * k * layers * outer
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert xla["flops"] < cost.flops / 4  # what the loop-aware count corrects
    # bytes: at least every layer's weight read once per outer step
    assert cost.bytes >= layers * outer * k * k * 4
    # the per-kernel attribution adds up to the totals; the matmul is the inner loop's, run layers x outer times
    kernels = hlo.top_kernels(compiled.as_text(), 10_000, by="flops")
    assert sum(r["bytes"] for r in kernels) == pytest.approx(cost.bytes)
    assert sum(r["flops"] for r in kernels) == cost.flops == kernels[0]["flops"]
    assert kernels[0]["times"] == layers * outer


def test_an_async_slice_costs_its_slice():
    """XLA:TPU splits a windowed einsum's operand with async slices: `slice-start` returns (operand, slice,
    context) and `slice-done` the slice. Each costs the slice read and written once, not the whole operand
    and the tuple (which doubled the HBM bytes of the sharded MoE train steps)."""
    from agq_jax.aot import hlo

    text = """HloModule m, entry_computation_layout={(s8[4096]{0})->s8[256]{0}}

ENTRY %main (p: s8[4096]) -> s8[256] {
  %p = s8[4096]{0} parameter(0)
  %slice-start.1 = ((s8[4096]{0}), s8[256]{0}, s32[]{:S(2)}) slice-start(%p), slice={[0:256]}
  ROOT %slice-done.1 = s8[256]{0} slice-done(%slice-start.1)
}
"""
    assert hlo.analyze(text).bytes == 2 * 256


def _tpu_python() -> pathlib.Path:
    if TPU_PY.is_file():
        return TPU_PY
    # -o: never remake .venv from here (in a worktree whose .venv is a link, its stamp looks older than the
    # requirements and make would reinstall the shared environment under the other test workers)
    make = subprocess.run(["make", "-o", ".venv/.installed", "tpu-venv"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    if make.returncode != 0 or not TPU_PY.is_file():
        pytest.skip(f"libtpu cannot be installed here (`make tpu-venv` failed): {make.stderr[-500:]}")
    return TPU_PY


SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
from agq_jax.aot.__main__ import format_result, run
from agq_jax.aot import chips, layouts, programs as pr
from agq_jax.driver.build import trainer_configs
from agq_jax.models import sharding as shd
from agq_jax.models.qwen3 import Qwen3ForCausalLM
from agq_jax.rl import step
from agq_jax.rl.optim import make_optimizer
from agq_jax.run_config import RunConfig, load_configdict, model_config

family = sys.argv[1]
spec = "configs/30b_a3b.py:v5p-64" if family == "moe" else "configs/8b.py:v5p-32"
topology = "v5p:2x2x2" if family == "moe" else "v5e:2x2"
c = load_configdict(spec)
c.model.preset = ""
c.model.hf_path = ""
small = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
if family == "moe":
    small.update(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                 norm_topk_prob=True)
c.model.overrides = small
c.mesh.update(fsdp=-1, tensor=2)
c.rl.update(tasks_per_step=4, group_size=4, mini_batch_tasks=2, micro_batch_rows=4)
c.rollout.update(max_len=512, max_response_tokens=256, chunk_size=128, decode_batch_size=8,
                 expert_shards=4 if family == "moe" else 0)  # moe: tensor 2 x expert 4 = both hosts' 8 chips
rc = RunConfig.from_configdict(c)
result = run(spec, rc=rc, topology=topology, cache_dir=sys.argv[2])
print(format_result(result), file=sys.stderr)
again = run(spec, rc=rc, topology=topology, cache_dir=sys.argv[2], log=lambda m: print(m, file=sys.stderr))
assert again == json.loads(json.dumps(result))  # every program's figures read back from the cache

# The same update compiled independently: the Trainer's state layout built by hand from the model.
cfg = model_config(rc, weights_optional=True)
optim, loss, _ = trainer_configs(rc, "grpo")
mesh = layouts.mesh_of(rc, chips.topology_devices(topology))
model = nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32))
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
p_sh = shd.state_shardings(params, mesh)
state = step.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, model_state=rest,
                        opt_state=jax.eval_shape(make_optimizer(optim).init, params),
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
state = pr.with_shardings(state, step.train_state_shardings(optim, params, p_sh, rest, mesh))
rows, seq = 8, 512  # the mini-batch: tasks 2 x group 4
rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
mini = {k: jax.ShapeDtypeStruct((rows,) if k == "advantages" else (rows, seq), jnp.dtype(dt), sharding=rep)
        for k, dt in pr.GRPO_BATCH.items()}
spec_ = step._Spec(graphdef, loss, optim, mesh, ("data", "fsdp"))
with jax.set_mesh(mesh):
    mem = step._update_donating.lower(spec_, state, mini, 2, "grpo").compile().memory_analysis()
n_params = sum(x.size for x in jax.tree.leaves(params))
print(json.dumps({"result": result, "independent": {"arguments": mem.argument_size_in_bytes,
      "temporaries": mem.temp_size_in_bytes, "outputs": mem.output_size_in_bytes}, "params": int(n_params)}))
'''


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_tpu_figures_match_the_compiled_programs(family, tmp_path):
    py = _tpu_python()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run([str(py), "-c", SCRIPT, family, str(tmp_path / "aot")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    r, ind = data["result"], data["independent"]
    train = r["programs"]["train"]
    # the tool reports what XLA's memory_analysis says for the update it compiles
    assert (train["arguments"], train["temporaries"], train["outputs"]) == (
        ind["arguments"], ind["temporaries"], ind["outputs"])
    # arguments = fp32 params + 2 AdamW moments (sharded over 4 chips, small replicated leftovers) + the batch
    assert 3 * 4 * data["params"] / 4 <= train["arguments"] <= 3 * 4 * data["params"] / 2 + 2**20
    assert train["aliased"] > 0.9 * (train["arguments"] - 8 * 512 * 16)  # the state is donated
    assert r["fits"] and all(p["fits"] for p in r["programs"].values())
    for name in ("train", "logprobs", "reshard", "prefill", "decode"):
        p = r["programs"][name]
        assert p["peak"] == p["arguments"] + p["temporaries"] + p["outputs"] - p["aliased"]
    # loop-aware FLOPs: the update does at least the model's FLOPs (6 x active params x tokens + causal attention)
    assert train["flops_ratio"] >= 1.0 and train["flops"] >= train["model_flops"] > train["param_flops"]
    assert train["flops"] > 2 * train["xla_flops"]  # 2 layers x 2 micro-batches counted, not once
    # the decode program holds the bf16 rollout copy, split over the group's tensor x expert chips
    assert r["programs"]["decode"]["arguments"] < train["arguments"]
    if family == "moe":  # one copy over both hosts: experts and rows split over 4 expert shards, tensor 2
        assert r["group_hosts"] == 2 and r["group_mesh"] == dict(data=1, fsdp=1, tensor=2, expert=4)
        assert r["programs"]["decode"]["collectives"].get("all-gather", 0) > 0  # the group's tokens gathered
    else:  # one v5e host: its 2 copies (tensor 2) decode its rows data-parallel
        assert r["group_hosts"] == 1 and r["group_mesh"] == dict(data=2, fsdp=1, tensor=2, expert=1)
    # splash attention's FLOPs are counted from its kernels' shapes (no Pallas cost estimate)
    assert train["analytic_flops"] > 0 and not train["kernels_without_cost"]


COST_SCRIPT = r'''
import json
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from agq_jax.aot import chips, hlo
from agq_jax.models import attention, sharding

mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2, expert=1), chips.topology_devices("v5e:2x2"))
S = lambda shape, *spec: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P(*spec)))
b, t, h, n, kv, d = 2, 2048, 512, 8, 2, 128

def proj(x, wq, wo):  # the sharded q / o projections XLA:TPU spells as padded windowed convolutions
    def loss(x, wq, wo):
        q = jnp.einsum("bth,hnd->btnd", x, wq)
        return jnp.sum(jnp.einsum("btnd,ndh->bth", jax.nn.silu(q), wo).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(x, wq, wo)

def splash(q, k, v):
    valid = jnp.ones((b, t), bool)
    loss = lambda q, k, v: jnp.sum(attention.splash_causal_attention(q, k, v, valid, d ** -0.5).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

out = {}
with jax.set_mesh(mesh):
    c = jax.jit(proj).lower(S((b, t, h), "fsdp"), S((h, n, d), "fsdp", "tensor"), S((n, d, h), "tensor", None, "fsdp")).compile()
    walk, xla = hlo.analyze(c.as_text()), c.cost_analysis()
    out["proj"] = dict(walk_flops=walk.flops, xla_flops=xla["flops"], analytic=3 * 2 * 2 * b * t * h * n * d / 4,
                       walk_bytes=walk.bytes, xla_bytes=xla["bytes accessed"], windowed="pad=" in c.as_text())
    c = jax.jit(splash).lower(S((b, t, n, d), "fsdp", None, "tensor"), S((b, t, kv, d), "fsdp", None, "tensor"),
                              S((b, t, kv, d), "fsdp", None, "tensor")).compile()
    walk = hlo.analyze(c.as_text())
    out["splash"] = dict(walk_flops=walk.flops, kernels_without_cost=walk.custom_calls,
                         analytic=9 * 2 * b * n * t * (t / 2) * d / 4)
print(json.dumps(out))
'''


def test_hlo_costs_match_xla_and_the_kernels_on_tpu_programs():
    """hlo.analyze on loop-free programs compiled for v5e 2x2: the sharded projections (convolutions whose
    windows hang over padding) give XLA's own cost_analysis FLOPs and the analytic count, bytes within XLA's
    ballpark; splash attention's kernels (no cost estimate) give the causal attention FLOPs (fwd 2, dq 3,
    dkv 4 matmuls per visited pair)."""
    py = _tpu_python()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run([str(py), "-c", COST_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    p, sp = res["proj"], res["splash"]
    assert p["windowed"]
    assert abs(p["walk_flops"] / p["xla_flops"] - 1) < 0.01 and abs(p["walk_flops"] / p["analytic"] - 1) < 0.01, p
    assert 0.6 < p["walk_bytes"] / p["xla_bytes"] < 1.4, p
    assert not sp["kernels_without_cost"] and abs(sp["walk_flops"] / sp["analytic"] - 1) < 0.01, sp


MESH_SCRIPT = r'''
import json
from agq_jax.aot import chips, layouts
from agq_jax.aot.sweep import tpu_layouts
from agq_jax.rollout import placement
from agq_jax.run_config import load
out = {}
for path in ("configs/0_6b.py", "configs/8b.py", "configs/30b_a3b.py", "configs/235b_a22b.py"):
    for layout in tpu_layouts(path):
        spec = f"{path}:{layout}"
        rc = load(spec)
        topology = layouts.topology_of(spec)
        devices = chips.topology_devices(topology)
        mesh = layouts.mesh_of(rc, devices)
        rmesh = placement.rollout_mesh(mesh, rc.rollout.expert_shards)
        owners = placement.copy_processes(rmesh)
        groups = {tuple(sorted({d.process_index for d in placement.group_mesh(rmesh, p).devices.flat}))
                  for p in range(len({d.process_index for d in devices}))}
        gmesh, sub = layouts.group_mesh_of(rc, mesh, topology)
        out[spec] = dict(devices=len(devices), mesh=dict(mesh.shape), size=int(mesh.devices.size),
                         unique=len({d.id for d in mesh.devices.flat}), hosts=len({d.process_index for d in devices}),
                         copy_hosts=max(len(o) for o in owners), groups=sorted(groups), sub=sub,
                         sub_devices=int(gmesh.devices.size), group_mesh=dict(gmesh.shape))
print(json.dumps(out))
'''


def test_every_tpu_layout_builds_its_meshes_on_the_real_topology():
    """sharding.make_mesh places every shipped TPU layout on its slice's devices (v6e 8x8 included, where
    jax.make_mesh cannot); its rollout copies split the hosts into disjoint rollout groups (one per host, or
    the hosts one copy spans: 235B), and each group's mesh builds on a slice of its own shape."""
    py = _tpu_python()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run([str(py), "-c", MESH_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "configs/30b_a3b.py:v6e-64" in res and res["configs/30b_a3b.py:v6e-64"]["mesh"]["fsdp"] == 16
    v6e = res["configs/30b_a3b.py:v6e-64"]  # expert_shards=2: a copy on two 4-chip hosts, a slice of their shape
    assert v6e["sub"] == "v6e:4x2" and v6e["copy_hosts"] == 2 and v6e["sub_devices"] == 8
    big = res["configs/235b_a22b.py:v5p-256"]
    assert big["copy_hosts"] > 1 and big["group_mesh"]["expert"] == big["copy_hosts"] * 4 // big["mesh"]["tensor"]
    for name, r in res.items():
        assert r["size"] == r["unique"] == r["devices"], name
        groups = [p for g in r["groups"] for p in g]
        assert sorted(groups) == list(range(r["hosts"])), (name, r["groups"])  # every host in exactly one group
        assert all(len(g) == r["copy_hosts"] for g in r["groups"]), (name, r["groups"])
        assert r["sub_devices"] == r["devices"] * r["copy_hosts"] // r["hosts"], name


def _tpu_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=str(REPO))
    return env


MEGABLOX_SCRIPT = r'''
import pathlib, sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
from agq_jax.aot import chips

G, M, K, N = [int(a) for a in sys.argv[2:6]]
mesh = jax.make_mesh((4,), ("expert",), devices=chips.topology_devices("v5e:2x2"))

def program(sharded):
    def local(x, w, sizes):  # a device's experts: w[E_local, K, N] from group offset device * E_local
        off = (jax.lax.axis_index("expert") * w.shape[0]).astype(jnp.int32) if sharded else None
        y = megablox.gmm(x, w, sizes, x.dtype, (128, 128, 128), off, None, False, False)
        return jax.lax.psum(y, "expert") if sharded else y
    def loss(x, w, sizes):  # forward gmm; backward: gmm on w^T (dx) and tgmm (dw)
        y = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("expert") if sharded else P(), P()), out_specs=P(),
                          check_vma=False)(x, w, sizes)
        return jnp.sum(y.astype(jnp.float32) ** 2)
    S = lambda shape, dt, *spec: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P(*spec)))
    args = (S((M, K), jnp.bfloat16), S((G, K, N), jnp.bfloat16, "expert" if sharded else None), S((G,), jnp.int32))
    with jax.set_mesh(mesh):
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()

out = pathlib.Path(sys.argv[1])
out.joinpath("sharded.hlo").write_text(program(True))
out.joinpath("replicated.hlo").write_text(program(False))
'''


def test_megablox_kernels_cost_the_devices_expert_share(tmp_path, monkeypatch):
    """A megablox gmm / tgmm kernel on an expert shard (group_offset: 2 of the 8 experts on each of 4 v5e chips)
    declares the cost of every row of the sorted buffer; hlo.analyze counts the 2/8 of it the device's tiles
    take, and its bytes no less than its own expert weights (read by gmm, written by tgmm). The same program
    with every expert on every chip is counted in full."""
    import re

    from agq_jax.aot import hlo

    py = _tpu_python()
    groups, m, k, n = 8, 128, 512, 256
    local = groups // 4
    out = subprocess.run([str(py), "-c", MEGABLOX_SCRIPT, str(tmp_path), str(groups), str(m), str(k), str(n)],
                         cwd=REPO, env=_tpu_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    sharded, replicated = (tmp_path.joinpath(f"{p}.hlo").read_text() for p in ("sharded", "replicated"))

    matmul = 2 * m * k * n                 # every kernel: fwd [m,k]x[k,n], dx [m,n]x[n,k], dw [k,m]x[m,n]
    weight_bytes = local * k * n * 2       # the device's bf16 experts (gmm's rhs, tgmm's result)
    comps, types, _ = hlo.parse(sharded)
    kernels = [(ins, types[c]) for c, instrs in comps.items() for ins in instrs
               if ins.opcode == "custom-call" and re.match(r"t?gmm", ins.name)]
    assert sorted(re.match(r"t?gmm", i.name).group() for i, _ in kernels) == ["gmm", "gmm", "tgmm"]
    declared_total, expected_total = 0.0, 0.0
    floors = []
    for ins, table in kernels:
        est = re.search(r'"cost_estimate":\{([^}]*)\}', ins.attrs)
        assert est, ins.attrs[-500:]
        declared = {key: float(v) for key, v in re.findall(r'"(flops|bytes_accessed)":"?(\d+)', est.group(1))}
        assert declared["flops"] == matmul  # what megablox declares: every one of the m rows
        expected_bytes = max(declared["bytes_accessed"] * local / groups, weight_bytes)
        floors.append(expected_bytes == weight_bytes)
        assert hlo._custom_call_cost(ins, table) == (matmul * local / groups, expected_bytes), ins.name
        declared_total += declared["bytes_accessed"]
        expected_total += expected_bytes
    assert sorted(floors) == [False, False, True]  # sized so that tgmm's dW write is the floor, gmm's share is not

    walk = hlo.analyze(sharded)
    assert walk.flops == 3 * matmul * local / groups  # no other matmul in the program
    assert hlo.analyze(replicated).flops == 3 * matmul  # all experts local: nothing to scale
    monkeypatch.setattr(hlo, "_megablox_share", lambda ins, table: None)
    unscaled = hlo.analyze(sharded)
    assert unscaled.flops == 3 * matmul
    assert unscaled.bytes - walk.bytes == pytest.approx(declared_total - expected_total)
    assert declared_total > expected_total


FIT_SCRIPT = r'''
import json, sys
from agq_jax.aot.__main__ import fit_decode_batch
# fit_decode_batch reads a spec, so the model is shrunk by --config overrides; the slice is Qwen3-0.6B's v5p-8
# layout's (v5p:2x2x1, one host). The model is cheap to compile but heavy to hold:
# 128 scanned layers of a 128-wide model with a 64k FFN (3.2B params, 36 GiB of train state per chip on a
# replicated data=4 mesh) and 1 KV head of 128 (64 KiB per token, 0.21 GiB per 3456-token row).
model = dict(vocab_size=2048, hidden_size=128, intermediate_size=65536, num_hidden_layers=128, num_attention_heads=2,
             num_key_value_heads=1, head_dim=128, tie_word_embeddings=True)
over = ["--config.model.hf_path=", f"--config.model.overrides={model!r}", "--config.mesh.data=4",
        "--config.mesh.fsdp=1", "--config.rl.tasks_per_step=128", "--config.rollout.max_len=3200",
        "--config.rollout.max_response_tokens=3000", "--config.rollout.chunk_size=256"]
spec, cache = "configs/0_6b.py:v5p-8", sys.argv[1]
log = lambda m: print(m, file=sys.stderr, flush=True)
up = fit_decode_batch(spec, [*over, "--config.rollout.decode_batch_size=256"], cache, log=log)
down = fit_decode_batch(spec, [*over, "--config.rollout.decode_batch_size=0"], cache, log=log)
print(json.dumps({"up": up, "down": down}))
'''


def test_fit_decode_batch_returns_the_largest_batch_that_fits(tmp_path):
    """fit_decode_batch on a cheap-to-compile model whose KV cache (with its 36 GiB train state resident)
    crosses v5p's HBM between 512 and 1024 rows per host: doubling from 256 and halving from all of a host's
    2048 rows both return 512; every batch tried fits exactly when its compiled prefill and decode peaks plus
    the resident train state are under the headroom; the next larger batch compiles but does not fit."""
    from agq_jax.aot.plan import HEADROOM

    py = _tpu_python()
    out = subprocess.run([str(py), "-c", FIT_SCRIPT, str(tmp_path / "aot")], cwd=REPO, env=_tpu_env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    (best_up, up), (best_down, down) = res["up"], res["down"]
    batches = lambda tried: [r["decode_batch"] for r in tried]
    assert batches(up) == [256, 512, 1024] and batches(down) == [2048, 1024, 512], (batches(up), batches(down))
    assert best_up == best_down == 512
    host_rows, hbm = up[0]["host_rows"], up[0]["hbm_bytes"]
    assert host_rows == 2048 and down[0]["decode_batch"] == host_rows  # decode_batch_size=0: all the host's rows

    by_batch = {}
    for r in up + down:
        for name in ("prefill", "decode"):
            p = r["programs"][name]
            if "error" in p:  # the compiler's own refusal: more than the chip's HBM
                assert "RESOURCE_EXHAUSTED" in p["error"] and not p["fits"]
                continue
            assert p["resident_bytes"] == r["train_state_bytes"] > 36 * 2**30
            assert p["total_bytes"] == p["peak"] + p["resident_bytes"]
            assert p["fits"] == (p["total_bytes"] <= HEADROOM * hbm), (r["decode_batch"], name, p)
        assert r["fits"] == all(p["fits"] for p in r["programs"].values())
        by_batch[r["decode_batch"]] = r
    for b, r in by_batch.items():  # every batch up to the answer fits, every larger one does not
        assert r["fits"] == (b <= 512), b
    best, nxt = by_batch[512], by_batch[1024]
    assert best["decode_rounds"] == host_rows // 512
    # the next larger batch compiles; what does not fit is its peak with the train state resident
    for name in ("prefill", "decode"):
        assert "error" not in nxt["programs"][name]
        assert nxt["programs"][name]["peak"] < HEADROOM * hbm < nxt["programs"][name]["total_bytes"]
    # the memory that grows is the decode's KV cache: 128 more rows per chip x 128 layers x (3200 + 256)
    # positions x K and V of one 128-wide bf16 head
    grown = nxt["programs"]["decode"]["arguments"] - best["programs"]["decode"]["arguments"]
    assert grown == pytest.approx(128 * 128 * 3456 * 2 * 128 * 2, rel=0.01)


KEY_SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp
from agq_jax.aot import chips, programs
from agq_jax.models import moe, sharding

mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2, expert=1), chips.topology_devices("v5e:2x2"))
tokens, e, h, f, k = int(sys.argv[1]), 8, 256, 128, 2
S = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)

def experts(x, top_i, top_w, wg, wu, wd):  # megablox gmm / tgmm kernels, tiled by agq_jax/models/moe.py
    loss = lambda *a: jnp.sum(moe.experts_megablox(*a, batch_rows=2).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 3, 4, 5))(x, top_i, top_w, wg, wu, wd)

with jax.set_mesh(mesh):
    lowered = jax.jit(experts).lower(S((tokens, h)), S((tokens, k), jnp.int32), S((tokens, k)), S((e, h, f)),
                                     S((e, h, f)), S((e, f, h)))
text = lowered.as_text()
print(json.dumps({"key": programs.program_key(lowered, mesh.devices.flat), "text": text,
                  "kernels": len(programs._KERNEL_BODY.findall(text))}))
'''


def test_cache_key_ignores_where_the_source_lives(tmp_path):
    """The figures' cache key of a program with Pallas kernels (whose serialized bodies carry source paths and
    line numbers) is the same from a checkout in another directory with the kernel's caller moved down a line,
    and differs for a different program (another sequence length)."""
    import shutil

    py = _tpu_python()
    moved = tmp_path / "elsewhere"
    shutil.copytree(REPO / "agq_jax", moved / "agq_jax", ignore=shutil.ignore_patterns("__pycache__"))
    src = moved / "agq_jax" / "models" / "moe.py"
    src.write_text("# moved down a line\n" + src.read_text())

    def key(root, t):
        env = dict(_tpu_env(), PYTHONPATH=str(root))
        out = subprocess.run([str(py), "-c", KEY_SCRIPT, str(t)], cwd=root, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    here, there, other = key(REPO, 1024), key(moved, 1024), key(REPO, 2048)
    assert here["kernels"] >= 2 and here["text"] != there["text"]  # the raw modules differ in their kernels' bytes
    assert here["key"] == there["key"]
    assert other["key"] != here["key"]
