"""Decoding: greedy captions token for token equal to HF `generate` on a random-weight BLIP."""

import jax
import numpy as np
import pytest
import torch
import transformers

from blip_jax import generate
from blip_jax.convert import load_torch
from torch_refs import DEC, OVERRIDES, PAD, SEP, build_hf, images, nhwc


@pytest.fixture(scope='module')
def captioner():
  hf = build_hf(transformers.BlipForConditionalGeneration)
  with torch.no_grad():
    for module in hf.modules():  # LayerNorm gains near 1, so the tokens depend on the image and prompt
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.add_(1.0)
    hf.text_decoder.cls.predictions.bias[SEP] += 2.2  # some rows end early, others run to max_length
  model, _, _ = load_torch(hf.state_dict(), task='caption', **OVERRIDES)
  return hf, model


@pytest.mark.parametrize('batch,prompt,min_length', [(1, [], 0), (3, [], 5), (4, [5, 6, 7], 0), (4, [5, 6, 7], 12),
                                                     (2, [11], 0)])
def test_greedy_equals_hf_generate(captioner, batch, prompt, min_length):
  hf, model = captioner
  x = images(batch=batch, seed=batch)
  max_length = 14
  # HF takes `[CLS] prompt [SEP]`, sets the first token to [DEC] and drops the last one.
  hf_ids = torch.tensor([[2, *prompt, SEP]] * batch)
  with torch.no_grad():
    ref = hf.generate(pixel_values=x, input_ids=hf_ids, max_length=max_length, min_length=min_length,
                      num_beams=1, do_sample=False).numpy()
  prompt_ids = np.asarray([[DEC, *prompt]] * batch, np.int32)
  run = jax.jit(lambda images, ids: generate.greedy(model.text_decoder, model.image_embeds(images), ids,
                                                    max_length=max_length, min_length=min_length,
                                                    eos_token_id=SEP, pad_token_id=PAD))
  ours = np.asarray(run(nhwc(x), prompt_ids))
  expected = np.full((batch, max_length), PAD)
  expected[:, :ref.shape[1]] = ref
  np.testing.assert_array_equal(ours, expected)
  if (batch, min_length) in ((3, 5), (4, 0)):  # the cases meant to mix early ends and full-length rows
    ended = (ours == SEP).any(1)
    assert ended.any() and not ended.all() and (ours[ended, -1] == PAD).any()
