"""agq-jax: AgenticQwen-style multi-round agentic RL in JAX / Flax NNX."""
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def _reqs(name):
    lines = (HERE / name).read_text().splitlines()
    return [l.split("#")[0].strip() for l in lines if l.split("#")[0].strip()]


setup(
    name="agq-jax",
    version="0.1.0",
    description="AgenticQwen-style agentic RL (GRPO + data flywheels) for Qwen3 in JAX / Flax NNX",
    packages=find_packages(include=["agq_jax", "agq_jax.*", "data_synth", "data_synth.*"]),
    python_requires=">=3.11",
    install_requires=_reqs("requirements.txt"),
    extras_require={"test": _reqs("requirements-test.txt")},
    include_package_data=True,
)
