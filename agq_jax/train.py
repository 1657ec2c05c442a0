"""The flywheel trainer: `python -m agq_jax.train --config=configs/tiny.py --config.rl.group_size=8`.

The ml_collections config (a configs/*.py file, its `:LAYOUT` suffix and `--config.FIELD=VALUE` overrides)
becomes the typed run config once, here (agq_jax.run_config); an unknown key is an error naming it.
`--config=configs/NAME.py:cpu-smoke` runs a full-size config at toy size on 8 CPU devices (agq_jax.smoke).

Each round: build (or load) the round's dataset with data_synth -> optional SFT on verified expert
trajectories -> GRPO steps -> held-out evaluation -> failures -> flywheel expansion. Re-running the same
command after a kill resumes from the latest checkpoint in <run_dir>/checkpoints.

Multi-host: launched on several hosts, pass --coordinator_address / --num_processes / --process_id (or
set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; on Cloud TPU no flags are needed with
--distributed) and `jax.distributed.initialize` is called first; only process 0 writes logs and exports.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/tiny.py", "training config file (configs/NAME.py)",
                                lock_config=False)
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")
flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS", ""), "host:port of process 0")
flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")), "number of processes")
flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")), "this process's index")
flags.DEFINE_integer("stop_after", -1, "stop (as if killed) after this global step; -1 = run to the end")


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize when several processes are launched (flags, env vars or --distributed)."""
    import jax

    if FLAGS.coordinator_address and FLAGS.num_processes > 1:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def main(argv):
    del argv
    from absl import logging

    from agq_jax.run_config import RunConfig

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        rc = RunConfig.from_configdict(FLAGS.config)
    except (KeyError, ValueError, TypeError) as e:  # a bad key or value: the message names it
        sys.exit(f"error: {e}")
    if rc.smoke.enabled:  # before jax starts
        from agq_jax import smoke

        smoke.force_cpu_devices(rc.smoke.cpu_devices)
    maybe_initialize_distributed()
    if rc.smoke.enabled:
        rc = smoke.prepare(rc)
    from agq_jax.driver import Driver, StopRequested

    driver = Driver(rc, stop_after=None if FLAGS.stop_after < 0 else FLAGS.stop_after)
    try:
        result = driver.run()
    except StopRequested as e:
        print(json.dumps({"stopped_after": int(e.args[0]), "run_dir": driver.run_dir}))
        return
    except MemoryError as e:  # the preflight: the train state cannot fit these devices
        sys.exit(f"error: {e}")
    if driver.is_writer:
        print(json.dumps({"run_dir": driver.run_dir, "export": result["export"], "evals": result["evals"]}, indent=1))


if __name__ == "__main__":
    app.run(main)
