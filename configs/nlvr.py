"""The `nlvr` recipe: `blip_jax/configs/nlvr.py` (its docstring has the command and the result)."""

from blip_jax.configs.nlvr import get_config  # noqa: F401
