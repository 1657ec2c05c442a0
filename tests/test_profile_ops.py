"""benchmarks/profile_ops.py: self times from a real jax.profiler trace, and the nesting arithmetic on a known one."""
import gzip
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_ops  # noqa: E402


def _write_trace(directory: Path, events):
    path = directory / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}}]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_self_time_subtracts_nested_ops_and_drops_wrappers(tmp_path):
    x = lambda name, ts, dur, pid=1, tid=7: {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}
    _write_trace(tmp_path, [
        x("ThunkExecutor::Execute", 0, 100),       # runtime wrapper: not an op
        x("$python.py:1 f", 0, 100),                # python frame: not an op
        x("while.4", 10, 50),                       # contains two ops below
        x("ynn_fusion.1", 12, 20), x("dynamic-slice_bitcast_fusion", 35, 10),
        x("while.4", 70, 10),                       # second call of the same op, nothing nested
        x("copy.3", 60, 5, tid=8),                  # another thread
        x("void gemm_kernel<float>(...)", 0, 40, pid=2, tid=1),  # a GPU kernel keeps its name
    ])
    got = profile_ops.op_self_times(str(tmp_path))
    assert got == {"while.4": 50 - 20 - 10 + 10, "ynn_fusion.1": 20, "dynamic-slice_bitcast_fusion": 10,
                   "copy.3": 5, "void gemm_kernel<float>(...)": 40}


def test_real_trace_attributes_time_to_xla_ops(tmp_path):
    f = jax.jit(lambda a: jnp.tanh(a @ a) + 1.0)
    a = jnp.ones((256, 256))
    f(a).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            f(a).block_until_ready()
    ops = profile_ops.op_self_times(str(tmp_path))
    assert ops and all(v >= 0 for v in ops.values())
    assert not any("::" in name or name.startswith("$") for name in ops)
