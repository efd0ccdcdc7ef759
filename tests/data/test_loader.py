"""BatchLoader: deterministic order, exactly-once over processes, resumable; task example tables."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from blip_jax.data import examples as ex
from blip_jax.data.loader import BatchLoader
from blip_jax.data.tokenizer import BlipTokenizer
from blip_jax.data.transforms import image_function


class ArraySource:
  """A random-access source like `builder.as_data_source`: record i holds an image filled with i."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitems__(self, rows):
    return [{'image': np.full((4, 4, 3), r, np.uint8)} for r in rows]


def _table(n):
  return ex.Examples(np.arange(n)[:, None], ('image',), {'id': np.arange(n)})


def _loader(n=50, batch=8, **kw):
  return BatchLoader(_table(n), ArraySource(n), lambda im, seed: im[..., 0].astype(np.float32), batch, **kw)


def _epochs(n, batch, epochs, processes=2, **kw):
  """Per epoch, the example ids all processes loaded together (their valid rows), checking on
  the way that each image is its example's and the processes' parts make the 1-process batch."""
  loaders = [_loader(n, batch, process_index=p, process_count=processes, **kw) for p in range(processes)]
  single = _loader(n, batch, process_index=0, process_count=1, **kw)
  steps = loaders[0].steps_per_epoch
  seen = []
  for step in range(epochs * steps):
    parts = [loader.load(step) for loader in loaders]
    for b in parts:
      assert b['image'].shape == (batch // processes, 4, 4) and (b['image'][:, 0, 0] == b['id']).all()
    ids, valid = (np.concatenate([b[k] for b in parts]) for k in ('id', 'valid'))
    whole = single.load(step)
    assert (ids == whole['id']).all() and (valid == whole['valid']).all()
    if step % steps == 0:
      seen.append([])
    seen[-1] += ids[valid].tolist()
  return steps, seen


def test_two_processes_see_every_example_exactly_once_when_the_batch_divides_the_dataset():
  steps, seen = _epochs(48, 8, 3)
  assert steps == 6 and all(sorted(ids) == list(range(48)) for ids in seen)
  assert seen[0] != seen[1]  # each epoch in its own order


def test_a_remainder_is_dropped_from_each_epoch_but_a_different_one_each_time():
  steps, seen = _epochs(50, 8, 8)
  assert steps == 6  # floor(50 / 8)
  assert all(len(ids) == len(set(ids)) == 48 for ids in seen)  # distinct, floor(N / B) * B per epoch
  dropped = [set(range(50)) - set(ids) for ids in seen]
  assert all(len(d) == 2 for d in dropped) and len({frozenset(d) for d in dropped}) > 1
  assert set().union(*map(set, seen)) == set(range(50))  # no example left out for good


@pytest.mark.parametrize('n', [10, 12])
def test_evaluation_on_two_processes_sees_every_example_exactly_once_in_order(n):
  steps, seen = _epochs(n, 4, 1, shuffle=False, drop_remainder=False)
  assert steps == -(-n // 4) and seen == [list(range(n))]


def _devices_run(devices, *args):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu'}
  return subprocess.Popen([sys.executable, str(pathlib.Path(__file__).parents[1] / 'helpers' / 'loader_devices.py'), *args],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _devices_ok(proc):
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0 and 'ok ' in output, output[-3000:]


def test_global_batches_are_sharded_row_by_row_on_8_devices():
  """Global `jax.Array`s on meshes 8x1, 4x2 and a reversed device order: each device's shard holds
  the rows of the 1-process batch at its place (tests/helpers/loader_devices.py)."""
  _devices_ok(_devices_run(8))


def test_two_processes_of_4_devices_each_load_the_rows_their_devices_hold():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = [_devices_run(4, '--process_id', str(i), '--num_processes', '2', '--port', str(port)) for i in range(2)]
  for proc in procs:
    _devices_ok(proc)


def test_same_seed_same_batches_and_resume_continues_with_the_next_batch():
  straight = [b['id'] for b in _loader(seed=3).iterate(0, 10)]
  assert all((a == b['id']).all() for a, b in zip(straight, _loader(seed=3).iterate(0, 10)))
  assert not all((a == b['id']).all() for a, b in zip(straight, _loader(seed=4).iterate(0, 10)))
  loader = _loader(seed=3)
  state = loader.state(7)  # as checkpointed after 7 steps
  resumed = [b['id'] for b in _loader(seed=3).iterate(state['step'], 3)]
  assert all((a == b).all() for a, b in zip(straight[7:], resumed)) and len(resumed) == 3


def test_eval_pads_the_last_batch_and_marks_it_invalid():
  loader = _loader(n=10, batch=4, shuffle=False, drop_remainder=False)
  batches = list(loader.epoch())
  assert len(batches) == 3
  valid = np.concatenate([b['valid'] for b in batches])
  ids = np.concatenate([b['id'] for b in batches])
  assert valid.sum() == 10 and (ids[valid] == np.arange(10)).all()
  assert (ids[~valid] == 0).all() and not valid[10:].any()  # padding: copies of example 0, marked


def test_batch_not_divisible_by_processes_is_an_error():
  with pytest.raises(ValueError, match='global batch 9 is not divisible by the 2 processes'):
    _loader(batch=9, process_index=0, process_count=2)


@pytest.fixture(scope='module')
def tiny(scenes_builder, scenes_vocab):
  return scenes_builder, BlipTokenizer(scenes_vocab), ex.read_text_fields(scenes_builder, 'train')


def test_task_tables_shapes_dtypes_and_ranges(tiny):
  builder, tok, records = tiny
  vocab = tok.vocab_size
  pairs = ex.pairs('synthetic_scenes', records, tok, 16, prompt='a picture of ')
  assert len(pairs) == 5 * len(records) and pairs.columns['text_ids'].shape == (80, 16)
  assert pairs.columns['text_ids'].dtype == np.int32 and pairs.columns['text_ids'].min() >= 0
  assert pairs.columns['text_ids'].max() < vocab and set(np.unique(pairs.columns['text_mask'])) == {0, 1}
  # Captions of one image share its id; the image record is the caption's record.
  assert (pairs.columns['image_id'] == pairs.records[:, 0]).all()
  assert tok.decode(pairs.columns['text_ids'][:1])[0].startswith('a picture of ')
  vqa = ex.vqa('synthetic_scenes', records, tok, 16, 6, num_answers=3)
  assert vqa.columns['answer_ids'].shape == (len(vqa), 3, 6)
  assert (vqa.columns['weights'][:, 0] == 1).all() and (vqa.columns['weights'][:, 1:] == 0).all()
  assert (vqa.columns['answer_ids'][:, 0, 0] == tok.bos_token_id).all()
  nlvr = ex.nlvr('synthetic_scenes', records, tok, 16)
  assert nlvr.image_keys == ('image', 'pair_image') and set(np.unique(nlvr.columns['label'])) <= {0, 1}
  index = ex.retrieval_index('synthetic_scenes', records, tok, 16)
  assert len(index.texts) == 5 * len(records)
  assert all((index.txt2img[t] == i).all() for i, t in enumerate(index.img2txt))


def test_synthetic_vqa_and_nlvr_batches_hold_their_records_text_and_images(tiny):
  builder, tok, records = tiny
  source = builder.as_data_source('train')
  full = source.__getitems__(list(range(len(source))))
  as_is = lambda im, seed: im.astype(np.float32)  # noqa: E731
  vqa = ex.vqa('synthetic_scenes', records, tok, 16, 6, num_answers=2)
  assert len(vqa) == sum(len(r['questions']) for r in records)
  batch = BatchLoader(vqa, source, as_is, 8, seed=2).load(1)
  rows = BatchLoader(vqa, source, as_is, 8, seed=2).indices(1)
  question_of = [(r, q) for r, rec in enumerate(records) for q in range(len(rec['questions']))]
  for b, row in enumerate(rows):
    r, q = question_of[row]
    assert vqa.records[row, 0] == r and (batch['image'][b] == full[r]['image']).all()
    assert tok.decode(batch['question_ids'][b:b + 1]) == [ex.pre_question(records[r]['questions'][q].decode())]
    assert tok.decode(batch['answer_ids'][b]) == [records[r]['answers'][q].decode(), '']
    assert batch['weights'][b].tolist() == [1.0, 0.0]
  nlvr = ex.nlvr('synthetic_scenes', records, tok, 24)
  batch = BatchLoader(nlvr, source, as_is, 8, shuffle=False).load(1)
  for b, r in enumerate(range(8, 16)):
    assert (batch['image0'][b] == full[r]['image']).all() and (batch['image1'][b] == full[r]['pair_image']).all()
    assert batch['label'][b] == records[r]['label'] and tok.decode(batch['text_ids'][b:b + 1]) == [
        ex.pre_caption(records[r]['statement'].decode())]
  assert set(batch['label'].tolist()) <= {0, 1} and batch['label'].dtype == np.int32


def test_augmented_batches_are_reproducible_and_in_range(tiny):
  builder, tok, records = tiny
  pairs = ex.pairs('synthetic_scenes', records, tok, 16)
  source = builder.as_data_source('train')
  make = lambda: BatchLoader(pairs, source, image_function('blip_train', 24), 8, seed=1)
  a, b = make().load(3), make().load(3)
  assert a['image'].shape == (8, 24, 24, 3) and a['image'].dtype == np.float32
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['image'].min() > -2.0 and a['image'].max() < 2.3  # CLIP-normalized [0, 1] pixels
  # Another epoch augments the same example differently.
  loader = make()
  row = loader.indices(0)[0]
  later = next(s for s in range(loader.steps_per_epoch, 2 * loader.steps_per_epoch) if row in loader.indices(s))
  first = loader.load(0)['image'][0]
  again = loader.load(later)['image'][list(loader.indices(later)).index(row)]
  assert not np.allclose(first, again)


def test_read_text_fields_decodes_no_image_and_reads_a_chunk_at_a_time(tiny, monkeypatch):
  import tensorflow_datasets as tfds
  builder, _, records = tiny
  source = builder.as_data_source('train')
  full = source.__getitems__(list(range(len(source))))
  reads, as_data_source = [], builder.as_data_source

  class Counted:
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitems__(self, rows):
      reads.append(len(rows))
      return self.source.__getitems__(rows)

  def decode_forbidden(*args, **kwargs):
    raise AssertionError('an image was decoded')

  monkeypatch.setattr(builder, 'as_data_source', lambda *a, **kw: Counted(as_data_source(*a, **kw)))
  monkeypatch.setattr(tfds.features.Image, 'decode_example_np', decode_forbidden)
  monkeypatch.setattr(tfds.features.Image, 'decode_example', decode_forbidden)
  with pytest.raises(AssertionError, match='an image was decoded'):  # the trap works
    as_data_source('train')[0]
  again = ex.read_text_fields(builder, 'train', chunk=5)
  assert reads == [5, 5, 5, 1]  # 16 records, never more than a chunk in memory
  assert len(again) == len(full)
  assert all(sorted(r) == sorted(set(f) - {'image', 'pair_image'}) for r, f in zip(again, full))
  for r, f, first in zip(again, full, records):
    for k in r:
      np.testing.assert_array_equal(np.asarray(r[k]), np.asarray(f[k]), err_msg=k)
      np.testing.assert_array_equal(np.asarray(r[k]), np.asarray(first[k]), err_msg=k)


class MockCocoSource:
  """What `as_data_source` of a prepared coco_captions returns, with tfds's random mock examples:
  decoded records, or serialized tf.Examples for `DeserializeMethod.RAW_BYTES`. (TFDS 4.9's own
  mock cannot serialize coco_captions' sequences of dicts, nor batch-read: `__getitems__` drops `self`.)"""

  def __init__(self, features, num_examples, deserialize_method=None):
    from tensorflow_datasets.testing import mocking
    self.features, self.n, self.raw = features, num_examples, deserialize_method is not None and (
        deserialize_method.name == 'RAW_BYTES')
    self.generator = mocking.RandomFakeGenerator(features, num_examples)

  def __len__(self):
    return self.n

  def example(self, r):
    example = self.generator[r]
    for k, v in example.items():  # the generator draws each field of a sequence of dicts its own length
      if isinstance(v, dict):  # (and invalid boxes: no objects then)
        n = 0 if k == 'objects' else min(len(x) for x in v.values())
        example[k] = {name: x[:n] for name, x in v.items()}
    return example

  def __getitems__(self, rows):
    examples = [self.example(r) for r in rows]
    if self.raw:
      return [self.features.serialize_example(e) for e in examples]
    return [self.features.deserialize_example_np(self.features.serialize_example(e)) for e in examples]


def test_coco_captions_catalog_adapter_on_mock_data(tiny):
  import tensorflow_datasets as tfds

  from blip_jax.data import datasets
  _, tok, _ = tiny
  splits = []

  def as_data_source(builder, split, decoders=None, deserialize_method=None, **kwargs):
    assert decoders is None
    splits.append(split)
    return MockCocoSource(builder.info.features, 3, deserialize_method)

  with tfds.testing.mock_data(num_examples=3, as_data_source_fn=as_data_source):
    builder = datasets.builder({'name': 'coco_captions'})
    records = ex.read_text_fields(builder, 'validation')
    source = ex.data_source(builder, 'validation')
    ex.data_source(builder, 'train')
  assert splits == ['val', 'val', 'train']  # the configs' 'validation' is coco_captions' (Karpathy) 'val'
  full = source.__getitems__([0, 1, 2])
  assert 'image' not in records[0] and all(int(r['image/id']) == int(f['image/id']) for r, f in zip(records, full))
  captions = [[t.decode() for t in r['captions']['text']] for r in full]
  assert [[t.decode() for t in r['captions']['text']] for r in records] == captions and min(map(len, captions)) > 0
  pairs = ex.pairs('coco_captions', records, tok, 12)
  assert len(pairs) == sum(map(len, captions))
  # Every caption row points at its record, and rows of one record share its image id.
  owner = np.repeat(np.arange(3), [len(c) for c in captions])
  assert (pairs.records[:, 0] == owner).all()
  np.testing.assert_array_equal(pairs.columns['text_ids'],
                                tok.encode([ex.pre_caption(c) for caps in captions for c in caps], 12)[0])
  ids = pairs.columns['image_id']
  assert all(len(set(ids[owner == r].tolist())) == 1 for r in range(3)) and len(set(ids.tolist())) == 3
  # Batches carry each row's own image (here its shape and pixel sum) and text.
  signature = lambda im, seed: np.asarray([*im.shape, im.astype(np.int64).sum()], np.float32)  # noqa: E731
  batch = BatchLoader(pairs, source, signature, len(pairs), shuffle=False, drop_remainder=False).load(0)
  for row, r in enumerate(owner):
    np.testing.assert_array_equal(batch['image'][row], signature(full[r]['image'], None))
  np.testing.assert_array_equal(batch['text_ids'], pairs.columns['text_ids'])
  index = ex.retrieval_index('coco_captions', records, tok, 12)
  assert index.texts == [ex.pre_caption(c) for caps in captions for c in caps]
  assert (index.txt2img == owner).all() and (index.image_records == np.arange(3)).all()
