"""Dependencies between packages point one way: what defines an environment lives under agq_jax/envs and
synthesis (data_synth) builds on it; the RL math knows no environment; every env is driven through one
interface (envs.protocol.StepEnv)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> prefixes it must not import (anywhere in the module, function-level imports included)
FORBIDDEN = {
    "agq_jax/envs": ("data_synth", "agq_jax.driver", "agq_jax.rl", "agq_jax.rollout", "agq_jax.run_config"),
    "agq_jax/rl": ("data_synth", "agq_jax.envs", "agq_jax.driver", "agq_jax.rollout"),
    "agq_jax/models": ("data_synth", "agq_jax.envs", "agq_jax.driver", "agq_jax.rl", "agq_jax.rollout"),
    "agq_jax/rollout": ("data_synth", "agq_jax.driver"),
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_package_dependencies_point_one_way():
    bad = []
    for pkg, prefixes in FORBIDDEN.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for mod in _imports(path):
                if mod.startswith(prefixes):
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_importing_every_env_module_loads_no_synthesis_code():
    mods = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "agq_jax/envs").rglob("*.py"))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'data_synth' or m.startswith('agq_jax.rl')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_every_env_implements_the_step_protocol():
    from agq_jax.envs import make_env
    from agq_jax.envs.protocol import StepEnv
    from agq_jax.envs.reasoning import make_reasoning_env
    from agq_jax.envs.reasoning_problems import generate_seed_set
    from agq_jax.envs.worlds.generator import generate_tasks

    envs = [make_env(generate_tasks(1, seed=1)[0]), make_reasoning_env(generate_seed_set(1, seed=1)[0])]
    for env in envs:
        assert isinstance(env, StepEnv)
        env.reset()
        env.finish("max_agent_turns")
        assert env.done and 0.0 <= env.reward().total <= 1.0 and env.task_id
