"""The `pretrain_capfilt` recipe: `blip_jax/configs/pretrain_capfilt.py` (its docstring has the command and the result)."""

from blip_jax.configs.pretrain_capfilt import get_config  # noqa: F401
