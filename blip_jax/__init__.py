"""blip_jax: BLIP, BLIP-2 and CLIP in JAX / Flax NNX."""

__version__ = '0.1.0'
