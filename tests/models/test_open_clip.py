"""CLIP against the `open_clip` package itself (random weights, fp32, offline); see
`torch_refs.import_open_clip` for how it imports without torchvision."""

import json
import socket

import numpy as np
import pytest
import safetensors.torch
import torch

from blip_jax.convert import load_torch
from blip_jax.testing.torch_refs import assert_close, images, import_open_clip, nhwc, randomize, settle_resnet

open_clip = import_open_clip()  # installed by the README's test command (pip install --no-deps open_clip_torch)

HEADS = dict(vision={'num_heads': 2}, text={'num_heads': 2})
EOS = 7  # MetaCLIP-2-style pooling id of the 'eos' config below
TINY = dict(embed_dim=12,
            vision_cfg=dict(image_size=32, patch_size=8, width=24, head_width=12, layers=2, mlp_ratio=1.55),  # MLP 37
            text_cfg=dict(context_length=8, vocab_size=40, width=16, heads=2, layers=2))
CONFIGS = {
    'blip-jax-tiny': TINY,
    'blip-jax-tiny-quickgelu': {**TINY, 'quick_gelu': True},  # as open_clip's ViT-B-32-quickgelu.json
    'blip-jax-tiny-eos': {**TINY, 'text_cfg': {**TINY['text_cfg'], 'pool_type': 'eos', 'eos_id': EOS}},
    'blip-jax-tiny-bpe': {**TINY, 'text_cfg': {**TINY['text_cfg'], 'context_length': 77, 'vocab_size': 49408}},
    # As open_clip's RN50.json: a ModifiedResNet image tower (patch_size null), 4 pooling heads.
    'blip-jax-tiny-rn': {**TINY, 'vision_cfg': dict(image_size=64, layers=[2, 1, 1, 2], width=8, patch_size=None)},
}
# Padded to the context length (open_clip adds all its position embeddings); 39 = EOT, the largest id.
IDS = torch.tensor([[1, 5, 9, 39, 0, 0, 0, 0], [1, 4, 7, 6, 8, 39, 0, 0]])


@pytest.fixture(scope='module')
def configs(tmp_path_factory):
  """Registers the tiny configs by name, as open_clip's own `model_configs/*.json`."""
  folder = tmp_path_factory.mktemp('open_clip_configs')
  for name, cfg in CONFIGS.items():
    (folder / f'{name}.json').write_text(json.dumps(cfg))
  open_clip.add_model_config(folder)
  return CONFIGS


@pytest.fixture
def offline(monkeypatch):
  """Any connection attempt fails the test: the weights are random, the BPE ships with open_clip."""
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')

  def refuse(sock, address):
    raise AssertionError(f'network access attempted: {address}')
  monkeypatch.setattr(socket.socket, 'connect', refuse)


def _saved_open_clip(name, path, **kwargs):
  """A randomised `create_model(name)` saved to `path` and read back by open_clip's own loader."""
  torch.manual_seed(0)
  state = randomize(open_clip.create_model(name, pretrained=None, **kwargs)).state_dict()
  if path.suffix == '.safetensors':  # the HF hub file
    safetensors.torch.save_file(state, path)
  elif path.name.startswith('epoch_'):  # a training checkpoint: DDP's `module.` under 'state_dict'
    torch.save({'epoch': 1, 'name': name, 'state_dict': {'module.' + k: v for k, v in state.items()}}, path)
  else:
    torch.save(state, path)
  return open_clip.create_model(name, pretrained=str(path), **kwargs).eval()


@pytest.mark.parametrize('name,kwargs,act,filename', [
    ('blip-jax-tiny', {}, 'gelu', 'open_clip_model.safetensors'),
    ('blip-jax-tiny-quickgelu', {}, 'quick_gelu', 'open_clip_pytorch_model.bin'),
    ('blip-jax-tiny', {'force_quick_gelu': True}, 'quick_gelu', 'epoch_1.pt'),
])
def test_open_clip_features_and_logits(configs, offline, tmp_path, name, kwargs, act, filename):
  ref = _saved_open_clip(name, tmp_path / filename, **kwargs)
  quick = isinstance(ref.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
  assert quick == (act == 'quick_gelu') and ref.text_pool_type == 'argmax'
  model, cfg, report = load_torch(tmp_path / filename, act=act, **HEADS)
  assert report.layout == 'openai' and cfg.vision.act == act and cfg.text.act == act
  x = images(3, seed=4)
  with torch.no_grad():
    ref_image, ref_text = ref.encode_image(x), ref.encode_text(IDS)
    ref_logits, _ = ref.get_logits(x, IDS)
  image = model.embed_image(nhwc(x))
  text = model.embed_text(IDS.numpy(), (IDS != 0).long().numpy())
  assert_close(image, ref_image, 'image features')
  assert_close(text, ref_text, 'text features')
  assert_close(model.embed_text(IDS.numpy()), ref_text, 'text features without a mask')  # causal
  assert_close(model.logits(image, text), ref_logits, 'logits per image')
  # The activation is not in the weights: the other one gives other features.
  other, _, _ = load_torch(tmp_path / filename, act={'gelu': 'quick_gelu'}.get(act, 'gelu'), **HEADS)
  assert np.abs(np.asarray(other.embed_text(IDS.numpy())) - ref_text.numpy()).max() > 1e-3


def test_open_clip_resnet(configs, offline, tmp_path):
  """An open_clip ResNet CLIP (its own `ModifiedResNet`, random BatchNorm statistics), saved as its
  training script does."""
  torch.manual_seed(0)
  ref = randomize(open_clip.create_model('blip-jax-tiny-rn', pretrained=None)).eval()
  assert isinstance(ref.visual, open_clip.modified_resnet.ModifiedResNet)
  settle_resnet(ref.visual, images(8, size=64, seed=6))
  torch.save({'epoch': 1, 'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}}, tmp_path / 'epoch_1.pt')
  model, cfg, report = load_torch(tmp_path / 'epoch_1.pt', act='gelu', text={'num_heads': 2})
  assert report.layout == 'openai-resnet' and cfg.vision.layers == (2, 1, 1, 2) and cfg.vision.num_heads == 4
  x = images(2, size=64, seed=5)
  with torch.no_grad():
    ref_image, ref_text = ref.encode_image(x), ref.encode_text(IDS)
    ref_logits, _ = ref.get_logits(x, IDS)
  assert ref_image.std(dim=0).mean() > 0.1  # the features depend on the image
  image, text = model.embed_image(nhwc(x)), model.embed_text(IDS.numpy())
  assert_close(image, ref_image, 'image features')
  assert_close(text, ref_text, 'text features')
  assert_close(model.logits(image, text), ref_logits, 'logits per image')


def test_open_clip_eos_pooling(configs, offline, tmp_path):
  """text_cfg pool_type='eos' (MetaCLIP 2 'worldwide' configs) reads the first `eos_id`, not the
  largest id; the weights cannot tell, so it is stated as text={'eos_token_id': ...}."""
  ref = _saved_open_clip('blip-jax-tiny-eos', tmp_path / 'open_clip_model.safetensors')
  ids = torch.tensor([[1, 5, 9, EOS, 39, 0, 0, 0], [1, 4, EOS, 6, 8, 39, EOS, 0]])
  with torch.no_grad():
    ref_text = ref.encode_text(ids)
  model, cfg, _ = load_torch(tmp_path / 'open_clip_model.safetensors', act='gelu',
                             vision={'num_heads': 2}, text={'num_heads': 2, 'eos_token_id': EOS})
  assert cfg.text.eos_token_id == EOS
  assert_close(model.embed_text(ids.numpy()), ref_text, 'text features at eos')
  argmax, _, _ = load_torch(tmp_path / 'open_clip_model.safetensors', act='gelu', **HEADS)
  assert np.abs(np.asarray(argmax.embed_text(ids.numpy())) - ref_text.numpy()).max() > 1e-3


def test_open_clip_tokenizer_and_zero_shot_classifier(configs, offline, tmp_path):
  """open_clip's own BPE tokenizer and `build_zero_shot_classifier` against
  `zero_shot_classifier` / `classify` on the same token ids."""
  from blip_jax.zero_shot import classify, zero_shot_classifier
  tokenizer = open_clip.get_tokenizer('blip-jax-tiny-bpe')  # SimpleTokenizer: the vocabulary ships in the package
  assert tokenizer(['a photo of a cat'])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
  ref = _saved_open_clip('blip-jax-tiny-bpe', tmp_path / 'open_clip_model.safetensors')
  classes, templates = ['cat', 'dog', 'bird'], ['a photo of a {}.', 'a drawing of the {}.']
  x = images(4, seed=9)
  with torch.no_grad():
    weights = open_clip.build_zero_shot_classifier(ref, tokenizer, classes, templates, num_classes_per_batch=None)
    ref_prob, ref_idx = (ref.logit_scale.exp() * ref.encode_image(x, normalize=True) @ weights).softmax(-1).topk(2)
  ids = tokenizer([t.format(c) for c in classes for t in templates]).reshape(3, 2, 77)
  model, _, _ = load_torch(tmp_path / 'open_clip_model.safetensors', act='gelu', **HEADS)
  classifier = zero_shot_classifier(model, ids.numpy(), (ids != 0).long().numpy())
  assert_close(classifier, weights, 'classifier weights')
  idx, prob = classify(model, nhwc(x), classifier, k=2)
  np.testing.assert_array_equal(idx, ref_idx.numpy())
  assert_close(prob, ref_prob, 'top-2 probabilities')
