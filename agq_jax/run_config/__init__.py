"""The typed run config (see schema.py): built once from a configs/*.py ConfigDict, read everywhere else.

    from agq_jax.run_config import RunConfig, load, model_config
"""
from agq_jax.run_config.core import RunConfig, defaults, dump, load, load_configdict, sibling
from agq_jax.run_config.model import checkpoint_config, model_config
from agq_jax.run_config.tracking import leaf_paths

__all__ = ["RunConfig", "defaults", "dump", "load", "load_configdict", "sibling", "model_config",
           "checkpoint_config", "leaf_paths"]
