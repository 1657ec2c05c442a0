"""Python sandbox tool: limits are enforced and reported, network and outside files are denied."""
import os

import pytest

from agq_jax.envs.sandbox import PythonSandboxBackend, SandboxLimits, network_namespace_available
from agq_jax.envs.tools import ToolError

LIM = SandboxLimits(time_s=2.0, memory_mb=512, max_output_chars=2000)


@pytest.fixture(scope="module")
def box():
    return PythonSandboxBackend(LIM)


def test_runs_code_and_returns_output(box):
    r = box.call("python", {"code": "import math\nprint(math.comb(10, 3))"})
    assert r["stdout"] == "120\n" and r["exit_code"] == 0 and r["error"] == ""
    assert box.tool_schemas()[0].name == "python"


def test_infinite_loop_is_stopped_and_reported(box):
    r = box.call("python", {"code": "while True:\n    pass"})
    assert r["timed_out"] and r["exit_code"] != 0 and "time limit" in r["error"]


def test_ten_gigabyte_allocation_is_stopped_and_reported(box):
    r = box.call("python", {"code": "x = bytearray(10 * 1024**3)\nprint('allocated')"})
    assert r["memory_exceeded"] and "allocated" not in r["stdout"] and "memory limit" in r["error"]


def test_network_is_denied(box):
    code = ("import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 9))\nprint('connected')")
    r = box.call("python", {"code": code})
    assert "connected" not in r["stdout"] and r["exit_code"] != 0 and "network" in r["error"]


@pytest.mark.skipif(not network_namespace_available(), reason="no user+net namespaces on this kernel")
def test_network_namespace_cuts_loopback_too():
    """Second line of defence under the audit hook: in `unshare -rn` even a server on 127.0.0.1 is unreachable."""
    import shutil
    import socket
    import subprocess
    import sys
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    code = (f"import socket; s = socket.socket(); s.settimeout(2); s.connect(('127.0.0.1', {port})); print('ok')")
    try:
        plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        isolated = subprocess.run([shutil.which("unshare"), "-rn", "--", sys.executable, "-c", code],
                                  capture_output=True, text=True, timeout=30)
    finally:
        srv.close()
    assert plain.stdout.strip() == "ok"
    assert isolated.returncode != 0 and "ok" not in isolated.stdout


def test_outside_files_are_denied_inside_is_fine(box, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    r = box.call("python", {"code": f"print(open({str(secret)!r}).read())"})
    assert "top secret" not in r["stdout"] and "denied" in r["error"]
    target = tmp_path / "pwned.txt"
    r = box.call("python", {"code": f"open({str(target)!r}, 'w').write('x')"})
    assert not target.exists() and "denied" in r["error"]
    r = box.call("python", {"code": "import os\nos.system('touch /tmp/agq_sandbox_escape')"})
    assert not os.path.exists("/tmp/agq_sandbox_escape") and "denied" in r["error"]
    r = box.call("python", {"code": "open('notes.txt', 'w').write('hi')\nprint(open('notes.txt').read())"})
    assert r["stdout"] == "hi\n" and r["exit_code"] == 0


def test_output_is_truncated_and_bad_calls_are_tool_errors(box):
    r = box.call("python", {"code": "print('x' * 100000)"})
    assert r["output_truncated"] and len(r["stdout"]) < 2200
    with pytest.raises(ToolError, match="code"):
        box.call("python", {"program": "print(1)"})
    with pytest.raises(ToolError, match="unknown tool"):
        box.call("shell", {"code": "ls"})
