"""The README's commands build their environments through mk/pip.mk: a download cut off mid-file (it cost one
CI run) must cost a retry of that install, not the run, and a real failure must still stop the build."""
import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _install(tmp_path: Path, fails: int, attempts: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs mk/pip.mk's pip_install with a stand-in interpreter that fails its first `fails` calls."""
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls
n=$(wc -l < {tmp_path}/calls)
[ "$n" -gt {fails} ]
""")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    makefile = tmp_path / "t.mk"
    makefile.write_text(f"include {REPO}/mk/pip.mk\nt:\n\t$(call pip_install,{python},-r requirements.txt)\n")
    done = subprocess.run(["make", "-s", "-f", str(makefile), "t", f"PIP_ATTEMPTS={attempts}", "PIP_RETRY_PAUSE=0"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return done, calls


def test_a_failed_install_is_retried(tmp_path):
    done, calls = _install(tmp_path, fails=2, attempts=3)
    assert done.returncode == 0, done.stderr
    assert calls == ["-m pip install -q --retries 10 -r requirements.txt"] * 3
    assert "attempt 2 of 3" in done.stderr


def test_an_install_that_keeps_failing_stops_the_build(tmp_path):
    done, calls = _install(tmp_path, fails=5, attempts=2)
    assert done.returncode != 0
    assert len(calls) == 2
    assert "pip install -r requirements.txt failed 2 times" in done.stderr


@pytest.mark.parametrize("target", [".venv/.installed", "sglang-venv", "tpu-venv"])
def test_every_download_goes_through_the_retry(target):
    """`make -n -B` prints the recipes without running them: each `pip install` that fetches from an index is
    inside pip_install's loop (only the editable install of this checkout, which downloads nothing, is not)."""
    env = dict(os.environ, SGLANG_PYTHON="python3")
    plan = subprocess.run(["make", "-n", "-B", target], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=60)
    assert plan.returncode == 0, plan.stderr
    installs = [line.strip() for line in plan.stdout.splitlines() if "pip install" in line]
    assert installs
    for line in installs:
        assert line.startswith("for i in") or line.endswith("--no-deps --no-build-isolation -e ."), line
