"""CLIP against HF `CLIPModel` and an OpenAI-style TorchScript archive (random weights, fp32)."""

import numpy as np
import pytest
import torch
import transformers

from blip_jax.convert import ConversionError, load_torch
from blip_jax.testing.torch_refs import OpenAICLIP, assert_close, hf_chinese_clip, hf_clip, nhwc, randomize

HEADS = dict(vision={'num_heads': 2}, text={'num_heads': 2})




# The first sequence ends with the largest id (OpenAI's EOT), the second is padded after eos=7.
IDS = torch.tensor([[1, 5, 9, 3, 49], [1, 4, 7, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


@pytest.mark.parametrize('act,eos', [('quick_gelu', 2), ('gelu', 7)])
def test_hf_clip_features_and_logits(tmp_path, act, eos):
  hf = hf_clip(act, eos)
  hf.save_pretrained(tmp_path)  # config.json tells heads, eps, activation and eos handling
  model, cfg, report = load_torch(tmp_path)
  assert report.task == 'contrastive' and cfg.vision.act == act and cfg.text.act == act
  g = torch.Generator().manual_seed(3)
  x = torch.randn(3, 3, 32, 32, generator=g)
  ids = IDS if eos == 2 else IDS.clone().index_put_((torch.tensor([0]), torch.tensor([4])), torch.tensor(7))
  with torch.no_grad():
    out = hf(input_ids=ids, pixel_values=x, attention_mask=MASK)
  image = model.embed_image(nhwc(x))
  text = model.embed_text(ids.numpy(), MASK.numpy())
  with torch.no_grad():
    ref_image = hf.get_image_features(pixel_values=x)
    ref_text = hf.get_text_features(input_ids=ids, attention_mask=MASK)
  ref_image, ref_text = _output(ref_image), _output(ref_text)
  assert_close(image, ref_image, 'image features')
  assert_close(text, ref_text, 'text features')
  assert_close(model.logits(image, text), out.logits_per_image, 'logits per image')
  # The contrastive interface: normalised features (HF's image_embeds / text_embeds), exp(logit_scale).
  assert_close(model.encode_image(nhwc(x)), out.image_embeds, 'normalised image features')
  assert_close(model.encode_text(ids.numpy(), MASK.numpy()), out.text_embeds, 'normalised text features')
  assert_close(model.itc_scale() * model.similarity(model.encode_image(nhwc(x)), model.encode_text(ids.numpy(), MASK.numpy())),
               out.logits_per_image, 'itc_scale x similarity')


def test_state_dict_without_activation_is_refused():
  hf = hf_clip('gelu', 7)
  with pytest.raises(ConversionError, match="act='quick_gelu'"):
    load_torch(hf.state_dict(), **HEADS)


def test_openai_torchscript_archive(tmp_path):
  torch.manual_seed(0)
  ref = randomize(OpenAICLIP().eval())
  g = torch.Generator().manual_seed(4)
  x = torch.randn(2, 3, 32, 32, generator=g)
  text = torch.tensor([[1, 5, 9, 39, 0, 0, 0, 0], [1, 4, 7, 6, 8, 39, 0, 0]])  # 39 = EOT, the largest id
  path = tmp_path / 'ViT-tiny.pt'
  torch.jit.trace(ref, (x, text)).save(path)
  with torch.no_grad():
    ref_image, ref_text, ref_logits = ref.visual(x), ref.encode_text(text), ref(x, text)
  model, cfg, report = load_torch(path, **HEADS)  # TorchScript: OpenAI weights, QuickGELU
  assert report.layout == 'openai' and cfg.vision.act == 'quick_gelu'
  image, txt = model.embed_image(nhwc(x)), model.embed_text(text.numpy())
  assert_close(image, ref_image, 'image features')
  assert_close(txt, ref_text, 'text features')
  assert_close(model.logits(image, txt), ref_logits, 'logits')
  # The same weights as a plain state dict need the activation stated.
  with pytest.raises(ConversionError, match='pass act='):
    load_torch(ref.state_dict(), **HEADS)
  gelu_model, cfg, _ = load_torch(ref.state_dict(), act='gelu', **HEADS)
  assert cfg.text.act == 'gelu'
  assert np.abs(np.asarray(gelu_model.embed_text(text.numpy())) - ref_text.numpy()).max() > 1e-3


def test_zero_shot_classification_matches_pytorch():
  from blip_jax.zero_shot import classify, zero_shot_classifier
  hf = hf_clip('quick_gelu', 2)
  model, _, _ = load_torch(hf.state_dict(), act='quick_gelu', **HEADS)
  g = torch.Generator().manual_seed(5)
  # 4 classes x 3 templates, prompts of 6 tokens ending in the EOT (largest id 49).
  ids = torch.randint(1, 40, (4, 3, 6), generator=g)
  ids[..., -1] = 49
  x = torch.randn(5, 3, 32, 32, generator=g)
  with torch.no_grad():
    text = hf.get_text_features(input_ids=ids.reshape(12, 6))
    image = hf.get_image_features(pixel_values=x)
    text, image = _output(text), _output(image)
    text = torch.nn.functional.normalize(text, dim=-1).reshape(4, 3, -1).mean(1)
    weights = torch.nn.functional.normalize(text, dim=-1).T
    probs = (hf.logit_scale.exp() * torch.nn.functional.normalize(image, dim=-1) @ weights).softmax(-1)
    ref_prob, ref_idx = probs.topk(3, dim=-1)
  classifier = zero_shot_classifier(model, ids.numpy())
  assert_close(classifier, weights, 'classifier weights')
  idx, prob = classify(model, nhwc(x), classifier, k=3)
  np.testing.assert_array_equal(idx, ref_idx.numpy())
  assert_close(prob, ref_prob, 'top-k probabilities')


def test_hf_chinese_clip(tmp_path):
  hf = hf_chinese_clip()
  hf.save_pretrained(tmp_path)
  model, cfg, report = load_torch(tmp_path)
  assert report.layout == 'huggingface-chinese-clip' and cfg.vision.act == 'quick_gelu'
  g = torch.Generator().manual_seed(6)
  x = torch.randn(2, 3, 32, 32, generator=g)
  ids = torch.tensor([[2, 11, 12, 13, 3], [2, 14, 3, 0, 0]])
  mask = (ids != 0).long()
  with torch.no_grad():
    out = hf(input_ids=ids, pixel_values=x, attention_mask=mask)
    ref_image = hf.get_image_features(pixel_values=x)
    ref_text = hf.get_text_features(input_ids=ids, attention_mask=mask)
  ref_image, ref_text = _output(ref_image), _output(ref_text)
  image, text = model.embed_image(nhwc(x)), model.embed_text(ids.numpy(), mask.numpy())
  assert_close(image, ref_image, 'image features')
  assert_close(text, ref_text, 'text features')
  assert_close(model.logits(image, text), out.logits_per_image, 'logits per image')


def test_named_configs_and_resized_image_size():
  from blip_jax.models import clip
  cfg = clip.clip_config('ViT-L/14-336')
  assert (cfg.vision.width, cfg.vision.patch_size, cfg.vision.grid, cfg.text.width, cfg.embed_dim) == (
      1024, 14, 24, 768, 768)
  assert cfg.vision.act == 'quick_gelu' and not cfg.vision.patch_bias and cfg.vision.pre_norm
  hf = hf_clip('quick_gelu', 2)
  model, cfg, report = load_torch(hf.state_dict(), act='quick_gelu', image_size=48, **HEADS)
  assert 'visual.pos_embed' in report.resized
  x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(7))
  with torch.no_grad():
    ref = hf.get_image_features(pixel_values=x, interpolate_pos_encoding=True)
  assert_close(model.embed_image(nhwc(x)), _output(ref), 'image features at 48 px')


def test_zero_shot_from_class_names_with_a_tokenizer(tmp_path):
  """Class names x templates -> tokenizer -> classifier -> predictions, against the PyTorch
  Chinese-CLIP (a BERT text tower, so a tiny WordPiece vocabulary written here tokenizes)."""
  from blip_jax.zero_shot import classify, tokenize_prompts, zero_shot_classifier
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'photo', 'of', 'the', 'cat', 'dog', 'bird', 'picture']
  (tmp_path / 'vocab.txt').write_text('\n'.join(words) + '\n')
  tokenizer = transformers.BertTokenizer(str(tmp_path / 'vocab.txt'))
  classes, templates = ['cat', 'dog', 'bird'], ['a photo of the {}', 'a picture of a {}']
  ids, mask = tokenize_prompts(tokenizer, classes, templates, context_length=8)
  assert ids.shape == (3, 2, 8) and tokenizer.decode(ids[1, 0], skip_special_tokens=True) == 'a photo of the dog'
  hf = hf_chinese_clip()
  hf.save_pretrained(tmp_path / 'hf')
  model, _, _ = load_torch(tmp_path / 'hf')
  x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
  with torch.no_grad():
    text = _output(hf.get_text_features(input_ids=torch.tensor(ids.reshape(6, 8)),
                                        attention_mask=torch.tensor(mask.reshape(6, 8))))
    weights = torch.nn.functional.normalize(
        torch.nn.functional.normalize(text, dim=-1).reshape(3, 2, -1).mean(1), dim=-1).T
    image = torch.nn.functional.normalize(_output(hf.get_image_features(pixel_values=x)), dim=-1)
    ref_prob, ref_idx = (hf.logit_scale.exp() * image @ weights).softmax(-1).topk(2)
  idx, prob = classify(model, nhwc(x), zero_shot_classifier(model, ids, mask), k=2)
  np.testing.assert_array_equal(idx, ref_idx.numpy())
  assert_close(prob, ref_prob, 'top-2 probabilities')
  with pytest.raises(ValueError, match='must contain'):
    tokenize_prompts(tokenizer, classes, ['a photo'])


def _output(out):
  return getattr(out, 'pooler_output', out)
