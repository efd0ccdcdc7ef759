"""The `vqa` recipe: `blip_jax/configs/vqa.py` (its docstring has the command and the result)."""

from blip_jax.configs.vqa import get_config  # noqa: F401
