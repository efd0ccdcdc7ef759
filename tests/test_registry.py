"""The model-family registry: every family's entry, checkpoint detection, the config round trip,
the fields taken from the tokenizer, and no family branching anywhere else."""

import dataclasses
import pathlib
import re
import types

import pytest

from blip_jax import registry
from blip_jax.models import blip, blip2, clip, opt
from blip_jax.train.config_base import tiny_blip, tiny_blip2, tiny_clip

ROOT = pathlib.Path(__file__).parents[1]


def test_every_family_is_registered_with_its_config_and_tasks():
  assert set(registry.FAMILIES) == {'blip', 'blip2', 'clip', 'chinese_clip', 'opt'}
  for config in (tiny_blip(), tiny_blip2(), tiny_blip2(stage2=True), tiny_clip(), clip.ChineseCLIPConfig(),
                 opt.OPTConfig()):
    family = registry.family_of(config)
    assert family.config_cls is type(config)
  assert sorted(registry.get('blip').tasks) == sorted(blip.TASKS)
  assert registry.get('blip2').tasks == {'stage1': blip2.Blip2Qformer, 'stage2': blip2.Blip2OPT}
  with pytest.raises(ValueError, match=r"unknown model family 'blip3'; expected one of"):
    registry.get('blip3')
  with pytest.raises(ValueError, match=r"blip has no task 'stage1'; its tasks are"):
    registry.build('blip', 'stage1', tiny_blip())


@pytest.mark.parametrize('keys,family', [
    (['query_tokens', 'visual_encoder.blocks.0.attn.qkv.weight'], 'blip2'),  # BLIP-2's EVA has BLIP's ViT names
    (['visual_encoder.blocks.0.attn.qkv.weight'], 'blip'),
    (['vision_model.encoder.layers.0.self_attn.qkv.weight'], 'blip'),
    (['visual.conv1.weight', 'token_embedding.weight'], 'clip'),
    (['vision_model.pre_layrnorm.weight', 'text_model.embeddings.word_embeddings.weight'], 'chinese_clip'),
    (['vision_model.pre_layrnorm.weight', 'text_model.embeddings.token_embedding.weight'], 'clip'),
    (['model.decoder.embed_tokens.weight'], 'opt')])
def test_checkpoints_are_detected_by_their_keys(keys, family):
  assert registry.detect(keys).name == family


def test_unknown_layout_names_the_known_ones():
  with pytest.raises(ValueError, match=r'recognised layouts: BLIP-2 .*CLIP.*OPT'):
    registry.detect(['encoder.weight'])


def test_config_round_trip_and_unknown_fields():
  for config in (tiny_blip(), tiny_blip2(stage2=True), tiny_clip()):
    assert registry.config_from_dict(type(config), dataclasses.asdict(config)) == config
  fields = dataclasses.asdict(tiny_blip())
  fields['text']['hiden_size'] = 3
  with pytest.raises(ValueError, match=r"config.text: unknown BertConfig fields \['hiden_size'\]"):
    registry.config_from_dict(blip.BlipConfig, fields)


TOKENIZER = types.SimpleNamespace(vocab_size=64, bos_token_id=62, enc_token_id=63, sep_token_id=3, pad_token_id=0,
                                  cls_token_id=2)


def test_token_fields_come_from_the_tokenizer():
  cfg = registry.with_tokenizer(tiny_blip(), TOKENIZER)
  assert (cfg.text.vocab_size, cfg.bos_token_id, cfg.enc_token_id, cfg.sep_token_id) == (64, 62, 63, 3)
  stage2 = registry.with_tokenizer(tiny_blip2(stage2=True), TOKENIZER)
  assert (stage2.opt.vocab_size, stage2.opt.bos_token_id, stage2.opt.eos_token_id) == (64, 2, 3)
  assert registry.with_tokenizer(tiny_blip2(), TOKENIZER).opt is None  # stage 1 has no OPT to fill
  # A field set to neither its default nor the tokenizer's value would read ids nobody writes.
  wrong = dataclasses.replace(tiny_blip(), bos_token_id=7)
  with pytest.raises(ValueError, match=r'model.bos_token_id = 7, but the tokenizer gives 62'):
    registry.with_tokenizer(wrong, TOKENIZER)


def test_with_dtype_reaches_every_tower():
  cfg = registry.with_dtype(tiny_blip2(stage2=True), 'bfloat16')
  assert cfg.vision.dtype == cfg.qformer.dtype == cfg.opt.dtype == 'bfloat16'


# What would be a decision on a family name: comparing a family (or its name) with one, or
# asking whether a config or model is one family's class.
BRANCH = re.compile(r"""(family|\.name)\s*(==|!=|\bin\b)\s*[(\[]?\s*'(blip|blip2|clip|chinese_clip|opt)'"""
                    r"""|'(blip|blip2|clip|chinese_clip|opt)'\s*(==|!=)"""
                    r"""|isinstance\([^)]*\b(blip|blip2|clip|opt)\.[A-Z]""")


def test_no_code_outside_the_registry_and_the_families_branches_on_a_family():
  own = {'registry.py'} | {f'{f}.py' for f in registry.FAMILIES}  # models/<family>.py and convert/<family>.py
  offenders = []
  for path in sorted((ROOT / 'blip_jax').rglob('*.py')) + sorted((ROOT / 'benchmarks').rglob('*.py')):
    if path.name in own:
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if BRANCH.search(line):
        offenders.append(f'{path.relative_to(ROOT)}:{number}: {line.strip()}')
  assert not offenders, offenders
