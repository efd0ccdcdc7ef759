"""BLIP's tokenizer: bert-base-uncased WordPiece plus `[DEC]` (bos) and `[ENC]`, padded to a
fixed length (static shapes), with the originals' first-token rules.

With the standard 30522-token vocabulary, `[DEC]` = 30522 and `[ENC]` = 30523 (BLIP's vocab of
30524); BLIP-2 adds only `[DEC]` (`with_enc=False`, 30523 tokens). The vocabulary comes from a
local file or folder, so nothing is downloaded.
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
  def strip_prompt(text: str, prompt: str) -> str:
    """A decoded caption without its prompt (the originals' `caption[len(prompt):]`)."""
    prompt = prompt.strip()
    return text[len(prompt):].strip() if prompt and text.startswith(prompt) else text.strip()

  def decode(self, ids) -> list[str]:
    return self.tokenizer.batch_decode(np.asarray(ids), skip_special_tokens=True)
