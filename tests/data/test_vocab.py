"""build_wordpiece_vocab: layout, ids of [DEC] / [ENC] after it, and no [UNK] for the corpus."""

import numpy as np
import pytest

from blip_jax.data.tokenizer import BlipTokenizer
from blip_jax.data.vocab import SPECIAL_TOKENS, build_wordpiece_vocab

CORPUS = [
    'A red circle on the left.',
    'Two RED squares, a circle!',
    'Café déjà-vu: naïve façade',   # accents are stripped by uncased BERT
    '東京 tower 42nd street',        # CJK characters become words of their own
    'supercalifragilistic',         # once: whole word kept at min_count=1
]


@pytest.fixture(scope='module')
def vocab_file(tmp_path_factory):
  return build_wordpiece_vocab(CORPUS, tmp_path_factory.mktemp('v') / 'vocab.txt')


def lines(path):
  return open(path, encoding='utf-8').read().split('\n')[:-1]


def test_layout(vocab_file):
  vocab = lines(vocab_file)
  assert vocab[:5] == list(SPECIAL_TOKENS) == ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  assert len(vocab) == len(set(vocab))
  # words by frequency, ties in code-point order: 'a', 'circle', 'red' are seen twice ('A' is
  # lower-cased), then the words seen once start with '!' (the first in code-point order)
  assert vocab[5:9] == ['a', 'circle', 'red', '!']
  for word in ('cafe', 'deja', 'vu', 'naive', 'facade', '東', '京', '42nd', 'supercalifragilistic'):
    assert word in vocab, word
  # every character alone and as a continuation, e.g. 'ç' became 'c'; no accented entries
  for c in 'abcdefghijklmnopqrstuvwxyz0123456789東京':
    assert c in vocab and '##' + c in vocab
  assert not any(ch in ''.join(vocab) for ch in 'éçïà')


def test_dec_enc_follow_the_vocabulary(vocab_file):
  n = len(lines(vocab_file))
  tok = BlipTokenizer(vocab_file)
  assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 2, 3)
  assert (tok.bos_token_id, tok.enc_token_id, tok.vocab_size) == (n, n + 1, n + 2)


def test_corpus_tokenizes_without_unk(vocab_file):
  tok = BlipTokenizer(vocab_file)
  ids, mask = tok.encode(CORPUS, max_length=24, first_token='dec')
  real = ids[mask == 1]
  assert tok.tokenizer.unk_token_id == 1 and not np.any(real == 1)
  # each row: [DEC] ... [SEP], then [PAD]
  for row, m in zip(ids, mask):
    k = int(m.sum())
    assert row[0] == tok.bos_token_id and row[k - 1] == tok.sep_token_id and not row[k:].any()
  assert tok.decode(ids)[0] == 'a red circle on the left.'


def test_min_count_and_ascii_fallback(tmp_path):
  path = build_wordpiece_vocab(CORPUS, tmp_path, min_count=2)  # a directory: path/vocab.txt
  assert path == str(tmp_path / 'vocab.txt')
  vocab = lines(path)
  assert 'red' in vocab and 'supercalifragilistic' not in vocab
  tok = BlipTokenizer(path)
  # a rare word falls back to character pieces, still without [UNK]
  assert tok.tokenizer.tokenize('supercalifragilistic')[:2] == ['s', '##u']
  # ASCII text outside the corpus tokenizes thanks to include_ascii ...
  assert '[UNK]' not in tok.tokenizer.tokenize('zebra quiz #7')
  # ... and without it, a letter missing from the corpus makes [UNK]
  strict = BlipTokenizer(build_wordpiece_vocab(['abc'], tmp_path / 'strict.txt',
                                               include_ascii=False))
  assert strict.tokenizer.tokenize('cab zebra') == ['c', '##a', '##b', '[UNK]']


def test_bad_input_is_named(tmp_path):
  with pytest.raises(TypeError, match='expected strings'):
    build_wordpiece_vocab(['ok', 3], tmp_path / 'v.txt')
