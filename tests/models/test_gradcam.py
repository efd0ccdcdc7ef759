"""Grad-CAM of BLIP's ITM against a PyTorch statement of LAVIS's `compute_gradcam`, run on HF's
`BlipForImageTextRetrieval` (random weights, fp32): HF's cross-attention returns the
probabilities its context is computed from, and a tensor hook gives their gradient."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from blip_jax.convert import load_torch
from blip_jax.testing.torch_refs import ENC, OVERRIDES, PAD, SEP, assert_close, build_hf, images, nhwc


def lavis_gradcam(hf, x, ids, mask, block):
  """LAVIS `compute_gradcam(model, image, text, tokenized_text, block_num)`, on HF's modules."""
  saved = {}

  def keep(module, inputs, output):
    saved['probs'] = output[1]
    output[1].register_hook(lambda grad: saved.__setitem__('grads', grad))

  attention = hf.text_encoder.encoder.layer[block].crossattention.self
  handle = attention.register_forward_hook(keep)
  try:
    itm = hf(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=True).itm_score
    itm[:, 1].sum().backward()
  finally:
    handle.remove()
  b, heads = x.shape[0], hf.config.text_config.num_attention_heads
  grid = int(round((saved['probs'].shape[-1] - 1) ** 0.5))
  token_mask = mask.view(b, 1, -1, 1, 1)
  token_length = mask.sum(dim=-1) - 2
  with torch.no_grad():
    cams = saved['probs'][:, :, :, 1:].reshape(b, heads, -1, grid, grid) * token_mask
    grads = saved['grads'][:, :, :, 1:].clamp(0).reshape(b, heads, -1, grid, grid) * token_mask
    gradcams = cams * grads
    maps = []
    for i in range(b):
      gradcam = gradcams[i].mean(0)
      n = token_length[i]
      maps.append(torch.cat((gradcam[0:1], gradcam[1:n + 1].sum(dim=0, keepdim=True) / n, gradcam[1:])))
  return torch.stack(maps), itm.detach()


@pytest.fixture(scope='module')
def retrieval():
  hf = build_hf(transformers.BlipForImageTextRetrieval)
  model, _, _ = load_torch(hf.state_dict(), task='retrieval', **OVERRIDES)
  return hf, model


@pytest.mark.parametrize('block', [0, 1])
def test_itm_gradcam_equals_lavis(retrieval, block):
  hf, model = retrieval
  x = images(3, seed=2)
  ids = torch.tensor([[ENC, 5, 6, 7, 8, SEP], [ENC, 9, 10, SEP, PAD, PAD], [ENC, 11, SEP, PAD, PAD, PAD]])
  mask = (ids != PAD).long()
  ref_maps, ref_itm = lavis_gradcam(hf, x, ids, mask, block)
  # The last layer's words do not reach the [ENC] state the ITM head reads: only row 0 is non-zero there.
  assert (ref_maps[:, 0 if block else 1] > 0).any() and ref_maps.shape == (3, ids.shape[1] + 1, 4, 4)
  run = nnx.jit(lambda m, images, ids, mask: m.itm_gradcam(m.image_embeds(images), ids, mask, layer=block))
  maps, itm = run(model, nhwc(x), ids.numpy(), mask.numpy())
  assert_close(itm, ref_itm, 'ITM logits')
  assert_close(maps, ref_maps, 'Grad-CAM maps')
  # The probe is gone afterwards: the model attends as before.
  assert model.text_encoder.encoder.layer[block].crossattention.self.probe is None
  np.testing.assert_allclose(model.itm_logits(model.image_embeds(nhwc(x)), ids.numpy(), mask.numpy()), itm, atol=1e-6)


def test_a_layer_out_of_range_is_named(retrieval):
  _, model = retrieval
  ids = np.array([[ENC, 5, SEP]])
  with pytest.raises(ValueError, match=r'Grad-CAM layer 2: the text encoder has layers 0 \.\.\. 1'):
    model.itm_gradcam(model.image_embeds(nhwc(images(1))), ids, np.ones_like(ids), layer=2)
