"""The `default` recipe: `blip_jax/configs/default.py` (its docstring has the command and the result)."""

from blip_jax.configs.default import get_config  # noqa: F401
