"""Heat-map overlays of Grad-CAM maps (`Predictor.gradcam`, `blip-jax-predict gradcam`)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.6) -> Image.Image:
  """`image` (RGB [H, W, 3] uint8) with `cam` ([g, g] over the model's square input, to which
  the evaluation transform resizes the whole image) stretched over it, bilinearly, in 'jet'
  colours: each pixel moves towards its colour by `alpha` x its map value scaled to [0, 1], so
  where the map is at its minimum the photo shows unchanged."""
  import matplotlib
  rgb = np.asarray(image, np.float32) / 255
  cam = np.asarray(cam, np.float32)
  low, high = float(cam.min()), float(cam.max())
  scaled = (cam - low) / (high - low) if high > low else np.zeros_like(cam)
  up = np.asarray(Image.fromarray(scaled, mode='F').resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR))
  weight = alpha * np.clip(up, 0, 1)[..., None]
  colours = matplotlib.colormaps['jet'](np.clip(up, 0, 1))[..., :3]
  return Image.fromarray(np.round(255 * ((1 - weight) * rgb + weight * colours)).astype(np.uint8))
