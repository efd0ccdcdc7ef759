"""ITC features of any model family (BLIP, BLIP-2 stage 1, CLIP), for retrieval, zero-shot
classification and the predict CLI: one place that knows which method each family calls."""

from __future__ import annotations

import numpy as np

from blip_jax.models.layers import l2_normalize


def image_features(model, images):
  """Normalised ITC image features [B, E] (BLIP-2: [B, queries, E]) of images [B, S, S, 3]."""
  if hasattr(model, 'encode_image'):  # CLIP
    return l2_normalize(model.encode_image(images))
  return model.image_features(model.image_embeds(images))


def text_features(model, ids, mask):
  """Normalised ITC text features [B, E] of token ids [B, L]."""
  if hasattr(model, 'encode_text'):  # CLIP
    return l2_normalize(model.encode_text(ids, mask))
  if hasattr(model, 'text_embeds'):  # BLIP: the text encoder's [CLS]
    return model.text_features(model.text_embeds(ids, mask))
  return model.text_features(ids, mask)  # BLIP-2: the Q-Former on the text alone


def cosine(image_feat, text_feat) -> np.ndarray:
  """Cosine [N_img, N_txt] of normalised features (numpy); BLIP-2's best query per image."""
  sim = np.einsum('...e,te->...t', np.asarray(image_feat), np.asarray(text_feat))
  return sim.max(1) if sim.ndim == 3 else sim
