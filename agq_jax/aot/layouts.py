"""From a run config to the shapes, mesh and loss the AOT compiler uses: the driver's own readings
(`driver.build.trainer_configs`, `run_config.model_config`), so the compiled programs are the run's."""
from __future__ import annotations

import jax

from agq_jax.aot import chips, plan


def topology_of(spec: str) -> str:
    """The TPU topology of a "configs/NAME.py:LAYOUT" spec: its Layout's `topology` ("" for a GPU layout)."""
    import importlib.util
    import pathlib

    path, _, layout = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location(f"agq_jax_aot_{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    layout = layout or module.DEFAULT_LAYOUT
    return getattr(module.MESH_LAYOUTS[layout], "topology", "")


def shapes_of(rc) -> plan.Shapes:
    rl, r = rc.rl, rc.rollout
    mini = rl.mini_batch_tasks * rl.group_size
    return plan.Shapes(seq=r.max_len, mini_rows=mini, micro_rows=rl.micro_batch_rows or mini,
                       rollout_rows=rl.tasks_per_step * rl.group_size, decode_batch=r.decode_batch_size,
                       chunk=r.chunk_size, compute_dtype=rc.model.dtype, param_dtype=rc.model.param_dtype)


def mesh_of(rc, devices):
    from agq_jax.models import sharding as shd

    m = rc.mesh
    return shd.make_mesh(shd.MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor, expert=m.expert), devices=devices)


def group_mesh_of(rc, mesh, topology: str):
    """(the first rollout group's mesh built on a slice of the group's own shape, that slice's name): the
    devices a group's sampler programs run on, with ids libtpu accepts (`chips.sub_topology`)."""
    from agq_jax.models import sharding as shd
    from agq_jax.rollout import placement

    rmesh = placement.rollout_mesh(mesh, rc.rollout.expert_shards)
    first = [d for d in rmesh.devices.flat if d.process_index in set(placement.copy_processes(rmesh)[0])]
    name = chips.sub_topology(topology, first)
    m = rc.mesh
    sub_mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=-1, tensor=m.tensor, expert=m.expert),
                             devices=chips.topology_devices(name))
    return placement.group_mesh(placement.rollout_mesh(sub_mesh, rc.rollout.expert_shards), 0), name


def compile_config(rc, topology: str, programs=("train", "logprobs", "reshard", "prefill", "decode"), log=print,
                   cache_dir: str | None = None) -> dict:
    """Compile every program of `rc` (a RunConfig) for `topology` ("" = this host's own GPUs)."""
    from agq_jax.driver.build import trainer_configs
    from agq_jax.rollout.sampler import SamplingParams
    from agq_jax.run_config import model_config

    if topology:
        devices = chips.topology_devices(topology)
    else:  # a GPU layout, compiled on the GPU node itself for its own devices
        devices = jax.devices()
        if devices[0].platform == "cpu":
            raise ValueError(f"layout {rc.mesh.layout!r} names no TPU topology: a GPU layout compiles only on its "
                             "GPU node (run this command there)")
        topology = f"{len(devices)} x {devices[0].device_kind}"
    mesh = mesh_of(rc, devices)
    gmesh, group_topology = group_mesh_of(rc, mesh, topology) if devices[0].platform == "tpu" else (None, topology)
    optim, loss, _ = trainer_configs(rc, "grpo")
    sampling = SamplingParams(temperature=rc.rl.temperature, top_p=rc.rl.top_p, top_k=rc.rl.top_k)
    log(f"{rc.name}:{rc.mesh.layout} on {topology} ({len(devices)} devices), mesh {dict(mesh.shape)}")
    out = plan.compile_layout(model_config(rc, weights_optional=True), mesh, shapes_of(rc), loss, optim, gmesh=gmesh,
                              expert_shards=rc.rollout.expert_shards, sampling=sampling, programs=tuple(programs),
                              log=log, cache_dir=cache_dir)
    out.update(config=rc.name, layout=rc.mesh.layout, topology=topology, group_topology=group_topology,
               jax=jax.__version__)
    return out
