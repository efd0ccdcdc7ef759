"""The original Salesforce layout: the same weights as `.pth` files, the NLVR2 encoder and the
pretraining tie (no HF counterpart: PyTorch statements of the originals in torch_refs / here)."""

import re

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.blip import modeling_blip_text as hf_text

from blip_jax.convert import ConversionError, load_torch
from blip_jax.testing.torch_refs import (
  DEC,
  ENC,
  OVERRIDES,
  NlvrReference,
  assert_close,
  build_hf,
  hf_config,
  images,
  nhwc,
  randomize,
  text_batch,
  to_salesforce,
)


def _save(tmp_path, state_dict, name='model.pth'):
  path = tmp_path / name
  torch.save({'model': state_dict, 'epoch': 3}, path)  # what the originals' train scripts write
  return path


@pytest.mark.parametrize('cls,task', [(transformers.BlipForImageTextRetrieval, 'retrieval'),
                                      (transformers.BlipForConditionalGeneration, 'caption'),
                                      (transformers.BlipForQuestionAnswering, 'vqa')])
def test_salesforce_layout_loads_to_the_same_model(tmp_path, cls, task):
  hf = build_hf(cls)
  from_hf, _, _ = load_torch(hf.state_dict(), task=task, **OVERRIDES)
  sd = to_salesforce(hf.state_dict())
  if task == 'retrieval':  # the original also holds temp, momentum copies and queues
    sd.update(temp=torch.tensor(0.07), idx_queue=torch.zeros(1, 8, dtype=torch.long),
              ptr_queue=torch.zeros(1, dtype=torch.long), image_queue=torch.randn(16, 8),
              text_queue=torch.randn(16, 8), **{'vision_proj_m.weight': torch.randn(16, 24)})
  path = _save(tmp_path, sd)
  from_pth, _, report = load_torch(path, **OVERRIDES)  # task detected from the keys
  assert report.layout == 'salesforce' and report.task == task
  if task == 'retrieval':  # training state is reported as skipped unless asked for
    assert {'image_queue', 'ptr_queue', 'vision_proj_m.weight'} <= report.skipped.keys()
  a, b = nnx.to_flat_state(nnx.state(from_hf, nnx.Param)), nnx.to_flat_state(nnx.state(from_pth, nnx.Param))
  assert [p for p, _ in a] == [p for p, _ in b]
  for (path_, x), (_, y) in zip(a, b):
    if path_ != ('temp',):  # HF has no temp
      np.testing.assert_array_equal(x[...], y[...], err_msg=str(path_))


@pytest.mark.parametrize('merge_from', [1, 6])
def test_nlvr2_encoder_matches_original(tmp_path, merge_from):
  """merge_from=1 exercises both the averaged (layer 0) and the merged (layer 1) outputs."""
  ref = NlvrReference(merge_from).eval()
  torch.manual_seed(merge_from)
  randomize(ref)
  x0, x1 = images(seed=2), images(seed=3)
  ids, mask = text_batch()
  with torch.no_grad():
    expected = ref(x0, x1, ids, mask)
  model, cfg, report = load_torch(_save(tmp_path, ref.salesforce_state_dict()), **OVERRIDES)
  assert report.task == 'nlvr' and cfg.text.merge_from_layer == min(merge_from, 2)
  assert_close(model(nhwc(x0), nhwc(x1), ids.numpy(), mask.numpy()), expected, 'NLVR2 logits')


class PretrainReference(torch.nn.Module):
  """BLIP_Pretrain's modules, tied the way `tie_encoder_decoder_weights(text_encoder,
  text_decoder.bert, '', '/attention')` ties them: every weight of the decoder's BERT except
  those under a self-attention (`.attention.`) is the encoder's."""

  def __init__(self, queue_size=10):
    super().__init__()
    cfg = hf_config()
    self.visual_encoder = transformers.BlipVisionModel(cfg.vision_config)
    self.text_encoder = hf_text.BlipTextModel(cfg.text_config, add_pooling_layer=False)
    self.text_decoder = hf_text.BlipTextLMHeadModel(cfg.text_config)
    h, e = cfg.text_config.hidden_size, 16
    self.vision_proj = torch.nn.Linear(cfg.vision_config.hidden_size, e)
    self.text_proj = torch.nn.Linear(h, e)
    self.itm_head = torch.nn.Linear(h, 2)
    self.temp = torch.nn.Parameter(torch.tensor(0.07))
    self.visual_encoder_m = transformers.BlipVisionModel(cfg.vision_config)
    self.vision_proj_m = torch.nn.Linear(cfg.vision_config.hidden_size, e)
    self.text_encoder_m = hf_text.BlipTextModel(cfg.text_config, add_pooling_layer=False)
    self.text_proj_m = torch.nn.Linear(h, e)
    self.register_buffer('image_queue', torch.randn(e, queue_size))
    self.register_buffer('text_queue', torch.randn(e, queue_size))
    self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))
    torch.manual_seed(7)
    randomize(self)
    for name, dec in self.text_decoder.bert.named_modules():
      if hasattr(dec, 'weight') and '.attention.' not in f'.{name}.':
        enc = self.text_encoder.get_submodule(name)
        enc.weight = dec.weight
        if getattr(dec, 'bias', None) is not None:
          enc.bias = dec.bias
    self.text_decoder.tie_weights()

  def salesforce_state_dict(self):
    out = {k: v for k, v in self.state_dict().items() if not k.startswith('visual_encoder')}
    for prefix in ('visual_encoder', 'visual_encoder_m'):
      hf_keys = {f'vision_model.{k}': v for k, v in getattr(self, prefix).state_dict().items()}
      out.update({k.replace('visual_encoder.', f'{prefix}.', 1): v
                  for k, v in to_salesforce(hf_keys).items()})
    return out


@pytest.fixture(scope='module')
def pretrain_ref():
  return PretrainReference().eval()


def test_pretrain_tied_decoder_matches_original(tmp_path, pretrain_ref):
  ref = pretrain_ref
  x = images()
  ids, mask = text_batch()
  enc_ids, dec_ids = ids.clone(), ids.clone()
  enc_ids[:, 0], dec_ids[:, 0] = ENC, DEC
  with torch.no_grad():
    vis = ref.visual_encoder(x).last_hidden_state
    image_feat = torch.nn.functional.normalize(ref.vision_proj(vis[:, 0]), dim=-1)
    text = ref.text_encoder(ids, attention_mask=mask).last_hidden_state
    text_feat = torch.nn.functional.normalize(ref.text_proj(text[:, 0]), dim=-1)
    itm = ref.itm_head(ref.text_encoder(enc_ids, attention_mask=mask,
                                        encoder_hidden_states=vis).last_hidden_state[:, 0])
    logits = ref.text_decoder(dec_ids, attention_mask=mask, encoder_hidden_states=vis).logits
  model, cfg, report = load_torch(_save(tmp_path, ref.salesforce_state_dict()), **OVERRIDES)
  assert report.task == 'pretrain'
  embeds = model.image_embeds(nhwc(x))
  assert_close(model.image_features(embeds), image_feat, 'ITC image features')
  assert_close(model.text_features(model.text_embeds(ids.numpy(), mask.numpy())), text_feat,
               'ITC text features')
  assert_close(model.itm_logits(embeds, ids.numpy(), mask.numpy()), itm, 'ITM logits')
  assert_close(model.decoder_logits(embeds, ids.numpy(), mask.numpy()), logits, 'decoder logits')
  # The tie is real sharing: one Variable, so one gradient and one optimizer state.
  dec, enc = model.text_decoder.bert, model.text_encoder
  assert dec.embeddings is enc.embeddings
  assert dec.encoder.layer[1].crossattention is enc.encoder.layer[1].crossattention
  assert dec.encoder.layer[1].output is enc.encoder.layer[1].output
  assert dec.encoder.layer[1].attention is not enc.encoder.layer[1].attention
  # The pretraining model always carries its training state (momentum encoders, queues).
  assert 'image_queue' in report.converted and 'text_encoder_m.embeddings.LayerNorm.weight' in report.converted


def test_pretrain_training_state_is_loaded(tmp_path, pretrain_ref):
  sd = pretrain_ref.salesforce_state_dict()
  model, cfg, report = load_torch(_save(tmp_path, sd), **OVERRIDES)
  assert cfg.queue_size == 10 and not report.skipped.keys() & {'image_queue', 'queue_ptr'}
  np.testing.assert_array_equal(model.image_queue[...], sd['image_queue'].numpy())
  assert int(model.queue_filled[...][0]) == cfg.queue_size  # a loaded queue holds real features
  np.testing.assert_array_equal(model.text_proj_m.kernel[...], sd['text_proj_m.weight'].numpy().T)


def test_momentum_update_is_an_exponential_moving_average(tmp_path, pretrain_ref):
  model, cfg, _ = load_torch(_save(tmp_path, pretrain_ref.salesforce_state_dict()),
                             keep_training_state=True, **OVERRIDES)
  online = np.asarray(model.vision_proj.kernel[...])
  before = np.asarray(model.vision_proj_m.kernel[...])
  model.update_momentum()
  np.testing.assert_allclose(model.vision_proj_m.kernel[...], 0.995 * before + 0.005 * online, atol=1e-7)


def test_tied_weights_that_differ_are_an_error(tmp_path, pretrain_ref):
  sd = pretrain_ref.salesforce_state_dict()
  key = 'text_decoder.bert.encoder.layer.0.intermediate.dense.weight'
  sd[key] = sd[key] + 1.0
  with pytest.raises(ConversionError, match=re.escape(key)):
    load_torch(_save(tmp_path, sd), **OVERRIDES)
