"""Text cleaning and tokenization with the rules of salesforce/BLIP (REFERENCE.md section 3).

- `pre_caption` / `pre_question`: the originals' caption and question cleaning
  (`data/utils.py` of salesforce/BLIP), character for character.
- `BlipTokenizer`: `bert-base-uncased` WordPiece plus `[DEC]` (bos, id 30522 with the standard
  vocabulary) and `[ENC]` (id 30523), padded to a fixed length for static shapes, with the first
  token chosen per use: `[CLS]` for ITC / unimodal text, `[ENC]` for the image-grounded encoder
  (ITM, VQA question, NLVR2), `[DEC]` for the decoder. `[SEP]` (the decoder's eos) ends every
  sequence.
- `build_wordpiece_vocab`: a small BERT-style `vocab.txt` from a corpus, so that everything runs
  offline (the synthetic dataset writes one next to its files).
"""

from __future__ import annotations

import collections
import inspect
import os
import pathlib
import re
import string
from typing import Iterable, Sequence

import numpy as np

# The characters both cleaners remove: . ! " ( ) * # : ; ~
_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
# Two or more consecutive whitespace characters (of any kind). A single tab or newline is left
# alone by the original, and so it is here.
_WHITESPACE_RUN = re.compile(r'\s{2,}')

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
DEC_TOKEN = '[DEC]'
ENC_TOKEN = '[ENC]'


def _truncate_words(text: str, max_words: int) -> str:
  # The original splits on single spaces (so empty strings between double spaces count as
  # words) and only rejoins when there are more words than allowed.
  words = text.split(' ')
  if len(words) > max_words:
    return ' '.join(words[:max_words])
  return text


def pre_caption(caption: str, max_words: int = 50) -> str:
  """BLIP's caption cleaning.

  Lower-case; every character of `.!"()*#:;~` becomes a space; runs of two or more whitespace
  characters become one space; trailing newlines and then leading/trailing spaces are stripped;
  at most `max_words` space-separated words are kept. Other punctuation (`,?'-/`) stays.
  """
  text = _PUNCTUATION.sub(' ', caption.lower())
  text = _WHITESPACE_RUN.sub(' ', text)
  text = text.rstrip('\n').strip(' ')
  return _truncate_words(text, max_words)


def pre_question(question: str, max_ques_words: int = 50) -> str:
  """BLIP's VQA question cleaning.

  Unlike `pre_caption`: the characters of `.!"()*#:;~` are deleted (not replaced by a space),
  whitespace is not collapsed, and only trailing spaces are stripped. `?` is kept. Then at most
  `max_ques_words` space-separated words are kept.
  """
  text = _PUNCTUATION.sub('', question.lower())
  text = text.rstrip(' ')
  return _truncate_words(text, max_ques_words)


# --------------------------------------------------------------------------------------------
# WordPiece vocabulary


def _bert_pre_tokenize(text: str) -> list[str]:
  """The words BERT's WordPiece model sees: uncased BERT normalisation (clean control
  characters, space around CJK characters, strip accents, lower-case), then split on
  whitespace and punctuation. These are the `tokenizers` components the fast tokenizer uses."""
  from tokenizers.normalizers import BertNormalizer
  from tokenizers.pre_tokenizers import BertPreTokenizer
  normalized = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                              lowercase=True).normalize_str(text)
  return [word for word, _ in BertPreTokenizer().pre_tokenize_str(normalized)]


# BERT's WordPiece turns longer words into [UNK] whatever the vocabulary.
_MAX_CHARS_PER_WORD = 100


def build_wordpiece_vocab(texts: Iterable[str], path, *, min_count: int = 1,
                          include_ascii: bool = True,
                          extra_tokens: Sequence[str] = ()) -> str:
  """Writes a BERT-style `vocab.txt` for `texts` and returns its path.

  Order: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4, then `extra_tokens`, then the
  corpus's (lower-cased, accent-stripped, punctuation-split) words seen at least `min_count`
  times, most frequent first (ties alphabetical), then every single character of the corpus and
  its `##` continuation form. The characters guarantee that every word of the corpus (up to
  WordPiece's 100-character limit) tokenizes without `[UNK]`, even words below `min_count`.
  `include_ascii` adds the lower-case letters, digits and ASCII punctuation (and their `##`
  forms), so that any plain-ASCII text tokenizes too, e.g. a prompt not in the corpus.

  `path` is a file path, or an existing directory (the file is then `path/vocab.txt`).
  `[DEC]` and `[ENC]` are not written: `BlipTokenizer` adds them after the last entry.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / 'vocab.txt'
  counts = collections.Counter()
  chars = set()
  for text in texts:
    if not isinstance(text, str):
      raise TypeError(f'build_wordpiece_vocab: expected strings, got {type(text).__name__}: '
                      f'{text!r}')
    for word in _bert_pre_tokenize(text):
      if len(word) > _MAX_CHARS_PER_WORD:
        continue
      counts[word] += 1
      chars.update(word)
  if include_ascii:
    chars.update(string.ascii_lowercase + string.digits + string.punctuation)
  words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
  chars = sorted(chars)
  entries = list(SPECIAL_TOKENS) + list(extra_tokens) + words + chars + ['##' + c for c in chars]
  vocab = list(dict.fromkeys(entries))  # de-duplicate, first occurrence wins
  for token in vocab:
    if not token or any(c.isspace() for c in token):
      raise ValueError(f'build_wordpiece_vocab: token {token!r} is empty or holds whitespace')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text('\n'.join(vocab) + '\n', encoding='utf-8')
  os.replace(tmp, path)
  return str(path)


# --------------------------------------------------------------------------------------------
# Tokenizer

FIRST_TOKENS = ('cls', 'enc', 'dec')


class BlipTokenizer:
  """BLIP's tokenizer: a `transformers` BERT tokenizer plus `[DEC]` (bos) and `[ENC]`.

  Build it with `BlipTokenizer.from_vocab('vocab.txt')` (offline) or
  `BlipTokenizer.from_pretrained('bert-base-uncased')` (hub or a local directory), or wrap an
  existing BERT tokenizer. `[DEC]` and `[ENC]` get the two ids after the vocabulary, as in the
  original's `init_tokenizer()`: 30522 and 30523 with `bert-base-uncased`.
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    # The original: add_special_tokens({'bos_token': '[DEC]'}), then
    # add_special_tokens({'additional_special_tokens': ['[ENC]']}), in this order.
    if tokenizer.bos_token != DEC_TOKEN:
      tokenizer.add_special_tokens({'bos_token': DEC_TOKEN})
    if tokenizer.convert_tokens_to_ids(ENC_TOKEN) in (None, tokenizer.unk_token_id):
      tokenizer.add_special_tokens({'additional_special_tokens': [ENC_TOKEN]})
    for name in ('pad', 'cls', 'sep', 'bos', 'enc'):
      if getattr(self, f'{name}_token_id') is None:
        raise ValueError(f'BlipTokenizer: the tokenizer has no {name} token')

  @classmethod
  def from_vocab(cls, vocab_path, **kwargs) -> 'BlipTokenizer':
    """From a WordPiece `vocab.txt` (a file, or a directory holding `vocab.txt`); offline.
    `kwargs` go to the BERT tokenizer (default: uncased, like `bert-base-uncased`)."""
    from transformers import BertTokenizerFast
    vocab_path = pathlib.Path(vocab_path)
    if vocab_path.is_dir():
      vocab_path = vocab_path / 'vocab.txt'
    if not vocab_path.is_file():
      raise FileNotFoundError(f'BlipTokenizer.from_vocab: no vocabulary file at {vocab_path} '
                              '(expected a WordPiece vocab.txt, one token per line)')
    # transformers 4 names the argument `vocab_file`, transformers 5 `vocab`.
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    key = 'vocab' if 'vocab' in params else 'vocab_file'
    return cls(BertTokenizerFast(**{key: str(vocab_path)}, **kwargs))

  @classmethod
  def from_pretrained(cls, name_or_path: str = 'bert-base-uncased', **kwargs) -> 'BlipTokenizer':
    """From the hub name or a local directory, as the original's `init_tokenizer()`."""
    from transformers import BertTokenizerFast
    return cls(BertTokenizerFast.from_pretrained(name_or_path, **kwargs))

  # ids --------------------------------------------------------------------------------------
  @property
  def pad_token_id(self) -> int:
    return self.tokenizer.pad_token_id

  @property
  def cls_token_id(self) -> int:
    return self.tokenizer.cls_token_id

  @property
  def sep_token_id(self) -> int:
    """`[SEP]`: ends every sequence; the decoder's eos."""
    return self.tokenizer.sep_token_id

  eos_token_id = sep_token_id

  @property
  def unk_token_id(self) -> int:
    return self.tokenizer.unk_token_id

  @property
  def bos_token_id(self) -> int:
    """`[DEC]`: the decoder's first token."""
    return self.tokenizer.bos_token_id

  @property
  def enc_token_id(self) -> int:
    """`[ENC]`: the image-grounded encoder's first token."""
    return self.tokenizer.convert_tokens_to_ids(ENC_TOKEN)

  @property
  def vocab_size(self) -> int:
    """All ids, `[DEC]` and `[ENC]` included (30524 with `bert-base-uncased`): the size of
    the text model's embedding table."""
    return len(self.tokenizer)

  def first_token_id(self, first_token: str) -> int:
    if first_token not in FIRST_TOKENS:
      raise ValueError(f"first_token must be one of {FIRST_TOKENS}, got {first_token!r}")
    return {'cls': self.cls_token_id, 'enc': self.enc_token_id,
            'dec': self.bos_token_id}[first_token]

  # encode / decode --------------------------------------------------------------------------
  def encode(self, texts, max_length: int, first_token: str = 'cls') -> dict[str, np.ndarray]:
    """Tokenizes `texts` (a string or a list of strings) to exactly `max_length` tokens.

    Returns `{'input_ids', 'attention_mask'}`, int32 `[B, max_length]`: `first token, word
    pieces..., [SEP]`, truncated so that `[SEP]` is always kept, then `[PAD]` (0) with mask 0.
    The first token is `[CLS]` (`first_token='cls'`: ITC, unimodal text), `[ENC]` (`'enc'`: ITM,
    VQA question, NLVR2) or `[DEC]` (`'dec'`: captioning / answer decoder input).
    Texts are tokenized as given: clean them with `pre_caption` / `pre_question` first.
    """
    first_id = self.first_token_id(first_token)
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    if max_length < 2:
      raise ValueError(f'max_length must be at least 2 (first token and [SEP]), got {max_length}')
    if not texts:
      empty = np.zeros((0, max_length), np.int32)
      return {'input_ids': empty, 'attention_mask': empty.copy()}
    out = self.tokenizer(texts, padding='max_length', truncation=True, max_length=max_length,
                         return_attention_mask=True, return_token_type_ids=False)
    input_ids = np.asarray(out['input_ids'], dtype=np.int32)
    attention_mask = np.asarray(out['attention_mask'], dtype=np.int32)
    if input_ids.shape != (len(texts), max_length):
      raise AssertionError(f'tokenizer returned shape {input_ids.shape}, '
                           f'expected {(len(texts), max_length)}')
    input_ids[:, 0] = first_id
    return {'input_ids': input_ids, 'attention_mask': attention_mask}

  __call__ = encode

  def tokenize(self, text: str) -> list[str]:
    """The word pieces of `text` (no special tokens)."""
    return self.tokenizer.tokenize(text)

  def decode(self, ids, skip_special_tokens: bool = True) -> str | list[str]:
    """Text of one id sequence (1-D) or of each row (2-D); stops nowhere, so cut at `[SEP]`
    before if the sequence continues after it. Special tokens (`[DEC]`, `[ENC]`, ...) are
    dropped by default, as the original does for generated captions."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
      return self.tokenizer.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)
    return [self.tokenizer.decode(row.tolist(), skip_special_tokens=skip_special_tokens)
            for row in ids]

  def __len__(self) -> int:
    return self.vocab_size

  def __repr__(self) -> str:
    return (f'BlipTokenizer(vocab_size={self.vocab_size}, bos([DEC])={self.bos_token_id}, '
            f'enc([ENC])={self.enc_token_id})')
