"""The `clip` recipe: `blip_jax/configs/clip.py` (its docstring has the command and the result)."""

from blip_jax.configs.clip import get_config  # noqa: F401
