"""blip_jax: BLIP, BLIP-2 and CLIP in JAX / Flax NNX."""

__version__ = '0.1.0'

from blip_jax.model_io import load  # noqa: E402

__all__ = ['load']
