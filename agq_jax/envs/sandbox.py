"""A Python interpreter tool for reasoning episodes: code runs in a locked-down subprocess.

Limits, each enforced by the OS where possible and by the interpreter as a second line:
- time: wall-clock timeout (the process group is killed) and RLIMIT_CPU;
- memory: RLIMIT_AS (a 10 GB allocation raises MemoryError in the child and is reported);
- output: stdout/stderr go to files capped by RLIMIT_FSIZE and are truncated before returning;
- network: a fresh user+network namespace (`unshare -rn`, no interfaces) when the kernel allows it,
  and always an audit hook in the child that refuses socket creation/connection;
- files: cwd is a fresh temp dir; the audit hook refuses opens outside it (reads of the Python
  installation stay allowed so `import math` works), and refuses subprocess/exec/ctypes.
The code itself is only ever executed inside that child, never in this process.
"""
from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, asdict

from agq_jax.envs.schema import ToolSchema
from agq_jax.envs.tools import ToolBackend, ToolError

# Runs in the child before the user's code: installs the audit hook, then executes stdin.
_RUNNER = r'''
import os, sys
_ROOT = os.path.realpath(sys.argv[1])
_READ = tuple(os.path.realpath(p) for p in sys.argv[2].split(os.pathsep) if p)
_WFLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_NET = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"}
_PROC = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
         "os.kill", "os.killpg", "ctypes.call_function", "ctypes.dlsym", "ctypes.cdata", "pty.spawn",
         "os.startfile"}
_PATHOPS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
            "os.truncate", "os.utime", "os.listdir", "os.scandir", "os.chdir", "shutil.rmtree", "os.chflags"}
def _inside(p, roots):
    p = os.path.realpath(p)
    return any(p == r or p.startswith(r + os.sep) for r in roots)
def _hook(event, args):
    if event == "open":
        path, mode, flags = (list(args) + [None, None])[:3]
        if path is None or isinstance(path, int):
            return
        p = os.fsdecode(path)
        write = bool((mode and any(c in str(mode) for c in "wax+")) or (isinstance(flags, int) and flags & _WFLAGS))
        if _inside(p, (_ROOT,)) or (not write and _inside(p, _READ)):
            return
        raise PermissionError(f"sandbox: access to {p!r} is denied (only the working directory is writable)")
    if event in _NET:
        raise PermissionError("sandbox: network access is denied")
    if event == "ctypes.dlopen":  # `import ctypes` opens the process itself; foreign calls stay denied below
        name = args[0] if args else None
        if name is None or (isinstance(name, (str, bytes)) and os.path.isabs(os.fsdecode(name))
                            and _inside(os.fsdecode(name), _READ)):
            return
        raise PermissionError("sandbox: loading native libraries is denied")
    if event in _PROC:
        raise PermissionError(f"sandbox: {event} is denied")
    if event in _PATHOPS:
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(os.fsdecode(a), (_ROOT,)):
                if event in ("os.listdir", "os.scandir") and _inside(os.fsdecode(a), _READ):
                    continue
                raise PermissionError(f"sandbox: {event} outside the working directory is denied")
_code = sys.stdin.read()
sys.addaudithook(_hook)
sys.argv = ["main.py"]
_g = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(_code, "main.py", "exec"), _g)
'''


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """True when `unshare -rn` can create a user + network namespace here."""
    exe = shutil.which("unshare")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class SandboxLimits:
    time_s: float = 5.0
    memory_mb: int = 1024
    max_output_chars: int = 4000
    max_file_mb: int = 16
    use_namespace: bool = True   # `unshare -rn` when available


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False
    error: str = ""             # one-line summary of what stopped the code, "" when it ran to the end

    def to_dict(self) -> dict:
        return asdict(self)


def _read_roots() -> str:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sysconfig.get_paths()["stdlib"],
             sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], "/dev/null", "/dev/urandom"}
    return os.pathsep.join(sorted(p for p in paths if p))


def _preexec(limits: SandboxLimits):
    def fn():
        os.setsid()  # own process group: a timeout kills everything the code started
        mem = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cpu = int(limits.time_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        fsize = limits.max_file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return fn


def _read_capped(path: str, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap * 4 + 4)
    text = data.decode("utf-8", errors="replace")
    if len(text) > cap or os.path.getsize(path) > len(data):
        return text[:cap] + f"\n...[output truncated at {cap} characters]", True
    return text, False


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` in a fresh sandboxed interpreter and report what happened (never raises on user code)."""
    work = tempfile.mkdtemp(prefix="agq-sandbox-")
    io_dir = tempfile.mkdtemp(prefix="agq-sandbox-io-")
    try:
        cmd = [sys.executable, "-I", "-c", _RUNNER, work, _read_roots()]
        if limits.use_namespace and network_namespace_available():
            cmd = [shutil.which("unshare"), "-rn", "--"] + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
        out_p, err_p = os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
        timed_out = False
        with open(out_p, "wb") as out, open(err_p, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=env,
                                    preexec_fn=_preexec(limits), close_fds=True)
            try:
                proc.communicate(code.encode("utf-8"), timeout=limits.time_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        stdout, t1 = _read_capped(out_p, limits.max_output_chars)
        stderr, t2 = _read_capped(err_p, limits.max_output_chars)
        rc = proc.returncode
        # RLIMIT_CPU sends SIGXCPU: also a time-limit stop.
        timed_out = timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL) and not stderr.strip()
        mem = "MemoryError" in stderr or (rc is not None and rc in (-signal.SIGSEGV, -signal.SIGABRT)
                                          and "Cannot allocate memory" in stderr)
        if timed_out:
            error = f"time limit exceeded ({limits.time_s:g}s); the process was killed"
        elif mem:
            error = f"memory limit exceeded ({limits.memory_mb} MB)"
        elif rc == -signal.SIGXFSZ:
            error = f"output/file size limit exceeded ({limits.max_file_mb} MB)"
        elif rc:
            last = [l for l in stderr.strip().splitlines() if l.strip()]
            error = last[-1] if last else f"exit code {rc}"
        else:
            error = ""
        return SandboxResult(stdout=stdout, stderr=stderr, exit_code=rc, timed_out=timed_out, memory_exceeded=mem,
                             output_truncated=t1 or t2, error=error)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(io_dir, ignore_errors=True)


PYTHON_TOOL = ToolSchema(
    name="python",
    description=("Run a Python 3 program and get its printed output. Each call is a fresh interpreter with no "
                 "network and no files outside its working directory; print() what you need to see."),
    parameters={"type": "object", "properties": {"code": {"type": "string", "description": "the program"}},
                "required": ["code"]},
    outputs={"type": "object", "properties": {"stdout": {"type": "string"}, "stderr": {"type": "string"},
                                               "exit_code": {"type": ["integer", "null"]},
                                               "timed_out": {"type": "boolean"}, "error": {"type": "string"}}},
    kind="read",
)


class PythonSandboxBackend(ToolBackend):
    """The `python` tool behind the mock worlds' ToolBackend interface."""

    def __init__(self, limits: SandboxLimits = SandboxLimits()):
        super().__init__([PYTHON_TOOL])
        self.limits = limits
        self.history: list[dict] = []

    def call(self, name: str, arguments: dict) -> dict:
        self.n_calls += 1
        if name != "python":
            raise ToolError(f"unknown tool {name!r}; available: ['python']")
        if not isinstance(arguments, dict) or not isinstance(arguments.get("code"), str):
            raise ToolError("python: argument 'code' (a string) is required")
        result = run_python(arguments["code"], self.limits).to_dict()
        self.history.append({"code": arguments["code"], **result})
        return result

    def reset(self) -> None:
        super().reset()
        self.history = []
