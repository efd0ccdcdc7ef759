"""Model families: the one place that knows, for each family, its config class, its model
classes (one per task), its converter, its image preprocessing and its tokenizer.

    from blip_jax.registry import FAMILIES, build, family_of
    model = build('blip', 'caption', config, seed=0)      # = FAMILIES['blip'].build('caption', config)
    family_of(config).name                                # 'blip'

A *task* is what a model of the family does (`blip`: feature_extractor, retrieval, caption, vqa,
nlvr, pretrain); it is stored with every converted model. Adding a family is one entry here, its
model file under `blip_jax/models/` and its converter under `blip_jax/convert/` (README,
"Adding a model family"). Outside this file and a family's own files no code branches on a
family name: the rest asks the model for what it can do (`encode_image`, `caption_decoder`, ...).
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from blip_jax.models import blip, blip2, clip, opt
from blip_jax.models.rngs import Rngs


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  config_cls: type
  tasks: Mapping[str, Callable]  # task -> model class, built as cls(config, rngs=Rngs(seed))
  converter: str  # module of blip_jax.convert with `convert(checkpoint, *, task, strict, seed, **overrides)`
  # Checkpoint keys that identify the family's layouts ((description, key, ...): all keys present).
  signatures: tuple[tuple[str, ...], ...]
  image_transform: str | None  # evaluation preprocessing (`blip_jax.data.preprocess`), None: no images
  # 'blip': bert-base-uncased WordPiece + `[DEC]` + `[ENC]`; 'blip2': WordPiece + `[DEC]`; 'hf': the
  # checkpoint's own HuggingFace tokenizer (a bare WordPiece vocab.txt, as train.py writes, + `[DEC]`).
  tokenizer: str
  max_text_length: int  # the originals' text length for encoding (captions, queries, prompts)
  text_positions: str  # config path of the text encoder's number of positions (a cap on the length)
  default_tokenizer: str  # where a checkpoint without tokenizer files gets one (a Hub id)
  # Config fields filled from the tokenizer: dotted config path -> tokenizer attribute.
  token_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # Fields a training run sets even when it starts from a checkpoint (`init_from`).
  training_fields: tuple[str, ...] = ()

  @property
  def with_enc(self) -> bool:
    """Whether a WordPiece vocabulary gets BLIP's `[ENC]` token (`[DEC]` it always gets)."""
    return self.tokenizer == 'blip'

  def positions(self, config) -> int:
    """The text encoder's number of positions (the longest text it reads)."""
    return _get_path(config, self.text_positions)

  def text_length(self, config) -> int:
    """The length texts are padded to: the originals', capped by the positions."""
    return min(self.max_text_length, self.positions(config))

  def build(self, task: str, config, *, seed: int = 0) -> nnx.Module:
    """A randomly initialised model of `task`."""
    if task not in self.tasks:
      raise ValueError(f'{self.name} has no task {task!r}; its tasks are {sorted(self.tasks)}')
    return self.tasks[task](config, rngs=Rngs(seed))

  @property
  def convert_fn(self) -> Callable:
    """The family's converter: `convert(checkpoint, *, task, strict, seed, **overrides)` ->
    (model, config, report) (`blip_jax.convert.load_torch` calls it)."""
    return importlib.import_module(f'blip_jax.convert.{self.converter}').convert


# Checkpoint detection tries the families in this order and takes the first whose signature
# matches: BLIP-2 before BLIP (its EVA ViT has BLIP's key names), Chinese-CLIP before CLIP.
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family('blip2', blip2.Blip2Config, {'stage1': blip2.Blip2Qformer, 'stage2': blip2.Blip2OPT}, 'blip2',
           signatures=(('BLIP-2 (LAVIS `query_tokens` + `Qformer.bert.*`, HF `Blip2*`)', 'query_tokens'),),
           image_transform='blip_eval', tokenizer='blip2', max_text_length=32,  # LAVIS max_txt_len
           text_positions='qformer.max_position_embeddings', default_tokenizer='bert-base-uncased',
           token_fields={'qformer.vocab_size': 'vocab_size', 'bos_token_id': 'bos_token_id',
                         'pad_token_id': 'pad_token_id', 'sep_token_id': 'sep_token_id', 'opt.vocab_size': 'vocab_size',
                         'opt.pad_token_id': 'pad_token_id', 'opt.bos_token_id': 'cls_token_id',
                         'opt.eos_token_id': 'sep_token_id'}),
    Family('chinese_clip', clip.ChineseCLIPConfig, {'contrastive': clip.ChineseCLIP}, 'clip',
           signatures=(('Chinese-CLIP (HF `ChineseCLIPModel`)', 'vision_model.pre_layrnorm.weight',
                        'text_model.embeddings.word_embeddings.weight'),),
           image_transform='clip_eval', tokenizer='hf', max_text_length=52,  # Chinese-CLIP's context
           text_positions='text.max_position_embeddings', default_tokenizer='OFA-Sys/chinese-clip-vit-base-patch16',
           token_fields={'text.vocab_size': 'vocab_size'}),
    Family('clip', clip.CLIPConfig, {'contrastive': clip.CLIP}, 'clip',
           signatures=(('CLIP (OpenAI / open_clip `visual.conv1.weight`)', 'visual.conv1.weight'),
                       ('CLIP (HF `CLIPModel`)', 'vision_model.pre_layrnorm.weight')),
           image_transform='clip_eval', tokenizer='hf', max_text_length=77, text_positions='text.context_length',
           default_tokenizer='openai/clip-vit-base-patch32',
           token_fields={'text.vocab_size': 'vocab_size', 'text.eos_token_id': 'sep_token_id'}),
    Family('blip', blip.BlipConfig, blip.TASKS, 'blip',
           signatures=(('BLIP (Salesforce `visual_encoder.blocks.*`)', 'visual_encoder.blocks.0.attn.qkv.weight'),
                       ('BLIP (HF `vision_model.encoder.layers.*.self_attn.qkv`)',
                        'vision_model.encoder.layers.0.self_attn.qkv.weight')),
           image_transform='blip_eval', tokenizer='blip', max_text_length=35,  # retrieval / ITM / questions
           text_positions='text.max_position_embeddings', default_tokenizer='bert-base-uncased',
           token_fields={'text.vocab_size': 'vocab_size', 'bos_token_id': 'bos_token_id',
                         'enc_token_id': 'enc_token_id', 'sep_token_id': 'sep_token_id',
                         'pad_token_id': 'pad_token_id'},
           training_fields=('queue_size', 'momentum')),
    Family('opt', opt.OPTConfig, {'lm': opt.OPTForCausalLM}, 'opt',
           signatures=(('OPT (HF `model.decoder.*`)', 'model.decoder.embed_tokens.weight'),),
           image_transform=None, tokenizer='hf', max_text_length=2048, text_positions='max_position_embeddings',
           default_tokenizer='facebook/opt-125m',
           token_fields={'vocab_size': 'vocab_size', 'pad_token_id': 'pad_token_id', 'bos_token_id': 'cls_token_id',
                         'eos_token_id': 'sep_token_id'}),
]}


def get(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f'unknown model family {name!r}; expected one of {sorted(FAMILIES)}')
  return FAMILIES[name]


def family_of(config) -> Family:
  """The family whose config class `config` is."""
  for family in FAMILIES.values():
    if type(config) is family.config_cls:
      return family
  raise TypeError(f'{type(config).__name__} is not the config class of a model family '
                  f'({", ".join(f.config_cls.__name__ for f in FAMILIES.values())})')


def build(family: str, task: str, config, *, seed: int = 0) -> nnx.Module:
  return get(family).build(task, config, seed=seed)


def detect(keys) -> Family:
  """The family of a checkpoint, from its keys (`Family.signatures`)."""
  keys = set(keys)
  for family in FAMILIES.values():
    if any(all(k in keys for k in signature[1:]) for signature in family.signatures):
      return family
  known = '; '.join(s[0] for f in FAMILIES.values() for s in f.signatures)
  raise ValueError(f'unrecognised checkpoint layout (keys e.g. {sorted(keys)[:5]}); recognised layouts: {known}')


# ------------------------------------------------------------------------------ configs

def config_from_dict(cls, values: Mapping[str, Any], *, where: str = 'config'):
  """Rebuild a (nested) config dataclass from `dataclasses.asdict` output (or a run config's
  `model` section); an unknown field is an error naming it."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(values) - names
  if unknown:
    raise ValueError(f'{where}: unknown {cls.__name__} fields {sorted(unknown)}; it has {sorted(names)}')
  kwargs = {}
  for name, value in values.items():
    if isinstance(value, Mapping):  # a nested config, possibly Optional or one of several kinds
      nested = [t for t in (hints[name], *typing.get_args(hints[name])) if dataclasses.is_dataclass(t)]
      # The first kind that has every given field (CLIP's `vision`: a ViT, or a ResNet by its `layers`).
      fitting = [t for t in nested if set(value) <= {f.name for f in dataclasses.fields(t)}]
      if nested:
        value = config_from_dict((fitting or nested)[0], value, where=f'{where}.{name}')
    kwargs[name] = tuple(value) if isinstance(value, list) else value
  return cls(**kwargs)


def _replace_path(config, path: str, value):
  head, _, rest = path.partition('.')
  if not rest:
    return dataclasses.replace(config, **{head: value})
  return dataclasses.replace(config, **{head: _replace_path(getattr(config, head), rest, value)})


def _get_path(config, path: str):
  for part in path.split('.'):
    config = None if config is None else getattr(config, part)
  return config


def with_tokenizer(config, tokenizer):
  """`config` with the fields its family takes from the tokenizer (vocabulary size, special token
  ids) set from `tokenizer`. A field set to something else than its default and than the
  tokenizer's value is an error: the model would read ids the tokenizer never writes."""
  family = family_of(config)
  defaults = family.config_cls()
  for path, attr in family.token_fields.items():
    parent_path, _, field = path.rpartition('.')
    parent = _get_path(config, parent_path) if parent_path else config
    if parent is None:  # an optional part this model does not have (BLIP-2 stage 1's OPT)
      continue
    default_parent = _get_path(defaults, parent_path) if parent_path else defaults
    default = getattr(default_parent if default_parent is not None else type(parent)(), field)
    value, wanted = getattr(parent, field), getattr(tokenizer, attr)
    if value not in (default, wanted):
      raise ValueError(f'model.{path} = {value}, but the tokenizer gives {wanted}; leave it at its default to '
                       "take the tokenizer's")
    config = _replace_path(config, path, wanted)
  return config


def check_tokenizer(config, tokenizer, *, where: str = 'model') -> None:
  """A WordPiece tokenizer (`BlipTokenizer`) must give the model's vocabulary size and special
  token ids (a vocabulary of another size would put `[DEC]` elsewhere); HF tokenizers are the
  checkpoint's own and are not checked."""
  from blip_jax.data.tokenizer import BlipTokenizer
  if not isinstance(tokenizer, BlipTokenizer):
    return
  for path, attr in family_of(config).token_fields.items():
    parent_path, _, field = path.rpartition('.')
    parent = _get_path(config, parent_path) if parent_path else config
    if parent is None or getattr(parent, field) is None:
      continue
    if getattr(parent, field) != getattr(tokenizer, attr):
      raise ValueError(f'{where}: the tokenizer ({tokenizer.vocab_file}) gives {attr} = {getattr(tokenizer, attr)}, '
                       f'the model has {path} = {getattr(parent, field)} (a vocabulary of another size?)')


def with_dtype(config, dtype: str):
  """`config` with every tower computing in `dtype` (parameters stay float32)."""
  changes = {}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if f.name == 'dtype':
      changes['dtype'] = dtype
    elif dataclasses.is_dataclass(value):
      changes[f.name] = with_dtype(value, dtype)
  return dataclasses.replace(config, **changes)


__all__ = ['FAMILIES', 'Family', 'get', 'family_of', 'build', 'detect', 'config_from_dict', 'with_tokenizer',
           'check_tokenizer', 'with_dtype']
