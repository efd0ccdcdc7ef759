"""CLIP's ResNet image tower (OpenAI `ModifiedResNet`) against a PyTorch statement of OpenAI's
`model.py`, saved as OpenAI released its weights (a TorchScript archive); open_clip's own
ResNet CLIP is in test_open_clip.py."""

import numpy as np
import pytest
import torch
from flax import nnx

from blip_jax import model_io
from blip_jax.convert import ConversionError, load_torch
from blip_jax.convert.tree import torch_name
from blip_jax.models import clip
from blip_jax.models.clip_resnet import ModifiedResNetConfig
from blip_jax.models.variables import unique_weights
from blip_jax.testing.torch_refs import OpenAICLIP, assert_close, import_open_clip, nhwc, randomize, settle_resnet

LAYERS, WIDTH, SIZE = (2, 1, 1, 2), 8, 64  # blocks after a stage's first, a 2x2 final grid; 4 pooling heads
TEXT = torch.tensor([[1, 5, 9, 39, 0, 0, 0, 0], [1, 4, 7, 6, 8, 39, 0, 0]])  # 39 = EOT, the largest id


@pytest.fixture(scope='module')
def reference():
  torch.manual_seed(0)
  ref = randomize(OpenAICLIP(resnet=(LAYERS, WIDTH), image_size=SIZE).eval())
  g = torch.Generator().manual_seed(4)
  settle_resnet(ref.visual, torch.randn(8, 3, SIZE, SIZE, generator=g))
  x = torch.randn(3, 3, SIZE, SIZE, generator=g)
  with torch.no_grad():  # the features depend on the image (a test that can fail)
    assert ref.visual(x).std(dim=0).mean() > 0.1
  return ref, x


def test_openai_resnet_torchscript_archive(reference, tmp_path):
  ref, x = reference
  path = tmp_path / 'RN-tiny.pt'
  torch.jit.trace(ref, (x, TEXT)).save(path)
  with torch.no_grad():
    ref_image, ref_text, ref_logits = ref.visual(x), ref.encode_text(TEXT), ref(x, TEXT)
  model, cfg, report = load_torch(path, text={'num_heads': 2})
  assert report.layout == 'openai-resnet'
  assert cfg.vision == ModifiedResNetConfig(layers=LAYERS, width=WIDTH, image_size=SIZE)  # from shapes
  assert cfg.vision.num_heads == 4 and cfg.text.act == 'quick_gelu'
  assert all(k.endswith('num_batches_tracked') for k in report.skipped if k.startswith('visual.'))
  image, text = model.embed_image(nhwc(x)), model.embed_text(TEXT.numpy())
  assert_close(image, ref_image, 'image features')
  assert_close(text, ref_text, 'text features')
  assert_close(model.logits(image, text), ref_logits, 'logits')
  assert_close(model.encode_image(nhwc(x)), torch.nn.functional.normalize(ref_image, dim=-1), 'normalised features')


def test_running_statistics_are_read(reference):
  """The BatchNorm statistics are buffers, not parameters: dropping them changes the output."""
  ref, x = reference
  state = {k: v for k, v in ref.state_dict().items() if 'running_' not in k}
  with pytest.raises(ConversionError, match="missing key 'visual.bn1.running_mean'"):
    load_torch(state, act='quick_gelu', text={'num_heads': 2})
  model, _, report = load_torch(state, act='quick_gelu', strict=False, text={'num_heads': 2})
  assert 'visual.bn1.running_var' in report.missing
  with torch.no_grad():
    ref_image = ref.visual(x)
  assert np.abs(np.asarray(model.embed_image(nhwc(x))) - ref_image.numpy()).max() > 1e-2


@pytest.fixture(scope='module')
def converted(reference):
  model, cfg, _ = load_torch(reference[0].state_dict(), act='quick_gelu', text={'num_heads': 2})
  return model, cfg


def test_converted_resnet_saves_and_loads(reference, converted, tmp_path):
  ref, x = reference
  model, cfg = converted
  model_io.save(tmp_path / 'rn', model, cfg, task='contrastive')
  loaded, loaded_cfg = model_io.load(tmp_path / 'rn')
  assert loaded_cfg == cfg  # the ResNet config is rebuilt as one, not as a ViT config
  with torch.no_grad():
    ref_image = ref.visual(x)
  assert_close(loaded.embed_image(nhwc(x)), ref_image, 'image features after save / load')


def test_wrong_image_size_is_refused(reference, converted):
  _, x = reference
  model, _ = converted
  with pytest.raises(ValueError, match=rf'expected images of shape \[B, {SIZE}, {SIZE}, 3\]'):
    model.embed_image(nhwc(x[:, :, :32, :32]))


@pytest.mark.parametrize('variant', ['RN50', 'RN101', 'RN50x4', 'RN50x16', 'RN50x64'])
def test_named_resnet_configs_match_open_clip(variant):
  """`clip_config(variant)` states open_clip's config of that name (`model_configs/RN*.json`)."""
  ref = import_open_clip().get_model_config(variant)
  cfg = clip.clip_config(variant)
  v, t = ref['vision_cfg'], ref['text_cfg']
  assert (cfg.vision.layers, cfg.vision.width, cfg.vision.image_size, cfg.embed_dim) == (
      tuple(v['layers']), v['width'], v['image_size'], ref['embed_dim'])
  assert (cfg.text.width, cfg.text.num_heads, cfg.text.num_layers, cfg.text.context_length, cfg.text.vocab_size) == (
      t['width'], t['heads'], t['layers'], t['context_length'], t['vocab_size'])


def test_full_size_resnet_has_open_clips_weights():
  """Every weight of `clip_config('RN50x4')` (stem width 80, 40 pooling heads) has the name and
  shape of open_clip's RN50x4 (built on the meta device: no memory), BatchNorm statistics included."""
  open_clip = import_open_clip()
  with torch.device('meta'):
    ref = open_clip.model.CLIP(**open_clip.get_model_config('RN50x4'))
  ref_shapes = {k: tuple(v.shape) for k, v in ref.visual.state_dict().items() if not k.endswith('num_batches_tracked')}
  model = nnx.eval_shape(lambda: clip.CLIP(clip.clip_config('RN50x4'), rngs=nnx.Rngs(0)))
  ours = {}
  for path, var in unique_weights(model.visual).items():
    shape = tuple(var.shape)
    if path.endswith('.kernel'):  # torch layouts: Linear [out, in], Conv [O, I, kh, kw]
      shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    ours[torch_name(path)] = shape
  assert ours == ref_shapes
  assert ref.visual.attnpool.num_heads == model.config.vision.num_heads == 40
