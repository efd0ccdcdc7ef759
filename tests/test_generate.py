"""Decoding: greedy captions token for token equal to HF `generate` on a random-weight BLIP."""

import jax
import numpy as np
import pytest
import torch
import transformers

from blip_jax import generate
from blip_jax.convert import load_torch
from torch_refs import DEC, OVERRIDES, PAD, SEP, build_hf, images, nhwc





def _captioner(eos_bias):
  hf = build_hf(transformers.BlipForConditionalGeneration)
  with torch.no_grad():
    for module in hf.modules():  # LayerNorm gains near 1, so the tokens depend on the image and prompt
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.add_(1.0)
    hf.text_decoder.cls.predictions.bias[SEP] += eos_bias  # some sequences end early, others run to max_length
  model, _, _ = load_torch(hf.state_dict(), task='caption', **OVERRIDES)
  return hf, model


@pytest.fixture(scope='module')
def captioner():
  return _captioner(2.2)


@pytest.fixture(scope='module')
def beam_captioner():
  return _captioner(3.6)  # beams prefer longer sequences: a likelier end makes them finish early too


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


@pytest.mark.parametrize('batch,prompt,num_beams,min_length,length_penalty,returned',
                         [(1, [], 3, 0, 1.0, 1), (3, [], 3, 5, 1.0, 2), (2, [5, 6, 7], 4, 0, 0.6, 3),
                          (4, [11], 2, 9, 1.0, 1)])
def test_beam_search_equals_hf_generate(beam_captioner, batch, prompt, num_beams, min_length, length_penalty, returned):
  hf, model = beam_captioner
  x = images(batch=batch, seed=10 + batch)
  max_length = 14
  with torch.no_grad():
    ref = hf.generate(pixel_values=x, input_ids=torch.tensor([[2, *prompt, SEP]] * batch), max_length=max_length,
                      min_length=min_length, num_beams=num_beams, length_penalty=length_penalty,
                      num_return_sequences=returned, do_sample=False, output_scores=True,
                      return_dict_in_generate=True)
  run = jax.jit(lambda images, ids: generate.beam_search(
      model.text_decoder, model.image_embeds(images), ids, num_beams=num_beams, max_length=max_length,
      min_length=min_length, length_penalty=length_penalty, eos_token_id=SEP, pad_token_id=PAD,
      num_return_sequences=returned))
  ids, scores = run(nhwc(x), np.asarray([[DEC, *prompt]] * batch, np.int32))
  ours = np.asarray(ids).reshape(batch * returned, max_length)
  # HF fills after the end with `pad_token_id or eos_token_id`: [SEP] when the pad id is 0.
  expected = np.full((batch * returned, max_length), PAD)
  seq = ref.sequences.numpy()
  for r, row in enumerate(seq):
    end = np.flatnonzero(row[len(prompt) + 1:] == SEP)
    stop = len(prompt) + 2 + end[0] if len(end) else len(row)
    expected[r, :stop] = row[:stop]
  np.testing.assert_array_equal(ours, expected)
  np.testing.assert_allclose(np.asarray(scores).reshape(-1), ref.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)
  if batch in (3, 4):  # the cases meant to mix finished and max-length sequences
    ended = (ours == SEP).any(1)
    assert ended.any() and not ended.all()
