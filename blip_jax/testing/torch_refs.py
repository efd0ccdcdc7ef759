"""Tiny PyTorch reference models and helpers shared by the tests.

Sizes are odd on purpose (an FFN of 37, 2 heads of 12) so that a transposed or mis-split weight
changes the numbers instead of cancelling out.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import re
import sys
import types

import numpy as np
import torch
import transformers

TOL = 1e-5

# Special tokens of the tiny vocabulary (the real ones are 101, 30522, 30523, 102).
CLS, DEC, ENC, SEP, PAD, VOCAB = 2, 97, 98, 3, 0, 99

VISION = dict(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8, layer_norm_eps=1e-6)
TEXT = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=40, bos_token_id=DEC, sep_token_id=SEP,
            pad_token_id=PAD, layer_norm_eps=1e-12)
EMBED_DIM = 16

# What `load_torch` cannot read from shapes alone for these tiny models (BLIP uses 64-dim heads).
OVERRIDES = dict(vision={'num_heads': 2}, text={'num_heads': 2}, bos_token_id=DEC, enc_token_id=ENC,
                 sep_token_id=SEP)


def write_vocab(path) -> str:
  """A WordPiece vocab.txt of the tiny vocabulary: with BLIP's `[DEC]` and `[ENC]` added it has
  `VOCAB` tokens and the ids above (what `BlipTokenizer` makes of it), so the tiny models'
  converted directories carry a tokenizer that fits them."""
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'dog', 'cat', 'on', 'the', 'beach', 'picture', 'of']
  words += [f'w{i}' for i in range(DEC - len(words))]
  with open(path, 'w') as f:
    f.write('\n'.join(words) + '\n')
  return str(path)


def word_tokenizer(words, folder, *, bos: str, eos: str, pad: str, specials=()):
  """A HuggingFace fast tokenizer over a fixed word list (ids in list order; words split at
  spaces, so '\\n' is a word), which adds `bos` ... `eos` around every text, saved to `folder`:
  a stand-in for OPT's or CLIP's tokenizer files that fits a tiny model's vocabulary."""
  import tokenizers
  vocab = {w: i for i, w in enumerate(words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=words[3]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(' ', behavior='removed')
  tok.decoder = tokenizers.decoders.WordPiece(prefix='##')  # joins words with spaces
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single=f'{bos} $A {eos}', special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                              unk_token=words[3], additional_special_tokens=list(specials))
  fast.save_pretrained(folder)
  return fast


def hf_config(**text_overrides) -> transformers.BlipConfig:
  return transformers.BlipConfig(vision_config=VISION, text_config={**TEXT, **text_overrides},
                                 image_text_hidden_size=EMBED_DIM)


def randomize(model):
  """Random weights everywhere (HF zero-inits some biases and LayerNorms), so every tensor
  matters; tied weights stay tied."""
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return model


def build_hf(cls, seed=0, **text_overrides):
  torch.manual_seed(seed)
  model = randomize(cls(hf_config(**text_overrides)).eval())
  model.tie_weights()
  return model


# Tiny HF CLIP / Chinese-CLIP / OPT / BLIP-2 models.
CLIP_VISION = dict(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8)
CLIP_TEXT = dict(vocab_size=50, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=12)


def hf_clip(act='quick_gelu', eos_token_id=2):
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(vision_config={**CLIP_VISION, 'hidden_act': act},
                                text_config={**CLIP_TEXT, 'hidden_act': act, 'eos_token_id': eos_token_id},
                                projection_dim=20)
  return randomize(transformers.CLIPModel(cfg).eval())


def hf_chinese_clip():
  torch.manual_seed(0)
  cfg = transformers.ChineseCLIPConfig(
      vision_config=CLIP_VISION,
      text_config=dict(vocab_size=60, hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=20, type_vocab_size=2),
      projection_dim=20)
  return randomize(transformers.ChineseCLIPModel(cfg).eval())


def hf_opt(**kw):
  torch.manual_seed(0)
  cfg = transformers.OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, ffn_dim=37,
                               num_attention_heads=2, max_position_embeddings=24, **kw)
  return randomize(transformers.OPTForCausalLM(cfg).eval())


BLIP2_QUERIES, BLIP2_IMAGE_TOKEN = 4, 39
BLIP2_VISION = dict(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                    image_size=28, patch_size=7, qkv_bias=True, layer_norm_eps=1e-6)


def _zero_eva_key_bias(model):
  with torch.no_grad():  # EVA has no key bias: keep the middle third of HF's fused bias at zero
    for layer in model.vision_model.encoder.layers:
      width = layer.self_attn.qkv.bias.shape[0] // 3
      layer.self_attn.qkv.bias[width:2 * width] = 0
  return model


def hf_blip2_retrieval(**qformer):
  torch.manual_seed(0)
  cfg = transformers.Blip2Config(
      vision_config=BLIP2_VISION,
      qformer_config={**dict(vocab_size=60, hidden_size=16, intermediate_size=37, num_hidden_layers=3,
                             num_attention_heads=2, max_position_embeddings=20, cross_attention_frequency=2,
                             encoder_hidden_size=24, use_qformer_text_input=True), **qformer},
      num_query_tokens=BLIP2_QUERIES, image_text_hidden_size=12)
  return _zero_eva_key_bias(randomize(transformers.Blip2ForImageTextRetrieval(cfg).eval()))


def hf_blip2_opt():
  torch.manual_seed(0)
  cfg = transformers.Blip2Config(
      vision_config=BLIP2_VISION,
      qformer_config=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                          cross_attention_frequency=1, encoder_hidden_size=24),
      text_config=dict(model_type='opt', vocab_size=40, hidden_size=20, num_hidden_layers=2, ffn_dim=37,
                       num_attention_heads=2, max_position_embeddings=30),
      num_query_tokens=BLIP2_QUERIES, image_token_index=BLIP2_IMAGE_TOKEN)
  model = _zero_eva_key_bias(randomize(transformers.Blip2ForConditionalGeneration(cfg).eval()))
  model.tie_weights()
  return model


def images(batch=2, size=32, seed=1):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(batch, 3, size, size, generator=g)


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).numpy()


def text_batch(first_token=CLS):
  """Two sequences, the second padded, as [B, T] ids and mask (torch)."""
  ids = torch.tensor([[first_token, 5, 6, 7, 8, SEP], [first_token, 9, 10, SEP, PAD, PAD]])
  return ids, (ids != PAD).long()


def assert_close(actual, expected, name, atol=TOL):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected.detach().numpy() if torch.is_tensor(expected) else expected, np.float64)
  assert actual.shape == expected.shape, f'{name}: shape {actual.shape} != reference {expected.shape}'
  err = np.abs(actual - expected).max()
  assert err <= atol, f'{name}: max abs difference {err:.3g} > {atol}'


# HF key -> original Salesforce key, written out from REFERENCE.md section 8 independently of
# the converter's own table.
_HF_TO_SALESFORCE = [
    ('vision_model.embeddings.class_embedding', 'visual_encoder.cls_token'),
    ('vision_model.embeddings.position_embedding', 'visual_encoder.pos_embed'),
    ('vision_model.embeddings.patch_embedding', 'visual_encoder.patch_embed.proj'),
    ('vision_model.post_layernorm', 'visual_encoder.norm'),
    ('vision_model.encoder.layers', 'visual_encoder.blocks'),
    ('layer_norm1', 'norm1'), ('layer_norm2', 'norm2'),
    ('self_attn.qkv', 'attn.qkv'), ('self_attn.projection', 'attn.proj'),
]


def to_salesforce(state_dict) -> dict[str, torch.Tensor]:
  """An HF BLIP state dict in the original layout: what `torch.save({'model': ...})` held."""
  out = {}
  for key, value in state_dict.items():
    for hf, sf in _HF_TO_SALESFORCE:
      key = key.replace(hf, sf)
    out[key] = value.clone()
  return out


# ----------------------------------------------------------------------------------------------
# NLVR2 encoder: a PyTorch statement of salesforce/BLIP `models/nlvr_encoder.py` (one layer of
# self-attention, two cross-attentions whose outputs are averaged before `merge_from` and merged
# by `merge_layer(cat(...))` from then on, FFN), built from HF's BLIP text blocks.
from transformers.models.blip import modeling_blip_text as hf_text  # noqa: E402


class TwinOutput(torch.nn.Module):
  def __init__(self, h, merge, eps):
    super().__init__()
    self.dense0, self.dense1 = torch.nn.Linear(h, h), torch.nn.Linear(h, h)
    self.merge_layer = torch.nn.Linear(2 * h, h) if merge else None
    self.LayerNorm = torch.nn.LayerNorm(h, eps=eps)

  def forward(self, x0, x1, residual):
    x0, x1 = self.dense0(x0), self.dense1(x1)
    x = self.merge_layer(torch.cat([x0, x1], -1)) if self.merge_layer is not None else (x0 + x1) / 2
    return self.LayerNorm(x + residual)


class TwinCross(torch.nn.Module):
  def __init__(self, cfg, merge):
    super().__init__()
    self.self0 = hf_text.BlipTextSelfAttention(cfg, is_cross_attention=True)
    self.self1 = hf_text.BlipTextSelfAttention(cfg, is_cross_attention=True)
    self.output = TwinOutput(cfg.hidden_size, merge, cfg.layer_norm_eps)


class NlvrLayer(torch.nn.Module):
  def __init__(self, cfg, index, merge_from):
    super().__init__()
    self.attention = hf_text.BlipTextAttention(cfg)
    self.crossattention = TwinCross(cfg, index >= merge_from)
    self.intermediate = hf_text.BlipTextIntermediate(cfg)
    self.output = hf_text.BlipTextOutput(cfg)

  def forward(self, x, bias, images):
    x = self.attention(x, attention_mask=bias)[0]
    c0 = self.crossattention.self0(x, encoder_hidden_states=images[0])[0]
    c1 = self.crossattention.self1(x, encoder_hidden_states=images[1])[0]
    x = self.crossattention.output(c0, c1, x)
    return self.output(self.intermediate(x), x)


class NlvrReference(torch.nn.Module):
  """BLIP_NLVR: HF BLIP ViT + the twin-cross-attention encoder + cls_head."""

  def __init__(self, merge_from):
    super().__init__()
    cfg = hf_config()
    tcfg = cfg.text_config
    self.vision_model = transformers.BlipVisionModel(cfg.vision_config)
    self.embeddings = hf_text.BlipTextEmbeddings(tcfg)
    self.layer = torch.nn.ModuleList([NlvrLayer(tcfg, i, merge_from)
                                      for i in range(tcfg.num_hidden_layers)])
    h = tcfg.hidden_size
    self.cls_head = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2))

  def forward(self, image0, image1, ids, mask):
    ids = ids.clone()
    ids[:, 0] = ENC
    embeds = self.vision_model(torch.cat([image0, image1])).last_hidden_state
    b = image0.shape[0]
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    x = self.embeddings(ids)
    for layer in self.layer:
      x = layer(x, bias, (embeds[:b], embeds[b:]))
    return self.cls_head(x[:, 0])

  def salesforce_state_dict(self):
    out = {}
    for key, value in self.state_dict().items():
      if key.startswith('vision_model.'):
        out.update(to_salesforce({key: value}))
      elif key.startswith(('embeddings.', 'layer.')):
        out['text_encoder.' + re.sub(r'^layer\.', 'encoder.layer.', key)] = value
      else:
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# A PyTorch statement of openai/CLIP `model.py` (ViT image tower), scripted and saved the way
# OpenAI released its weights.


class QuickGELU(torch.nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(torch.nn.Module):
  def __init__(self, width, heads, attn_mask=None):
    super().__init__()
    self.attn = torch.nn.MultiheadAttention(width, heads)
    self.ln_1 = torch.nn.LayerNorm(width)
    self.mlp = torch.nn.Sequential()
    self.mlp.add_module('c_fc', torch.nn.Linear(width, 4 * width))
    self.mlp.add_module('gelu', QuickGELU())
    self.mlp.add_module('c_proj', torch.nn.Linear(4 * width, width))
    self.ln_2 = torch.nn.LayerNorm(width)
    self.attn_mask = attn_mask

  def forward(self, x):
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
    return x + self.mlp(self.ln_2(x))


class OpenAIVisual(torch.nn.Module):
  def __init__(self, size, patch, width, layers, heads, out):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
    self.class_embedding = torch.nn.Parameter(torch.randn(width))
    self.positional_embedding = torch.nn.Parameter(torch.randn((size // patch) ** 2 + 1, width))
    self.ln_pre = torch.nn.LayerNorm(width)
    self.transformer = torch.nn.Module()
    self.transformer.resblocks = torch.nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
    self.ln_post = torch.nn.LayerNorm(width)
    self.proj = torch.nn.Parameter(torch.randn(width, out))

  def forward(self, x):
    x = self.conv1(x).flatten(2).permute(0, 2, 1)
    cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
    x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
    return self.ln_post(x[:, 0]) @ self.proj


class OpenAIBottleneck(torch.nn.Module):
  """`model.py` Bottleneck: 1x1, 3x3, avg-pool when strided, 1x1 (x4); shortcut avg-pool + 1x1."""

  def __init__(self, cin, planes, stride):
    super().__init__()
    bn, conv = torch.nn.BatchNorm2d, torch.nn.Conv2d
    self.conv1, self.bn1 = conv(cin, planes, 1, bias=False), bn(planes)
    self.conv2, self.bn2 = conv(planes, planes, 3, padding=1, bias=False), bn(planes)
    self.avgpool = torch.nn.AvgPool2d(stride) if stride > 1 else torch.nn.Identity()
    self.conv3, self.bn3 = conv(planes, planes * 4, 1, bias=False), bn(planes * 4)
    self.downsample = None
    if stride > 1 or cin != planes * 4:
      self.downsample = torch.nn.Sequential(collections.OrderedDict([
          ('-1', torch.nn.AvgPool2d(stride)), ('0', conv(cin, planes * 4, 1, bias=False)), ('1', bn(planes * 4))]))

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(self.avgpool(out)))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class OpenAIResNet(torch.nn.Module):
  """`model.py` ModifiedResNet: three-conv stem, four stages, attention pooling."""

  def __init__(self, layers, out, heads, size, width):
    super().__init__()
    conv = torch.nn.Conv2d
    self.conv1, self.bn1 = conv(3, width // 2, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(width // 2)
    self.conv2, self.bn2 = conv(width // 2, width // 2, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width // 2)
    self.conv3, self.bn3 = conv(width // 2, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width)
    cin = width
    for i, blocks in enumerate(layers):
      planes = width * 2 ** i
      stage = [OpenAIBottleneck(cin, planes, 2 if i else 1)] + [OpenAIBottleneck(planes * 4, planes, 1)
                                                               for _ in range(blocks - 1)]
      setattr(self, f'layer{i + 1}', torch.nn.Sequential(*stage))
      cin = planes * 4
    self.attnpool = torch.nn.Module()
    dim = width * 32
    self.attnpool.positional_embedding = torch.nn.Parameter(torch.randn((size // 32) ** 2 + 1, dim))
    for name in ('q_proj', 'k_proj', 'v_proj'):
      setattr(self.attnpool, name, torch.nn.Linear(dim, dim))
    self.attnpool.c_proj = torch.nn.Linear(dim, out)
    self.heads = heads

  def forward(self, x):
    for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
      x = torch.relu(bn(conv(x)))
    x = self.layer4(self.layer3(self.layer2(self.layer1(torch.nn.functional.avg_pool2d(x, 2)))))
    x = x.flatten(2).permute(2, 0, 1)  # [HW, B, C]
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + self.attnpool.positional_embedding[:, None]
    p = self.attnpool
    out, _ = torch.nn.functional.multi_head_attention_forward(
        query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.heads,
        q_proj_weight=p.q_proj.weight, k_proj_weight=p.k_proj.weight, v_proj_weight=p.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([p.q_proj.bias, p.k_proj.bias, p.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=p.c_proj.weight,
        out_proj_bias=p.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out[0]


def settle_resnet(visual, images):
  """A randomised CLIP ResNet tower (OpenAI's or open_clip's) made to behave like a trained one:
  random BatchNorm weights and biases with running statistics measured on `images` (a train-mode
  pass), and the attention pool's output projection scaled to give features of size about 1.
  With random statistics a deep ResNet's BatchNorms output little but their biases and the
  features hardly depend on the image; unscaled, fp32 rounding alone exceeds the tests' 1e-5."""
  g = torch.Generator().manual_seed(11)
  norms = [m for m in visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for proj in (visual.attnpool.q_proj, visual.attnpool.k_proj, visual.attnpool.c_proj):
      proj.weight.mul_(0.2)
    for m in norms:
      m.weight.copy_(0.5 + 0.1 * torch.randn(m.weight.shape, generator=g))
      m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
      m.reset_running_stats()
      m.momentum = None  # the statistics of the one pass, not a moving average from 0 / 1
    visual.train()
    visual(images)
  return visual.eval()


class OpenAICLIP(torch.nn.Module):
  """`resnet=(layers, width)`: the ModifiedResNet image tower (heads = width * 32 // 64)."""

  def __init__(self, ctx=8, vocab=40, width=16, layers=2, heads=2, embed=12, vision_width=24, vision_heads=2,
               resnet=None, image_size=32):
    super().__init__()
    if resnet is None:
      self.visual = OpenAIVisual(image_size, 8, vision_width, 2, vision_heads, embed)
    else:
      self.visual = OpenAIResNet(resnet[0], embed, resnet[1] * 32 // 64, image_size, resnet[1])
    mask = torch.full((ctx, ctx), float('-inf')).triu_(1)
    self.transformer = torch.nn.Module()
    self.transformer.resblocks = torch.nn.Sequential(*[ResidualAttentionBlock(width, heads, mask) for _ in range(layers)])
    self.token_embedding = torch.nn.Embedding(vocab, width)
    self.positional_embedding = torch.nn.Parameter(torch.randn(ctx, width))
    self.ln_final = torch.nn.LayerNorm(width)
    self.text_projection = torch.nn.Parameter(torch.randn(width, embed))
    self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

  def encode_text(self, text):
    x = self.token_embedding(text) + self.positional_embedding
    x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = self.ln_final(x)
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

  def forward(self, image, text):
    i, t = self.visual(image), self.encode_text(text)
    i, t = i / i.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    return self.logit_scale.exp() * i @ t.t()


def to_lavis(state_dict):
  """HF BLIP-2 weights under LAVIS's names, without the frozen ViT and LLM (as LAVIS saves them)."""
  rename = [('qformer.layernorm.', 'Qformer.bert.embeddings.LayerNorm.'), ('qformer.encoder.', 'Qformer.bert.encoder.'),
            ('.attention.attention.', '.attention.self.'), ('.crossattention.attention.', '.crossattention.self.'),
            ('embeddings.word_embeddings.', 'Qformer.bert.embeddings.word_embeddings.'),
            ('embeddings.position_embeddings.', 'Qformer.bert.embeddings.position_embeddings.'),
            ('language_projection.', 'opt_proj.'), ('vision_projection.', 'vision_proj.'),
            ('text_projection.', 'text_proj.'), ('vision_model.post_layernorm.', 'ln_vision.')]
  lavis = {}
  for key, value in state_dict.items():
    if key.startswith(('vision_model.embeddings', 'vision_model.encoder', 'language_model.')):
      continue
    for a, b in rename:
      key = key.replace(a, b) if key.startswith(a) or a.startswith('.') else key
    lavis[key] = value
  return lavis


def eva_checkpoint(state_dict, extra_blocks=1):
  """The HF BLIP-2 vision tower as LAVIS's bare `eva_vit_g.pth` keys, with `extra_blocks` copies
  of the last block appended (the file has a block that BLIP-2 drops)."""
  sd, p = state_dict, 'vision_model.'
  eva = {'cls_token': sd[p + 'embeddings.class_embedding'], 'pos_embed': sd[p + 'embeddings.position_embedding'],
         'patch_embed.proj.weight': sd[p + 'embeddings.patch_embedding.weight'],
         'patch_embed.proj.bias': sd[p + 'embeddings.patch_embedding.bias']}
  layers = sorted({int(k.split('.')[3]) for k in sd if k.startswith(p + 'encoder.layers.')})
  names = {'layer_norm1': 'norm1', 'layer_norm2': 'norm2', 'self_attn.projection': 'attn.proj',
           'self_attn.qkv': 'attn.qkv', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'}
  for i in range(len(layers) + extra_blocks):
    src = f'{p}encoder.layers.{min(i, layers[-1])}.'
    for hf_name, eva_name in names.items():
      eva[f'blocks.{i}.{eva_name}.weight'] = sd[f'{src}{hf_name}.weight']
      if hf_name != 'self_attn.qkv':
        eva[f'blocks.{i}.{eva_name}.bias'] = sd[f'{src}{hf_name}.bias']
    q, _, v = sd[f'{src}self_attn.qkv.bias'].chunk(3)
    eva[f'blocks.{i}.attn.q_bias'], eva[f'blocks.{i}.attn.v_bias'] = q, v
  return eva


# ------------------------------------------------------------------------------- open_clip


@contextlib.contextmanager
def _torchvision_stand_in():
  """`torchvision` with the names open_clip imports, only inside the `with` block; yields
  whether it stood in."""
  if 'torchvision' in sys.modules:  # a working torchvision is already loaded: use it
    yield False
    return

  class Unavailable:
    def __init__(self, *args, **kwargs):
      raise RuntimeError('torchvision is a stand-in here (open_clip transforms are not available)')

  mods = {name: types.ModuleType(name) for name in (
      'torchvision', 'torchvision.transforms', 'torchvision.transforms.functional', 'torchvision.ops',
      'torchvision.ops.misc')}
  transforms = mods['torchvision.transforms']
  for name in ('Normalize', 'Compose', 'RandomResizedCrop', 'ToTensor', 'Resize', 'CenterCrop',
               'ColorJitter', 'Grayscale'):
    setattr(transforms, name, type(name, (Unavailable,), {}))
  transforms.InterpolationMode = enum.Enum('InterpolationMode', 'NEAREST BILINEAR BICUBIC')
  transforms.functional = mods['torchvision.transforms.functional']
  mods['torchvision.ops.misc'].FrozenBatchNorm2d = type('FrozenBatchNorm2d', (Unavailable,), {})
  mods['torchvision.ops'].misc = mods['torchvision.ops.misc']
  mods['torchvision'].transforms, mods['torchvision'].ops = transforms, mods['torchvision.ops']
  sys.modules.update(mods)
  try:
    yield True
  finally:
    for name in mods:
      sys.modules.pop(name, None)


def import_open_clip():
  """The `open_clip` module (pip install --no-deps open_clip_torch).

  open_clip needs torchvision at import time only for names (its image transforms and
  `FrozenBatchNorm2d`), none of which building a ViT CLIP uses, and PyPI's torchvision does not
  load beside the CPU torch wheel. So a bare stand-in sits in `sys.modules` while `import
  open_clip` runs and is removed afterwards: transformers probes for torchvision with
  `importlib.util.find_spec` and must not find it.
  """
  with _torchvision_stand_in() as stood_in:
    import open_clip
  assert not stood_in or not any(m.split('.')[0] == 'torchvision' for m in sys.modules)
  return open_clip

