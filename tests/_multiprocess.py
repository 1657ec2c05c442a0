"""Two (or more) CPU processes on localhost joined by jax.distributed: the launcher used by the
multi-process tests (the test module re-runs itself as each worker)."""
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(script: str, out_dir, *, num_processes: int = 2, devices_per_process: int = 1, args=()) -> list:
    """Popen `python script PORT PID OUT_DIR NUM_PROCESSES *ARGS` once per process, CPU only, stdout+stderr piped."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    return [subprocess.Popen([sys.executable, script, str(port), str(i), str(out_dir), str(num_processes), *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(num_processes)]


def wait_workers(procs: list, timeout_s: float) -> list[str]:
    """Wait for every worker; kill all and fail on a timeout; fail with the log tail on a non-zero exit."""
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"multi-process workers timed out after {timeout_s}s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


def init_worker() -> tuple[int, str]:
    """In a worker: parse the launcher's argv and join the job; returns (process id, output dir)."""
    port, pid, out, n = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid,
                               initialization_timeout=300)
    return pid, out
