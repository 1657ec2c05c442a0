"""Test session setup: 8 forced CPU devices (sharding tests), offline HF, fail when nothing ran."""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionfinish(session, exitstatus):
    """A run in which no test passed (everything skipped or deselected) is a failure."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    passed = len(reporter.stats.get("passed", []))
    if passed == 0 and exitstatus in (0, 5):
        session.exitstatus = 1
        reporter.write_line("ERROR: no test passed (all skipped or none collected); failing the run.")



@pytest.fixture(scope="session")
def demo_path() -> str:
    """The released AgenticQwen demo tasks (agq_jax.envs.sources.released_file), or skip the test saying where
    they were looked for: the data is shared beside the checkout, never in the repository."""
    from agq_jax.envs.sources import DEMO_TASKS, SHARED_ENV, released_dir, released_file

    path = released_file(DEMO_TASKS)
    if path is None:
        pytest.skip(f"released AgenticQwen data not found: {released_dir() / DEMO_TASKS} is missing (put "
                    f"shared/data/agenticqwen/ beside the repository or set ${SHARED_ENV} to the directory "
                    f"holding data/agenticqwen/)")
    return path
