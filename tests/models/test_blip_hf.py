"""BLIP task models against HuggingFace's PyTorch BLIP classes (random weights, fp32), and ITM Grad-CAM
against LAVIS's `compute_gradcam` stated on them."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from blip_jax import losses
from blip_jax.convert import load_torch
from blip_jax.models import layers
from blip_jax.models.bert import lm_loss
from blip_jax.testing.torch_refs import (
  CLS,
  DEC,
  ENC,
  OVERRIDES,
  PAD,
  SEP,
  assert_close,
  build_hf,
  images,
  nhwc,
  text_batch,
)


@pytest.fixture(scope='module')
def retrieval():
  hf = build_hf(transformers.BlipForImageTextRetrieval)
  model, cfg, report = load_torch(hf.state_dict(), task='retrieval', **OVERRIDES)
  return hf, model


@pytest.mark.parametrize('head_at_a_time', [False, True])
def test_blip_model_vision_text_and_multimodal_states(monkeypatch, head_at_a_time):
  """Also with every attention on the CPU path that loops over heads (`layers.HEAD_AT_A_TIME_BYTES`;
  these shapes are below it otherwise)."""
  if head_at_a_time:
    monkeypatch.setattr(layers, 'HEAD_AT_A_TIME_BYTES', 0)
  hf = build_hf(transformers.BlipModel)
  model, _, report = load_torch(hf.state_dict(), task='feature_extractor', **OVERRIDES)
  assert 'text_encoder.pooler.dense.weight' in report.skipped  # reported, not silently dropped
  x = images()
  ids, mask = text_batch(first_token=ENC)
  with torch.no_grad():
    vision = hf.vision_model(x).last_hidden_state
    text = hf.text_model(ids, attention_mask=mask).last_hidden_state
    multi = hf.text_model(ids, attention_mask=mask, encoder_hidden_states=vision).last_hidden_state
  embeds = model.image_embeds(nhwc(x))
  assert_close(embeds, vision, 'vision hidden states')
  assert_close(model.text_embeds(ids.numpy(), mask.numpy()), text, 'text-mode hidden states')
  assert_close(model.multimodal_embeds(embeds, ids.numpy(), mask.numpy()), multi,
               'multimodal hidden states')


def test_retrieval_itm_logits(retrieval):
  hf, model = retrieval
  x = images()
  ids, mask = text_batch(first_token=ENC)  # the HF class leaves the first token to the caller
  with torch.no_grad():
    ref = hf(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=True).itm_score
  embeds = model.image_embeds(nhwc(x))
  assert_close(model.itm_logits(embeds, ids.numpy(), mask.numpy()), ref, 'ITM logits')
  # Our model puts [ENC] first itself, so [CLS]-first input gives the same logits.
  cls_ids, _ = text_batch(first_token=CLS)
  assert_close(model.itm_logits(embeds, cls_ids.numpy(), mask.numpy()), ref, 'ITM logits ([CLS] in)')


@pytest.mark.parametrize('share_image_keys', [True, False])
def test_itm_with_hard_negatives_matches_hf_on_copied_pairs(retrieval, share_image_keys):
  """ITM over [positives; negative images; negative texts], reading each image's keys/values once
  (`image_rows`, the single-device path) or from copied image states (on a mesh), gives HF's
  logits and loss on the concatenated copies the originals build."""
  hf, model = retrieval
  x = images()
  ids, mask = text_batch(first_token=ENC)
  neg_image, neg_text = torch.tensor([1, 0]), torch.tensor([1, 0])
  with torch.no_grad():
    ref = hf(input_ids=torch.cat([ids, ids, ids[neg_text]]), pixel_values=torch.cat([x, x[neg_image], x]),
             attention_mask=torch.cat([mask, mask, mask[neg_text]]), use_itm_head=True).itm_score
    ref_loss = torch.nn.functional.cross_entropy(ref, torch.tensor([1, 1, 0, 0, 0, 0]))
  loss, logits = losses.itm_loss_with_negatives(model.itm_logits, model.image_embeds(nhwc(x)), ids.numpy(),
                                                    mask.numpy(), neg_image.numpy(), neg_text.numpy(),
                                                    share_image_keys=share_image_keys)
  assert_close(logits, ref, 'ITM logits of the hard-negative pairs')
  assert_close(loss, ref_loss, 'ITM loss')


def test_retrieval_itc_features_and_similarity(retrieval):
  hf, model = retrieval
  x = images()
  ids, mask = text_batch()
  with torch.no_grad():
    out = hf(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=False)
    image_feat = torch.nn.functional.normalize(hf.vision_proj(out.last_hidden_state[:, 0]), dim=-1)
    text_feat = torch.nn.functional.normalize(hf.text_proj(out.question_embeds[:, 0]), dim=-1)
  i_feat = model.image_features(model.image_embeds(nhwc(x)))
  t_feat = model.text_features(model.text_embeds(ids.numpy(), mask.numpy()))
  assert_close(i_feat, image_feat, 'ITC image features')
  assert_close(t_feat, text_feat, 'ITC text features')
  assert_close(model.similarity(i_feat, t_feat), out.itm_score, 'ITC similarity')
  # itc_logits divides by the clamped temperature (0.07 here).
  assert_close(model.itc_logits(i_feat, t_feat), out.itm_score / 0.07, 'ITC logits', atol=1e-4)
  model.temp[...] = jnp.array(1e-5)
  assert float(model.temperature()) == pytest.approx(0.001)
  model.temp[...] = jnp.array(0.07)


def test_captioner_logits_and_loss():
  hf = build_hf(transformers.BlipForConditionalGeneration, label_smoothing=0.1)
  model, cfg, report = load_torch(hf.state_dict(), task='caption', **OVERRIDES)
  assert 'text_decoder.cls.predictions.decoder.weight' in report.skipped  # tied, checked equal
  x = images()
  ids, mask = text_batch(first_token=DEC)
  with torch.no_grad():
    out = hf(pixel_values=x, input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
  embeds = model.image_embeds(nhwc(x))
  logits = model(embeds, ids.numpy(), mask.numpy())
  assert_close(logits, out.logits, 'teacher-forced decoder logits')
  assert_close(model.loss(embeds, ids.numpy(), mask.numpy()), out.loss, 'caption LM loss')
  # The prompt tokens are excluded from the loss, as BLIP_Decoder does.
  labels = ids.masked_fill(mask == 0, -100)
  labels[:, :3] = -100
  ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                          labels[:, 1:].reshape(-1), label_smoothing=0.1)
  assert_close(model.loss(embeds, ids.numpy(), mask.numpy(), prompt_length=3), ref, 'loss with prompt')


def test_vqa_question_states_answer_logits_and_weighted_loss():
  hf = build_hf(transformers.BlipForQuestionAnswering, label_smoothing=0.1)
  model, _, _ = load_torch(hf.state_dict(), task='vqa', **OVERRIDES)
  x = images()
  q_ids, q_mask = text_batch(first_token=ENC)
  # Two candidate answers per question; the second question's second answer is padding.
  a_ids = torch.tensor([[[DEC, 11, 12, 3], [DEC, 13, 3, 0]], [[DEC, 14, 3, 0], [DEC, 0, 0, 0]]])
  a_mask = (a_ids != 0).long()
  weights = torch.tensor([[0.7, 0.3], [1.0, 0.0]])
  with torch.no_grad():
    vision = hf.vision_model(x).last_hidden_state
    q_states = hf.text_encoder(q_ids, attention_mask=q_mask, encoder_hidden_states=vision).last_hidden_state
    rep_states, rep_mask = q_states.repeat_interleave(2, 0), q_mask.repeat_interleave(2, 0)
    flat_ids, flat_mask = a_ids.reshape(4, -1), a_mask.reshape(4, -1)
    # transformers 5.x drops `encoder_attention_mask` inside BLIP's cross-attention, while the
    # original masks the padded question positions. Attending to the unpadded question alone is
    # the original's result, so the reference decodes each answer against its question's real
    # tokens only.
    logits, seq_loss = [], []
    for i in range(4):
      n = int(rep_mask[i].sum())
      out = hf.text_decoder(flat_ids[i:i + 1], attention_mask=flat_mask[i:i + 1],
                            encoder_hidden_states=rep_states[i:i + 1, :n],
                            labels=flat_ids[i:i + 1].masked_fill(flat_mask[i:i + 1] == 0, -100),
                            reduction='none')
      logits.append(out.logits)
      seq_loss.append(out.loss)
    ref_logits, ref_loss = torch.cat(logits), (weights.reshape(-1) * torch.cat(seq_loss)).sum() / 2
  embeds = model.image_embeds(nhwc(x))
  states = model.question_states(embeds, q_ids.numpy(), q_mask.numpy())
  assert_close(states, q_states, 'question states')
  logits = model.answer_logits(np.repeat(states, 2, 0), rep_mask.numpy(), flat_ids.numpy(), flat_mask.numpy())
  assert_close(logits, ref_logits, 'answer logits')
  loss = model.loss(embeds, q_ids.numpy(), q_mask.numpy(), a_ids.numpy(), a_mask.numpy(), weights.numpy())
  assert_close(loss, ref_loss, 'weighted VQA loss')


def test_vqa_rank_keeps_the_k_answers_likeliest_by_first_token_then_scores_them():
  """A PyTorch statement of the original's `rank_answer` (models/blip_vqa.py) with HF's decoder,
  each question attended over its real tokens (see the test above)."""
  hf = build_hf(transformers.BlipForQuestionAnswering, label_smoothing=0.1)
  model, _, _ = load_torch(hf.state_dict(), task='vqa', **OVERRIDES)
  x = images()
  q_ids, q_mask = text_batch(first_token=ENC)
  g = torch.Generator().manual_seed(0)
  a_ids = torch.cat([torch.full((12, 1), DEC), torch.randint(5, 90, (12, 3), generator=g), torch.full((12, 1), 3)], 1)
  a_ids[::3, 3], a_ids[::3, 4] = 3, 0  # some answers one token shorter, padded
  a_mask = (a_ids != 0).long()
  k = 2
  best, best_of_all = [], []
  with torch.no_grad():
    vision = hf.vision_model(x).last_hidden_state
    q_states = hf.text_encoder(q_ids, attention_mask=q_mask, encoder_hidden_states=vision).last_hidden_state
    for i in range(len(q_ids)):
      states = q_states[i:i + 1, :int(q_mask[i].sum())]
      start = hf.text_decoder(torch.tensor([[DEC]]), encoder_hidden_states=states).logits[:, 0]
      top = start.softmax(-1)[0, a_ids[:, 1]].topk(k).indices
      log_probs = torch.cat([-hf.text_decoder(a_ids[j:j + 1], attention_mask=a_mask[j:j + 1], encoder_hidden_states=states,
                                              labels=a_ids[j:j + 1].masked_fill(a_mask[j:j + 1] == 0, -100),
                                              reduction='none').loss for j in range(len(a_ids))])
      best.append(int(top[log_probs[top].argmax()]))
      best_of_all.append(int(log_probs.argmax()))
  assert best != best_of_all  # the pre-filter matters on these weights: the test tells the two rules apart
  states = model.question_states(model.image_embeds(nhwc(x)), q_ids.numpy(), q_mask.numpy())
  picked = model.rank_answers(states, q_mask.numpy(), a_ids.numpy(), a_mask.numpy(), k=k)
  assert np.asarray(picked).tolist() == best
  everything = model.rank_answers(states, q_mask.numpy(), a_ids.numpy(), a_mask.numpy(), k=128)  # k >= A: all scored
  assert np.asarray(everything).tolist() == best_of_all


def test_lm_loss_matches_torch_cross_entropy():
  g = torch.Generator().manual_seed(0)
  logits = torch.randn(3, 7, 11, generator=g)
  labels = torch.randint(0, 11, (3, 7), generator=g)
  labels[0, 4:] = -100
  labels[2, 1] = -100
  shifted, targets = logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1)
  for smoothing in (0.0, 0.1):
    mean = torch.nn.functional.cross_entropy(shifted, targets, label_smoothing=smoothing)
    none = torch.nn.functional.cross_entropy(shifted, targets, label_smoothing=smoothing,
                                             reduction='none').view(3, -1).sum(1)
    assert_close(lm_loss(logits.numpy(), labels.numpy(), label_smoothing=smoothing), mean, 'mean')
    assert_close(lm_loss(logits.numpy(), labels.numpy(), label_smoothing=smoothing, reduction='none'),
                 none, 'per-sequence sums')


# ------------------------------------------------------------------------------ Grad-CAM

def lavis_gradcam(hf, x, ids, mask, block):
  """A PyTorch statement of LAVIS `compute_gradcam(model, image, text, tokenized_text, block_num)` on
  HF's modules: HF's cross-attention returns the probabilities its context is computed from, and a
  tensor hook gives their gradient."""
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
