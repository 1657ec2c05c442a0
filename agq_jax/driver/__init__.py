"""The flywheel driver behind `python -m agq_jax.train`: round loop, SFT data, evaluation, logging.

    from agq_jax.driver import Driver
    result = Driver(cfg).run()      # cfg: an ml_collections config (configs/base.py schema)
"""
from agq_jax.driver.loop import Driver, StopRequested

__all__ = ["Driver", "StopRequested"]
