"""Decoding: greedy and beam-search captions token for token equal to HF `generate` on
random-weight BLIP and BLIP-2 (OPT) models; the logit processors and sampling warpers equal HF's;
sampling draws from exactly the warped distribution; the Q-Former captioner's cache equals its
uncached ITG pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf_lp

from blip_jax import generate
from blip_jax.convert import load_torch
from blip_jax.testing.torch_refs import BLIP2_QUERIES, DEC, OVERRIDES, PAD, SEP, build_hf, hf_blip2_opt, images, nhwc


def _hf_filled(sequences, prompt_length, eos, pad, max_length):
  """HF's sequences as ours: after a row's end-of-sequence token, `pad` up to `max_length`."""
  out = np.full((len(sequences), max_length), pad)
  for r, row in enumerate(sequences):
    end = np.flatnonzero(row[prompt_length:] == eos)
    stop = prompt_length + end[0] + 1 if len(end) else len(row)
    out[r, :stop] = row[:stop]
  return out


def test_processors_and_warpers_equal_hf():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 50)).astype(np.float32) * 3
  ids = rng.integers(0, 50, size=(5, 12))
  length = 7  # only the first 7 tokens have been generated; the rest are stale slots
  for penalty, min_length in ((1.3, 9), (0.8, 0), (1.0, 3)):
    ours = generate.process_logits(jnp.asarray(logits), jnp.asarray(ids), length, min_length=min_length,
                                   eos_token_id=4, repetition_penalty=penalty)
    t_ids, t_logits = torch.tensor(ids[:, :length]), torch.tensor(logits)
    ref = hf_lp.MinLengthLogitsProcessor(min_length, 4)(t_ids, hf_lp.RepetitionPenaltyLogitsProcessor(penalty)(t_ids, t_logits))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)
  for temperature, top_k, top_p in ((0.7, 0, 0.9), (1.0, 10, 1.0), (1.3, 20, 0.5), (1.0, 0, 0.05)):
    ours = np.asarray(generate.warp_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    ref = torch.tensor(logits)
    for warper in (hf_lp.TemperatureLogitsWarper(temperature), top_k and hf_lp.TopKLogitsWarper(top_k),
                   top_p < 1 and hf_lp.TopPLogitsWarper(top_p)):
      ref = warper(None, ref) if warper else ref
    ref = ref.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)
    assert np.all(np.isfinite(ours).sum(-1) >= 1)


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
  np.testing.assert_array_equal(ours, _hf_filled(ref.sequences.numpy(), len(prompt) + 1, SEP, PAD, max_length))
  np.testing.assert_allclose(np.asarray(scores).reshape(-1), ref.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)
  if batch in (3, 4):  # the cases meant to mix finished and max-length sequences
    ended = (ours == SEP).any(1)
    assert ended.any() and not ended.all()


@pytest.mark.parametrize('num_beams,penalty', [(1, 1.6), (3, 1.4)])
def test_repetition_penalty_equals_hf_generate(captioner, num_beams, penalty):
  hf, model = captioner
  batch, prompt, max_length = 3, [5, 6], 14
  x = images(batch=batch, seed=7)
  with torch.no_grad():
    ref = hf.generate(pixel_values=x, input_ids=torch.tensor([[2, *prompt, SEP]] * batch), max_length=max_length,
                      min_length=4, num_beams=num_beams, repetition_penalty=penalty, do_sample=False).numpy()
  settings = dict(max_length=max_length, min_length=4, eos_token_id=SEP, pad_token_id=PAD, repetition_penalty=penalty)
  decoder, embeds, ids = model.text_decoder, model.image_embeds(nhwc(x)), np.asarray([[DEC, *prompt]] * batch, np.int32)
  if num_beams == 1:
    ours = generate.greedy(decoder, embeds, ids, **settings)
    without = generate.greedy(decoder, embeds, ids, **{**settings, 'repetition_penalty': 1.0})
  else:
    ours = generate.beam_search(decoder, embeds, ids, num_beams=num_beams, **settings)[0][:, 0]
    without = generate.beam_search(decoder, embeds, ids, num_beams=num_beams,
                                   **{**settings, 'repetition_penalty': 1.0})[0][:, 0]
  np.testing.assert_array_equal(np.asarray(ours), _hf_filled(ref, len(prompt) + 1, SEP, PAD, max_length))
  assert not np.array_equal(np.asarray(ours), np.asarray(without))  # the penalty changed something


def test_sampling_draws_from_the_warped_distribution(captioner):
  hf, model = captioner
  x = images(batch=1, seed=3)
  embeds = model.image_embeds(nhwc(x))
  prompt = np.asarray([[DEC, 5]], np.int32)
  settings = dict(max_length=3, eos_token_id=SEP, pad_token_id=PAD, temperature=0.8, top_p=0.7)
  draws = np.asarray(jax.jit(lambda key: generate.sample(model.text_decoder, embeds, prompt, rng=key,
                                                         num_return_sequences=4000, **settings))(jax.random.key(1)))
  first = draws[0, :, 2]
  # The reference distribution of the first sampled token: HF's logits through HF's warpers.
  with torch.no_grad():
    logits = hf(pixel_values=x, input_ids=torch.tensor([[DEC, 5]])).logits[:, -1]
  warped = hf_lp.TopPLogitsWarper(0.7)(None, hf_lp.TemperatureLogitsWarper(0.8)(None, logits))
  p = torch.softmax(warped, -1)[0].numpy().astype(np.float64)
  assert set(np.unique(first)) <= set(np.flatnonzero(p > 0)), 'sampled a token outside the nucleus'
  assert 3 <= (p > 0).sum() < len(p) * 3 // 4  # the nucleus is a real cut, not everything or one token
  counts = np.bincount(first, minlength=len(p))
  expected = p * len(first)
  sigma = np.sqrt(len(first) * p * (1 - p)) + 1e-9
  assert np.all(np.abs(counts - expected) <= 5 * sigma + 1), 'frequencies differ from the warped probabilities'
  # Fixed keys give fixed samples; other keys give others.
  again = np.asarray(generate.sample(model.text_decoder, embeds, prompt, rng=jax.random.key(1),
                                     num_return_sequences=4000, **settings))
  np.testing.assert_array_equal(again, draws)
  # top_k=1 leaves one token: sampling is greedy decoding.
  x3 = nhwc(images(batch=3, seed=4))
  ids3 = np.asarray([[DEC]] * 3, np.int32)
  greedy = generate.greedy(model.text_decoder, model.image_embeds(x3), ids3, max_length=12, min_length=5,
                           eos_token_id=SEP, pad_token_id=PAD, repetition_penalty=1.2)
  sampled = generate.sample(model.text_decoder, model.image_embeds(x3), ids3, rng=jax.random.key(5), max_length=12,
                            min_length=5, eos_token_id=SEP, pad_token_id=PAD, repetition_penalty=1.2, top_k=1,
                            num_return_sequences=2)
  np.testing.assert_array_equal(np.asarray(sampled), np.repeat(np.asarray(greedy)[:, None], 2, axis=1))


# ----------------------------------------------------------------------------------------------
# BLIP-2: OPT reads the image prefix (projected query outputs), then BOS + prompt.

OPT_BOS, OPT_PAD = 2, 1  # OPT's `</s>` starts every text and also ends it


@pytest.fixture(scope='module')
def blip2_opt(tmp_path_factory):
  hf = hf_blip2_opt()
  path = tmp_path_factory.mktemp('blip2_opt')
  hf.save_pretrained(path)
  return hf, load_torch(path)[0]


@pytest.mark.parametrize('batch,prompt,num_beams', [(2, [], 1), (3, [7, 8], 1), (2, [], 3), (2, [9], 2)])
def test_blip2_opt_decoding_equals_hf_generate(blip2_opt, batch, prompt, num_beams):
  hf, model = blip2_opt
  x = images(batch=batch, size=28, seed=20 + batch)
  max_length, min_length = 10, 3
  text = [OPT_BOS, *prompt]
  with torch.no_grad():
    ref = hf.generate(pixel_values=x, input_ids=torch.tensor([[hf.config.image_token_index] * BLIP2_QUERIES + text] * batch),
                      max_length=BLIP2_QUERIES + max_length, min_length=BLIP2_QUERIES + min_length,
                      num_beams=num_beams, do_sample=False).numpy()[:, BLIP2_QUERIES:]
  prefix = model.prefix(model.image_embeds(nhwc(x)))
  settings = dict(max_length=max_length, min_length=min_length, eos_token_id=OPT_BOS, pad_token_id=OPT_PAD)
  ids = np.asarray([text] * batch, np.int32)
  if num_beams == 1:
    ours = generate.greedy(model.decoder, prefix, ids, **settings)
  else:
    ours = generate.beam_search(model.decoder, prefix, ids, num_beams=num_beams, **settings)[0][:, 0]
  np.testing.assert_array_equal(np.asarray(ours), _hf_filled(ref, len(text), OPT_BOS, OPT_PAD, max_length))


@pytest.fixture(scope='module')
def qformer_captioner(tmp_path_factory):
  from blip_jax.testing.torch_refs import hf_blip2_retrieval
  path = tmp_path_factory.mktemp('blip2_stage1')
  hf_blip2_retrieval().save_pretrained(path)
  model, _, _ = load_torch(path, bos_token_id=1)  # the tiny vocabulary's [DEC]
  return model, model.image_embeds(nhwc(images(size=28)))


def test_qformer_decoder_cache_equals_itg_logits(qformer_captioner):
  """Text fed a few tokens at a time through the cached decoder gives the logits of the whole
  text under the ITG mask (checked against LAVIS's mask in test_blip2)."""
  model, embeds = qformer_captioner
  ids = jnp.asarray([[1, 11, 12, 13, 14, 15], [1, 16, 17, 18, 19, 20]])
  full = model.itg_logits(embeds, ids, jnp.ones_like(ids))
  decoder = model.decoder
  cache = decoder.init_cache(2, 8, embeds)
  slots = jnp.ones((2, 8), jnp.int32)
  parts = []
  for start, stop in ((0, 3), (3, 4), (4, 6)):
    logits, cache = decoder.decode(ids[:, start:stop], slots, cache)
    parts.append(logits)
  np.testing.assert_allclose(np.concatenate(parts, 1), full, atol=1e-5)


@pytest.mark.parametrize('repetition_penalty', [1.0, 1.5])
def test_qformer_captions_greedy_equals_rerunning_itg_each_step(qformer_captioner, repetition_penalty):
  """Greedy Q-Former captions (LAVIS `Blip2Qformer.generate`) equal picking each token from the
  ITG logits of the whole text so far, recomputed at every step without a cache."""
  model, embeds = qformer_captioner
  max_length, eos = 9, 3
  prompt = jnp.asarray([[1, 11], [1, 11]])
  ours = generate.greedy(model.decoder, embeds, prompt, max_length=max_length, min_length=4, eos_token_id=eos,
                         pad_token_id=0, repetition_penalty=repetition_penalty)
  ref = np.asarray(prompt)
  done = np.zeros(2, bool)
  while ref.shape[1] < max_length and not done.all():
    logits = model.itg_logits(embeds, jnp.asarray(ref), jnp.ones(ref.shape, jnp.int32))[:, -1]
    logits = generate.process_logits(logits, jnp.asarray(ref), ref.shape[1], min_length=4, eos_token_id=eos,
                                     repetition_penalty=repetition_penalty)
    token = np.where(done, 0, np.asarray(logits).argmax(-1))
    done |= token == eos
    ref = np.concatenate([ref, token[:, None]], 1)
  ref = np.pad(ref, ((0, 0), (0, max_length - ref.shape[1])))
  np.testing.assert_array_equal(np.asarray(ours), ref)
