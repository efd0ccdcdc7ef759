"""`blip_jax.load`: a model from a converted directory or, converted in memory, from a PyTorch
checkpoint (the one function above `model_io` and `convert`, which do not import each other).

    model, config = blip_jax.load('converted/blip_caption_base')              # a converted directory
    model, config = blip_jax.load('model_base_caption.pth', task='caption')   # converts in memory
"""

from __future__ import annotations

import jax.numpy as jnp

from blip_jax import model_io
from blip_jax.models.variables import unique_weights


def load(source, *, seed: int = 0, dtype: str = 'float32', **convert_kwargs):
  """(model, config) of `source`. `dtype`: the dtype the floating weights are held in.
  `convert_kwargs` go to `blip_jax.convert.load_torch` (family, task, image_size, act, ...) when
  `source` is not a converted directory."""
  if model_io.is_model_dir(source):
    if convert_kwargs:
      raise ValueError(f'{source} is already converted; options {sorted(convert_kwargs)} apply to PyTorch '
                       'checkpoints only')
    return model_io.load(source, seed=seed, dtype=dtype)
  from blip_jax.convert import load_torch
  model, config, _ = load_torch(source, seed=seed, **convert_kwargs)
  if dtype != 'float32':
    for var in unique_weights(model).values():
      if jnp.issubdtype(var.dtype, jnp.floating):
        var.set_value(var.get_value().astype(dtype))
  return model, config
