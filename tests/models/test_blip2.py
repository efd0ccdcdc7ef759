"""BLIP-2 stage 1 against HF `Blip2ForImageTextRetrieval` (random weights, fp32), and the
Q-Former's three attention masks."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from blip_jax.convert import ConversionError, load_torch
from blip_jax.models import layers
from blip_jax.testing.torch_refs import (
  BLIP2_IMAGE_TOKEN,
  BLIP2_QUERIES,
  assert_close,
  eva_checkpoint,
  hf_blip2_opt,
  hf_blip2_retrieval,
  images,
  nhwc,
  randomize,
  to_lavis,
)

NUM_QUERY, IMAGE_TOKEN = BLIP2_QUERIES, BLIP2_IMAGE_TOKEN


@pytest.fixture(scope='module')
def hf_and_ours(tmp_path_factory):
  hf = hf_blip2_retrieval()
  path = tmp_path_factory.mktemp('hf_blip2')
  hf.save_pretrained(path)
  model, config, report = load_torch(path, bos_token_id=1)  # the tiny vocabulary's [DEC]
  return hf, model, config, report


IDS = torch.tensor([[2, 11, 12, 13, 3], [2, 14, 3, 0, 0]])
MASK = (IDS != 0).long()


def test_config_and_report(hf_and_ours):
  _, _, cfg, report = hf_and_ours
  assert report.task == 'stage1' and report.layout == 'huggingface'
  assert (cfg.vision.qkv_bias, cfg.qformer.cross_attention_freq, cfg.qformer.num_query_tokens) == ('qv', 2, NUM_QUERY)
  assert set(report.missing) >= {'temp', 'Qformer.cls.predictions.bias'}


def test_image_embeds_and_query_states(hf_and_ours):
  hf, model, _, _ = hf_and_ours
  x = images(size=28)
  with torch.no_grad():
    vision = hf.vision_model(x).last_hidden_state  # includes post_layernorm = ln_vision
    queries = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1),
                         encoder_hidden_states=vision).last_hidden_state
  embeds = model.image_embeds(nhwc(x))
  assert_close(embeds, vision, 'ln_vision(image states)')
  assert_close(model.query_states(embeds), queries, 'query states')


@pytest.mark.parametrize('layers,freq', [(2, 2), (1, 1), (4, 3)])
def test_cross_attention_period_read_from_the_weights(tmp_path, layers, freq):
  """Cross-attention in layers 0, freq, 2 freq, ...: one cross-attention layer (0) among
  several says nothing of the spacing, only that it is at least the layer count."""
  hf = hf_blip2_retrieval(num_hidden_layers=layers, cross_attention_frequency=freq)
  hf.save_pretrained(tmp_path)
  model, cfg, _ = load_torch(tmp_path, bos_token_id=1)
  assert [i for i in range(layers) if i % cfg.qformer.cross_attention_freq == 0] == list(range(0, layers, freq))
  x = images(size=28)
  with torch.no_grad():
    vision = hf.vision_model(x).last_hidden_state
    queries = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=vision).last_hidden_state
  assert_close(model.query_states(model.image_embeds(nhwc(x))), queries, 'query states')


def test_itc_similarity_is_max_over_queries(hf_and_ours):
  hf, model, _, _ = hf_and_ours
  x = images(size=28)
  with torch.no_grad():
    out = hf(pixel_values=x, input_ids=IDS, attention_mask=MASK, use_image_text_matching_head=False)
  embeds = model.image_embeds(nhwc(x))
  image_feat, text_feat = model.image_features(embeds), model.text_features(IDS.numpy(), MASK.numpy())
  assert_close(image_feat, out.image_embeds, 'ITC image features [B, Q, E]')
  assert_close(text_feat, out.text_embeds, 'ITC text features')
  assert_close(model.similarity(image_feat, text_feat), out.logits_per_image, 'ITC similarity')


def test_itm_logits_mean_over_queries(hf_and_ours):
  hf, model, _, _ = hf_and_ours
  x = images(size=28)
  with torch.no_grad():
    out = hf(pixel_values=x, input_ids=IDS, attention_mask=MASK, use_image_text_matching_head=True)
  logits = model.itm_logits(model.image_embeds(nhwc(x)), IDS.numpy(), MASK.numpy())
  assert_close(logits, out.logits_per_image, 'ITM logits')


def test_itg_mask_text_sees_queries_and_earlier_text_only():
  """The ITG mask of [4 queries; 3 text tokens]: queries see queries, text sees every query
  and the text up to itself (and never padding)."""
  valid = np.array([[1, 1, 1, 1, 1, 1, 0]])
  mask_ar = np.array([[0, 0, 0, 0, 1, 1, 1]])
  got = np.asarray(layers.make_attn_mask(valid, mask_ar))[0].astype(int)
  expected = np.array([[1, 1, 1, 1, 0, 0, 0]] * 4 + [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0],
                                                      [1, 1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(got, expected)


def test_itg_logits_do_not_see_future_text(hf_and_ours):
  """Changing a later token changes neither the earlier logits nor anything the queries see."""
  _, model, _, _ = hf_and_ours
  embeds = model.image_embeds(nhwc(images(size=28)))
  a = np.array([[2, 11, 12, 13, 3]])
  b = a.copy()
  b[0, 3] = 40
  la, lb = model.itg_logits(embeds[:1], a), model.itg_logits(embeds[:1], b)
  assert_close(lb[:, :3], np.asarray(la[:, :3]), 'logits before the change')
  assert np.abs(np.asarray(la[:, 3:]) - np.asarray(lb[:, 3:])).max() > 1e-4


def test_key_bias_must_be_zero(tmp_path, hf_and_ours):
  hf, *_ = hf_and_ours
  sd = {k: v.clone() for k, v in hf.state_dict().items()}
  sd['vision_model.encoder.layers.0.self_attn.qkv.bias'][30] = 1.0
  with pytest.raises(ConversionError, match='no key bias'):
    load_torch(sd, vision={'num_heads': 2}, qformer={'num_heads': 2})


# ----------------------------------------------------------------------------------------------
# Stage 2: OPT reads the projected query outputs as a prefix.

@pytest.fixture(scope='module')
def hf_stage2():
  return hf_blip2_opt()


TEXT = torch.tensor([[2, 11, 12, 13, 14], [2, 15, 16, 1, 1]])
TEXT_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def _hf_stage2_logits(hf, x):
  ids = torch.cat([torch.full((2, NUM_QUERY), IMAGE_TOKEN), TEXT], 1)
  mask = torch.cat([torch.ones(2, NUM_QUERY, dtype=torch.long), TEXT_MASK], 1)
  with torch.no_grad():
    return hf(pixel_values=x, input_ids=ids, attention_mask=mask).logits


def _compare_stage2(model, hf):
  x = images(size=28)
  ref = _hf_stage2_logits(hf, x)
  logits = np.asarray(model.logits(model.image_embeds(nhwc(x)), TEXT.numpy(), TEXT_MASK.numpy()))
  real = np.concatenate([np.ones((2, NUM_QUERY), bool), TEXT_MASK.numpy().astype(bool)], 1)
  assert_close(logits[real], ref.numpy()[real], 'OPT logits over [image prefix; text]')


def test_stage2_hf_logits(tmp_path, hf_stage2):
  hf_stage2.save_pretrained(tmp_path)
  model, cfg, report = load_torch(tmp_path)
  assert report.task == 'stage2' and not cfg.qformer.text_input and cfg.opt.hidden_size == 20
  _compare_stage2(model, hf_stage2)


def test_stage2_lavis_files_merged_with_vit_and_opt(tmp_path, hf_stage2):
  """A LAVIS stage-2 .pth (no ViT, no OPT) + EVA ViT-g .pth (40 blocks, bare keys) + HF OPT folder."""
  sd = hf_stage2.state_dict()
  lavis = to_lavis(sd)
  torch.save({'model': lavis}, tmp_path / 'blip2_opt.pth')
  eva = eva_checkpoint(sd, extra_blocks=1)
  torch.save(eva, tmp_path / 'eva_vit_g.pth')
  hf_stage2.language_model.save_pretrained(tmp_path / 'opt')
  heads = dict(vision={'num_heads': 2, 'ln_eps': 1e-6}, qformer={'num_heads': 2}, ln_vision_eps=1e-6)
  with pytest.raises(ConversionError, match='omit the frozen ViT'):
    load_torch(tmp_path / 'blip2_opt.pth', **heads)
  with pytest.raises(ConversionError, match=r'omit the\s+frozen LLM'):
    load_torch([tmp_path / 'blip2_opt.pth', tmp_path / 'eva_vit_g.pth'], **heads)
  model, cfg, report = load_torch([tmp_path / 'blip2_opt.pth', tmp_path / 'eva_vit_g.pth', tmp_path / 'opt'], **heads)
  assert cfg.vision.depth == 2 and 'visual_encoder.blocks.2.norm1.weight' in report.skipped
  _compare_stage2(model, hf_stage2)


# ----------------------------------------------------------------------------------------------
# Stage-1 losses against a PyTorch statement of LAVIS `Blip2Qformer.forward`, built from the HF
# Q-Former modules: ITG runs the text against the query keys/values of the image-only pass,
# as LAVIS's `past_key_values` reuse does.

def _random_lm_head(hidden, seed=3):
  g = torch.Generator().manual_seed(seed)
  r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
  return {'Qformer.cls.predictions.transform.dense.weight': r(hidden, hidden),
          'Qformer.cls.predictions.transform.dense.bias': r(hidden),
          'Qformer.cls.predictions.transform.LayerNorm.weight': 1 + r(hidden),
          'Qformer.cls.predictions.transform.LayerNorm.bias': r(hidden),
          'Qformer.cls.predictions.bias': r(60)}


def _lavis_itg_logits(hf, head, x, ids, mask):
  qf, eps = hf.qformer, hf.config.qformer_config.layer_norm_eps
  with torch.no_grad():
    vision = hf.vision_model(x).last_hidden_state
    q = qf.layernorm(hf.query_tokens.expand(x.shape[0], -1, -1))
    word = hf.embeddings.word_embeddings(ids) + hf.embeddings.position_embeddings(torch.arange(ids.shape[1]))
    t = qf.layernorm(word)
    n, length = q.shape[1], ids.shape[1]
    allowed = torch.cat([torch.ones(length, n), torch.tril(torch.ones(length, length))], 1)[None]
    allowed = allowed * torch.cat([torch.ones(x.shape[0], n), mask.float()], 1)[:, None, :]
    bias = ((1 - allowed) * -10000.0)[:, None]
    for layer in qf.encoder.layer:
      att = layer.attention.attention
      heads = lambda h: h.view(h.shape[0], h.shape[1], att.num_attention_heads, -1).transpose(1, 2)
      # Image-only pass: queries attend to queries (these keys/values are LAVIS's cache).
      k_q, v_q = heads(att.key(q)), heads(att.value(q))
      q_att = layer.attention(q)
      if layer.has_cross_attention:
        q_att = layer.crossattention(q_att, encoder_hidden_states=vision)
      q_next = layer.output_query(layer.intermediate_query(q_att), q_att)
      # Text: keys/values = [cached queries; text], causal over the text.
      k = torch.cat([k_q, heads(att.key(t))], 2)
      v = torch.cat([v_q, heads(att.value(t))], 2)
      scores = heads(att.query(t)) @ k.transpose(-1, -2) / (k.shape[-1] ** 0.5) + bias
      ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(t.shape)
      t_att = layer.attention.output(ctx, t)
      t = layer.output(layer.intermediate(t_att), t_att)
      q = q_next
    h = torch.nn.functional.linear(t, head['Qformer.cls.predictions.transform.dense.weight'],
                                   head['Qformer.cls.predictions.transform.dense.bias'])
    h = torch.nn.functional.layer_norm(torch.nn.functional.gelu(h), h.shape[-1:],
                                       head['Qformer.cls.predictions.transform.LayerNorm.weight'],
                                       head['Qformer.cls.predictions.transform.LayerNorm.bias'], eps)
    return h @ hf.embeddings.word_embeddings.weight.T + head['Qformer.cls.predictions.bias']


@pytest.fixture(scope='module')
def lavis_stage1(hf_and_ours):
  """The HF stage-1 weights in LAVIS names plus an LM head, as blip2_pretrained.pth holds them."""
  hf = hf_and_ours[0]
  head = _random_lm_head(16)
  sd = {**hf.state_dict(), **head, 'temp': torch.tensor(0.05)}
  sd['Qformer.cls.predictions.decoder.weight'] = hf.embeddings.word_embeddings.weight
  model, _, _ = load_torch(sd, vision={'num_heads': 2}, qformer={'num_heads': 2}, ln_vision_eps=1e-6,
                           bos_token_id=1)
  return hf, head, model


def test_itg_logits_match_lavis_cached_pass(lavis_stage1):
  hf, head, model = lavis_stage1
  x = images(size=28)
  dec = IDS.clone()
  dec[:, 0] = 1  # [DEC]
  ref = _lavis_itg_logits(hf, head, x, dec, MASK)
  assert_close(model.itg_logits(model.image_embeds(nhwc(x)), IDS.numpy(), MASK.numpy()), ref, 'ITG logits')


def test_stage1_losses_match_lavis_forward(lavis_stage1):
  from blip_jax.losses import blip2_stage1_losses
  hf, head, model = lavis_stage1
  g = torch.Generator().manual_seed(8)
  x = torch.randn(3, 3, 28, 28, generator=g)
  ids = torch.tensor([[2, 11, 12, 13, 3], [2, 14, 3, 0, 0], [2, 15, 16, 3, 0]])
  mask = (ids != 0).long()
  neg_image, neg_text = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
  temp = 0.05
  with torch.no_grad():
    out = hf(pixel_values=x, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    sim_q2t = torch.einsum('iqe,te->itq', out.image_embeds, out.text_embeds)
    sim_i2t, sim_t2i = sim_q2t.max(-1)[0] / temp, sim_q2t.permute(1, 0, 2).max(-1)[0] / temp
    targets = torch.arange(3)
    itc = (torch.nn.functional.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
           + torch.nn.functional.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
    itm_logits = hf(pixel_values=torch.cat([x, x[neg_image], x]), input_ids=torch.cat([ids, ids, ids[neg_text]]),
                    attention_mask=torch.cat([mask, mask, mask[neg_text]]),
                    use_image_text_matching_head=True).logits_per_image
    itm = torch.nn.functional.cross_entropy(itm_logits, torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0]))
    dec = ids.clone()
    dec[:, 0] = 1
    logits = _lavis_itg_logits(hf, head, x, dec, mask)
    labels = dec.masked_fill(dec == 0, -100)
    itg = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 60), labels[:, 1:].reshape(-1),
                                            label_smoothing=0.1)
  losses = blip2_stage1_losses(model, model.image_embeds(nhwc(x)), ids.numpy(), mask.numpy(),
                               negatives=(neg_image.numpy(), neg_text.numpy()))
  assert_close(losses['itc'], itc, 'ITC loss')
  assert_close(losses['itm'], itm, 'ITM loss')
  assert_close(losses['itg'], itg, 'ITG loss')
  assert_close(losses['loss'], itc + itm + itg, 'total')


def test_hard_negatives_never_pick_a_positive():
  import jax

  from blip_jax.losses import positives, sample_hard_negatives
  sim = jnp.zeros((4, 4))
  pos = positives(4, np.array([7, 7, 8, 9]))  # texts 0 and 1 describe the same image
  neg_image, neg_text = jax.vmap(lambda k: sample_hard_negatives(k, sim, sim, pos))(
      jax.random.split(jax.random.key(0), 200))
  assert not np.any(np.asarray(pos)[np.arange(4), np.asarray(neg_image)])
  assert not np.any(np.asarray(pos)[np.arange(4), np.asarray(neg_text)])
  assert len(np.unique(np.asarray(neg_image)[:, 3])) == 3  # every other image gets drawn


def test_blip2_model_layout(hf_stage2):
  """HF `Blip2Model` (no LM head) converts to the same stage-2 model."""
  m = transformers.Blip2Model(hf_stage2.config).eval()
  missing, unexpected = m.load_state_dict(hf_stage2.state_dict(), strict=False)
  assert not missing
  model, cfg, report = load_torch(m.state_dict(), vision={'num_heads': 2}, qformer={'num_heads': 2},
                                  opt={'num_heads': 2}, ln_vision_eps=1e-6)
  x = images(size=28)
  with torch.no_grad():
    ref = m.get_qformer_features(pixel_values=x)
  assert_close(model.query_states(model.image_embeds(nhwc(x))), getattr(ref, 'last_hidden_state', ref),
               'Q-Former query outputs')
  _compare_stage2(model, hf_stage2)


def test_lavis_clip_vit_l_alternative(tmp_path, hf_and_ours):
  """`vit_model="clip_L"`: OpenAI's ViT (one block dropped, no ln_post) then ln_vision."""
  from blip_jax.testing.torch_refs import OpenAIVisual
  hf = hf_and_ours[0]
  torch.manual_seed(1)
  clip_vit = randomize(OpenAIVisual(28, 7, 24, 3, 2, 12).eval())  # 3 blocks in the file, BLIP-2 uses 2
  lavis = {**to_lavis(hf.state_dict()), **_random_lm_head(16), 'temp': torch.tensor(0.07)}
  assert all(k.startswith(('Qformer.', 'ln_vision.', 'query_tokens', 'vision_proj.', 'text_proj.', 'itm_head.', 'temp'))
             for k in lavis), sorted(lavis)
  torch.save({'model': lavis}, tmp_path / 'blip2_clip.pth')
  torch.save(clip_vit.state_dict(), tmp_path / 'clip_vit_L.pth')
  model, cfg, report = load_torch([tmp_path / 'blip2_clip.pth', tmp_path / 'clip_vit_L.pth'],
                                  qformer={'num_heads': 2}, vision={'num_heads': 2}, bos_token_id=1)
  assert cfg.vision.depth == 2 and cfg.vision.act == 'quick_gelu' and 'visual_encoder.proj' in report.skipped
  x = images(size=28)
  with torch.no_grad():
    v = clip_vit
    tokens = v.conv1(x).flatten(2).permute(0, 2, 1)
    tokens = torch.cat([v.class_embedding + torch.zeros(2, 1, 24), tokens], 1) + v.positional_embedding
    tokens = v.transformer.resblocks[:2](v.ln_pre(tokens).permute(1, 0, 2)).permute(1, 0, 2)
    ref = torch.nn.functional.layer_norm(tokens, (24,), lavis['ln_vision.weight'], lavis['ln_vision.bias'], 1e-5)
  assert_close(model.image_embeds(nhwc(x)), ref, 'ln_vision(CLIP ViT-L states)')


def test_stage2_loss_matches_lavis_targets(tmp_path, hf_stage2):
  hf_stage2.save_pretrained(tmp_path)
  model, _, _ = load_torch(tmp_path)
  x = images(size=28)
  logits = _hf_stage2_logits(hf_stage2, x)
  # LAVIS: targets = [-100 for the queries; text with pads and the 2-token prompt -100], shifted CE.
  text_targets = TEXT.masked_fill(TEXT_MASK == 0, -100)
  text_targets[:, :2] = -100
  targets = torch.cat([torch.full((2, NUM_QUERY), -100), text_targets], 1)
  ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), targets[:, 1:].reshape(-1))
  loss = model.loss(model.image_embeds(nhwc(x)), TEXT.numpy(), TEXT_MASK.numpy(), prompt_length=2)
  assert_close(loss, ref, 'stage-2 LM loss')
