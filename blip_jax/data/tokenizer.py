"""Tokenizers behind one interface (`encode`, `decoder_prompt`, `decode`, `decode_captions`,
`save`), so inference and evaluation never ask which model family they serve:

- `BlipTokenizer`: BLIP's bert-base-uncased WordPiece plus `[DEC]` (bos) and `[ENC]`, padded to a
  fixed length (static shapes), with the originals' first-token rules. With the standard
  30522-token vocabulary, `[DEC]` = 30522 and `[ENC]` = 30523 (BLIP's vocab of 30524); BLIP-2
  adds only `[DEC]` (`with_enc=False`, 30523 tokens). The vocabulary is a local file or folder.
- `HFTokenizer`: a HuggingFace tokenizer folder (CLIP's BPE, OPT's GPT-2 BPE for BLIP-2,
  Chinese-CLIP's BERT), used as it is.
"""

from __future__ import annotations

import os

import numpy as np

FIRST_TOKENS = ('cls', 'enc', 'dec')


class BlipTokenizer:
  def __init__(self, vocab: str, *, with_enc: bool = True):
    """`vocab`: a WordPiece `vocab.txt`, or a folder holding one (a bert-base-uncased download)."""
    import transformers
    path = os.path.join(vocab, 'vocab.txt') if os.path.isdir(vocab) else vocab
    if not os.path.isfile(path):
      raise FileNotFoundError(f'WordPiece vocabulary not found: {path}')
    self.vocab_file = path
    self.tokenizer = transformers.BertTokenizer(path, do_lower_case=True)  # the vocab path is positional in 4.x and 5.x
    # The same order as the originals' init_tokenizer, so the new ids match theirs.
    self.tokenizer.add_special_tokens({'bos_token': '[DEC]'})
    if with_enc:
      self.tokenizer.add_special_tokens({'additional_special_tokens': ['[ENC]']})
    ids = self.tokenizer.convert_tokens_to_ids
    self.pad_token_id, self.cls_token_id, self.sep_token_id = ids('[PAD]'), ids('[CLS]'), ids('[SEP]')
    self.bos_token_id = ids('[DEC]')
    self.enc_token_id = ids('[ENC]') if with_enc else None

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  def encode(self, texts, max_length: int, first_token: str = 'cls'):
    """ids and mask [N, max_length] int32: `[CLS] text [SEP]` padded / truncated to
    `max_length`, the first token then set to `[CLS]`, `[ENC]` or `[DEC]`."""
    if first_token not in FIRST_TOKENS:
      raise ValueError(f'first_token must be one of {FIRST_TOKENS}, got {first_token!r}')
    if first_token == 'enc' and self.enc_token_id is None:
      raise ValueError('this tokenizer has no [ENC] token (built with with_enc=False)')
    enc = self.tokenizer(list(texts), padding='max_length', truncation=True, max_length=max_length,
                         return_tensors='np')
    ids = enc['input_ids'].astype(np.int32)
    ids[:, 0] = {'cls': self.cls_token_id, 'enc': self.enc_token_id, 'dec': self.bos_token_id}[first_token]
    return ids, enc['attention_mask'].astype(np.int32)

  def decoder_prompt(self, prompt: str):
    """The decoder's start ids [1, P]: `[DEC]` and the prompt's tokens, without `[SEP]`."""
    ids, mask = self.encode([prompt], 32, 'dec')
    return ids[:, :int(mask.sum()) - 1]

  @staticmethod
  def clean(text: str) -> str:
    """The originals' cleaning of every text BLIP reads (`pre_caption`, at most 50 words)."""
    from blip_jax.data.text import pre_caption
    return pre_caption(text, max_words=50)

  def save(self, folder: str) -> None:
    """Write `vocab.txt` into `folder` (a model directory: `[DEC]` / `[ENC]` are added on load)."""
    import shutil
    shutil.copyfile(self.vocab_file, os.path.join(folder, 'vocab.txt'))

  def decode_captions(self, ids, prompt: str) -> list[str]:
    """Generated ids [N, L] ('[DEC] prompt caption [SEP] pad') -> captions without the prompt."""
    return [self.strip_prompt(t, prompt) for t in self.decode(ids)]

  @staticmethod
  def strip_prompt(text: str, prompt: str) -> str:
    """A decoded caption without its prompt (the originals' `caption[len(prompt):]`)."""
    prompt = prompt.strip()
    return text[len(prompt):].strip() if prompt and text.startswith(prompt) else text.strip()

  def decode(self, ids) -> list[str]:
    return self.tokenizer.batch_decode(np.asarray(ids), skip_special_tokens=True)


class HFTokenizer:
  """A HuggingFace tokenizer (a folder, or a `transformers` tokenizer object) in the interface of
  `BlipTokenizer`: texts are encoded with the tokenizer's own special tokens (`first_token` has no
  meaning here), captions start from its BOS."""

  FOLDER = 'tokenizer'  # where a model directory keeps it

  def __init__(self, source):
    import transformers
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(source) if isinstance(source, (str, os.PathLike)) \
        else source
    t = self.tokenizer
    self.pad_token_id, self.bos_token_id, self.eos_token_id = t.pad_token_id, t.bos_token_id, t.eos_token_id
    self.enc_token_id = None

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  def encode(self, texts, max_length: int, first_token: str = 'cls'):
    enc = self.tokenizer(list(texts), padding='max_length', truncation=True, max_length=max_length,
                         return_tensors='np')
    return enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(np.int32)

  def token_id(self, text: str) -> int:
    """The id of `text` when it is one token (e.g. OPT's '\\n', where LAVIS's captions end)."""
    ids = self.tokenizer(text, add_special_tokens=False)['input_ids']
    if len(ids) != 1:
      raise ValueError(f'{text!r} is {len(ids)} tokens for this tokenizer, not one')
    return ids[0]

  def decoder_prompt(self, prompt: str):
    """The decoder's start ids [1, P]: BOS and the prompt's tokens."""
    return np.asarray([[self.bos_token_id, *self.tokenizer(prompt, add_special_tokens=False)['input_ids']]], np.int32)

  def decode(self, ids) -> list[str]:
    return self.tokenizer.batch_decode(np.asarray(ids), skip_special_tokens=True)

  def decode_captions(self, ids, prompt: str) -> list[str]:
    """Generated ids [N, L] (BOS, prompt, caption, ...) -> captions without the prompt."""
    return [t.strip() for t in self.decode(np.asarray(ids)[:, self.decoder_prompt(prompt).shape[1]:])]

  def save(self, folder: str) -> None:
    self.tokenizer.save_pretrained(os.path.join(folder, self.FOLDER))


HF_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json')
KINDS = ('blip', 'blip2', 'hf')  # blip_jax.registry.Family.tokenizer


def from_folder(folder: str, kind: str):
  """The tokenizer that `folder` (a model directory, or an HF model / tokenizer folder) holds for a
  model whose tokenizer kind is `kind`, or None when it holds none.

  'blip' / 'blip2': its WordPiece `vocab.txt` with `[DEC]` (+ `[ENC]` for 'blip'), as the originals
  build it; 'hf': its HuggingFace tokenizer files (in `folder/tokenizer/` for a model directory),
  or, failing those, a bare `vocab.txt` (a model train.py trained on a WordPiece vocabulary).
  """
  if kind not in KINDS:
    raise ValueError(f'tokenizer kind must be one of {KINDS}, got {kind!r}')
  folder = os.fspath(folder)
  vocab = os.path.join(folder, 'vocab.txt')
  hf_dir = os.path.join(folder, HFTokenizer.FOLDER) if os.path.isdir(os.path.join(folder, HFTokenizer.FOLDER)) \
      else folder
  has_hf = any(os.path.isfile(os.path.join(hf_dir, f)) for f in HF_FILES)
  if os.path.isfile(vocab) and (kind != 'hf' or not has_hf):
    return BlipTokenizer(vocab, with_enc=kind == 'blip')
  if has_hf:
    return HFTokenizer(hf_dir)
  return None
