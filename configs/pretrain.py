"""The `pretrain` recipe: `blip_jax/configs/pretrain.py` (its docstring has the command and the result)."""

from blip_jax.configs.pretrain import get_config  # noqa: F401
