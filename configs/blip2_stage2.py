"""The `blip2_stage2` recipe: `blip_jax/configs/blip2_stage2.py` (its docstring has the command and the result)."""

from blip_jax.configs.blip2_stage2 import get_config  # noqa: F401
