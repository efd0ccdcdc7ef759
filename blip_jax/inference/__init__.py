"""The Python inference library: `Predictor` (load any supported checkpoint or Hub id, then
caption / itm / embed / retrieve / vqa / classify), with numpy preprocessing and no TensorFlow."""

from blip_jax.inference.images import ImageError, list_images, to_rgb
from blip_jax.inference.predictor import CaptionSettings, Predictor

__all__ = ['Predictor', 'CaptionSettings', 'ImageError', 'list_images', 'to_rgb']
