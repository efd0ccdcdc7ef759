"""The `retrieval` recipe: `blip_jax/configs/retrieval.py` (its docstring has the command and the result)."""

from blip_jax.configs.retrieval import get_config  # noqa: F401
