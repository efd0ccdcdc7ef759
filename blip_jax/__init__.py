"""blip_jax: BLIP, BLIP-2 and CLIP in JAX / Flax NNX.

    import blip_jax
    p = blip_jax.Predictor.from_pretrained('Salesforce/blip-image-captioning-base')
    p.caption(['cat.jpg'])
"""

__version__ = '0.1.0'

from blip_jax.inference import Predictor  # noqa: E402
from blip_jax.loading import load  # noqa: E402

__all__ = ['Predictor', 'load']
