"""The `caption` recipe: `blip_jax/configs/caption.py` (its docstring has the command and the result)."""

from blip_jax.configs.caption import get_config  # noqa: F401
