"""The `blip2_stage1` recipe: `blip_jax/configs/blip2_stage1.py` (its docstring has the command and the result)."""

from blip_jax.configs.blip2_stage1 import get_config  # noqa: F401
