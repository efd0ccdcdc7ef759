"""A small BERT-style WordPiece `vocab.txt` from a corpus, so that everything runs offline.

`build_wordpiece_vocab(texts, path)` writes `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3,
`[MASK]`=4, then the corpus's words, then every character of the corpus alone and as a `##`
continuation, so that any word of the corpus tokenizes without `[UNK]`. `BlipTokenizer(path)`
(`blip_jax.data.tokenizer`) then adds `[DEC]` and `[ENC]` as the two ids after the last line.
"""

from __future__ import annotations

import collections
import os
import pathlib
import string
from collections.abc import Iterable, Sequence

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')

# BERT's WordPiece turns longer words into [UNK] whatever the vocabulary.
MAX_CHARS_PER_WORD = 100


def bert_words(text: str) -> list[str]:
  """The words BERT's WordPiece model sees in `text`: uncased BERT normalisation (control
  characters removed, spaces around CJK characters, accents stripped, lower-cased), then split on
  whitespace and punctuation. These are the `tokenizers` components of the uncased BERT tokenizer."""
  from tokenizers.normalizers import BertNormalizer
  from tokenizers.pre_tokenizers import BertPreTokenizer
  normalized = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                              lowercase=True).normalize_str(text)
  return [word for word, _ in BertPreTokenizer().pre_tokenize_str(normalized)]


def build_wordpiece_vocab(texts: Iterable[str], path, *, min_count: int = 1,
                          include_ascii: bool = True,
                          extra_tokens: Sequence[str] = ()) -> str:
  """Writes a BERT-style `vocab.txt` for `texts` and returns its path.

  Order: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4, then `extra_tokens`, then the
  corpus's words (as `bert_words` splits them) seen at least `min_count` times, most frequent
  first (ties alphabetical), then every single character of the corpus, then each character's
  `##` continuation form. The characters guarantee that every word of the corpus (up to
  WordPiece's 100-character limit) tokenizes without `[UNK]`, also words below `min_count`.
  `include_ascii` adds the lower-case letters, digits and ASCII punctuation (and their `##`
  forms), so that any plain-ASCII text tokenizes too, e.g. a prompt that is not in the corpus.

  `path`: a file path, or an existing directory (the file is then `path/vocab.txt`). The file is
  written to a temporary name first and renamed, so readers never see half a vocabulary.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / 'vocab.txt'
  counts = collections.Counter()
  chars = set()
  for text in texts:
    if not isinstance(text, str):
      raise TypeError(f'build_wordpiece_vocab: expected strings, got {type(text).__name__} '
                      f'{text!r}')
    for word in bert_words(text):
      if len(word) <= MAX_CHARS_PER_WORD:
        counts[word] += 1
        chars.update(word)
  if include_ascii:
    chars.update(string.ascii_lowercase + string.digits + string.punctuation)
  words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
  chars = sorted(chars)
  entries = [*SPECIAL_TOKENS, *extra_tokens, *words, *chars, *('##' + c for c in chars)]
  vocab = list(dict.fromkeys(entries))  # without repeats, first occurrence wins
  for token in vocab:
    if not token or any(c.isspace() for c in token):
      raise ValueError(f'build_wordpiece_vocab: token {token!r} is empty or holds whitespace')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text('\n'.join(vocab) + '\n', encoding='utf-8')
  os.replace(tmp, path)
  return str(path)
