"""The starting point of every training config: each knob of agq_jax/run_config at its one default.

A config file (`configs/NAME.py`, `get_config()`) takes this ConfigDict and changes what differs;
`python -m agq_jax.train --config=configs/NAME.py --config.rl.group_size=8` reads it and turns it, once,
into the typed run config (agq_jax.run_config.RunConfig), where an unknown key is an error naming it.
"""
from agq_jax.run_config import defaults


def get_base_config():
    return defaults()
