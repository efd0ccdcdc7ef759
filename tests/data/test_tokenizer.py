"""BLIP tokenizer ids and first-token rules, on a vocabulary laid out like bert-base-uncased."""

import numpy as np
import pytest

from blip_jax.data.tokenizer import BlipTokenizer

WORDS = ['a', 'dog', 'cat', 'on', 'the', 'beach', 'picture', 'of']


@pytest.fixture(scope='module')
def vocab(tmp_path_factory):
  """30522 lines with bert-base-uncased's special-token positions ([PAD] 0, [UNK] 100, [CLS] 101,
  [SEP] 102, [MASK] 103), so the added tokens land where BLIP's do."""
  lines = ['[PAD]'] + [f'[unused{i}]' for i in range(99)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
  lines += WORDS + [f'filler{i}' for i in range(30522 - len(lines) - len(WORDS))]
  path = tmp_path_factory.mktemp('vocab') / 'vocab.txt'
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def test_special_token_ids_match_blip(vocab):
  tok = BlipTokenizer(vocab)
  assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 101, 102)
  assert (tok.bos_token_id, tok.enc_token_id, tok.vocab_size) == (30522, 30523, 30524)
  blip2 = BlipTokenizer(vocab, with_enc=False)
  assert (blip2.bos_token_id, blip2.vocab_size) == (30522, 30523)
  with pytest.raises(ValueError, match='no \\[ENC\\]'):
    blip2.encode(['a dog'], 8, first_token='enc')


def test_encode_pads_truncates_and_sets_the_first_token(vocab):
  tok = BlipTokenizer(vocab)
  a, dog, on, the, beach = 104, 105, 107, 108, 109  # their lines in the vocabulary above
  ids, mask = tok.encode(['A dog on the beach', 'a dog'], max_length=6, first_token='enc')
  assert ids.dtype == np.int32 and ids.shape == mask.shape == (2, 6)
  # truncation keeps [SEP] last; the first token is [ENC]
  np.testing.assert_array_equal(ids[0], [30523, a, dog, on, the, 102])
  np.testing.assert_array_equal(ids[1], [30523, a, dog, 102, 0, 0])
  np.testing.assert_array_equal(mask[1], [1, 1, 1, 1, 0, 0])
  dec, _ = tok.encode(['a dog on the beach'], max_length=8, first_token='dec')
  assert dec[0, 0] == 30522 and dec[0, 6] == 102 and beach in dec[0]
  assert tok.decode(dec) == ['a dog on the beach']
  with pytest.raises(ValueError, match='first_token'):
    tok.encode(['a'], 4, first_token='bos')


def test_missing_vocabulary_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='vocab.txt'):
    BlipTokenizer(str(tmp_path))
