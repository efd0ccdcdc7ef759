"""The captioner and the filter: checked before anything slow runs, then loaded."""

from __future__ import annotations

import os

from blip_jax.capfilt.step import SAMPLING, Spec
from blip_jax.cli import InputError
from blip_jax.inference import Predictor

# What each role needs of its model.
ROLES = {'--captioner': ('image_embeds', 'caption_decoder'), '--filter': ('image_embeds', 'itm_logits')}


def check_model_dir(path: str, flag: str):
  """The model's (family, task, config), after checking (without loading weights) that it can
  play `flag`'s role and carries a WordPiece vocabulary."""
  from blip_jax import model_io
  if not model_io.is_model_dir(path):
    reason = 'no such directory' if not os.path.isdir(path) else f'no blip_jax {model_io.CONFIG_FILE}'
    raise InputError(f'{flag} {path}: not a blip_jax model directory ({reason}); use a training run\'s model/ '
                     'folder or convert a checkpoint with convert_torch_weights.py')
  family, task, config = model_io.model_config(path)
  missing = [m for m in ROLES[flag] if not hasattr(family.tasks[task], m)]
  if missing:
    role = 'a text decoder' if flag == '--captioner' else 'an ITM head'
    raise InputError(f'{flag} {path}: a {family.name} {task} model has no {", ".join(missing)}; the {flag[2:]} needs '
                     f'{role} (BLIP caption / pretrain as captioner, retrieval / pretrain as filter)')
  if not os.path.isfile(os.path.join(path, 'vocab.txt')):
    raise InputError(f'{flag} {path} has no vocab.txt (train.py writes it; convert with --tokenizer pointing at '
                     'bert-base-uncased)')
  return family, task, config


def check_models(captioner_dir: str, filter_dir: str) -> None:
  cap_family, _, cap = check_model_dir(captioner_dir, '--captioner')
  _, _, filt = check_model_dir(filter_dir, '--filter')
  positions = cap_family.positions(cap)
  if positions < SAMPLING['max_length']:
    raise InputError(f'--captioner {captioner_dir}: {positions} text positions, fewer than the '
                     f'{SAMPLING["max_length"]} tokens CapFilt samples')
  # The filter reads the captioner's token ids (no detokenize / retokenize round trip).
  if _read(os.path.join(captioner_dir, 'vocab.txt')) != _read(os.path.join(filter_dir, 'vocab.txt')):
    raise InputError(f'--captioner {captioner_dir} and --filter {filter_dir} have different vocab.txt files; '
                     'CapFilt needs one WordPiece vocabulary')
  sizes = cap.vision.image_size, filt.vision.image_size
  if sizes[0] != sizes[1]:
    raise InputError(f'--captioner takes {sizes[0]} px images and --filter {sizes[1]} px; CapFilt feeds both one '
                     'image batch')


def captioner_prompt(captioner_dir: str) -> str:
  from blip_jax import model_io
  return model_io.model_config(captioner_dir)[2].prompt


def load_models(captioner_dir: str, filter_dir: str) -> tuple[Predictor, Predictor]:
  """The captioner and filter (one object when they are one directory)."""
  cap = Predictor.from_pretrained(captioner_dir)
  same = os.path.realpath(filter_dir) == os.path.realpath(captioner_dir)
  return cap, cap if same else Predictor.from_pretrained(filter_dir)


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def make_spec(cap: Predictor, filt: Predictor, num_captions: int) -> Spec:
  tok, prompt = cap.tokenizer, cap.config.prompt
  return Spec(prompt=prompt, prompt_ids=tuple(int(i) for i in tok.decoder_prompt(prompt)[0]),
              num_captions=num_captions, text_length=filt.family.text_length(filt.config),
              eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
              special_ids=tuple(sorted(tok.tokenizer.all_special_ids)), shared_model=filt is cap)
