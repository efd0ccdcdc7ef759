"""The CapFilt run: the chunks still to do, sharded over the mesh, and the command line."""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
import tqdm

from blip_jax import cli, distributed, storage
from blip_jax.capfilt import data as data_lib
from blip_jax.capfilt import models, outputs
from blip_jax.capfilt.step import SAMPLING, batch_key, jitted_step
from blip_jax.cli import InputError


def prefetch(fn, items, ahead: int = 2):
  """`fn(item)` for each item, computed up to `ahead` items in advance on a thread."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) > ahead:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


class Clock:
  """Images per second from the end of the first batch on (the first call compiles)."""

  def __init__(self):
    self.start, self.images = None, 0

  def tick(self, outputs, images: int) -> None:
    if self.start is None:
      jax.block_until_ready(outputs)
      self.start = time.perf_counter()
    else:
      self.images += images

  def rate(self) -> float:
    return self.images / (time.perf_counter() - self.start) if self.images else float('nan')


@dataclasses.dataclass(frozen=True)
class Chunks:
  """The split's images in global batches of `batch_size`, `per_chunk` batches to a chunk, and
  which chunks the parts in `out` already hold."""
  out: str
  images: int
  batch_size: int
  per_chunk: int

  @property
  def num_batches(self) -> int:
    return -(-self.images // self.batch_size)

  def __len__(self) -> int:
    return -(-self.num_batches // self.per_chunk)

  def steps(self, chunk: int) -> range:
    return range(chunk * self.per_chunk, min((chunk + 1) * self.per_chunk, self.num_batches))

  def batch_images(self, step: int) -> int:
    """Real images (all processes together) in global batch `step`."""
    return min(self.batch_size, self.images - step * self.batch_size)

  def chunk_images(self, chunk: int) -> int:
    return sum(self.batch_images(s) for s in self.steps(chunk))

  def done(self, chunk: int) -> bool:
    """Complete when every process wrote its part."""
    return all(os.path.exists(outputs.part_path(self.out, p, chunk)) for p in range(jax.process_count()))

  def todo(self) -> list[int]:
    return [c for c in range(len(self)) if not self.done(c)]


class Run:
  """Captioning and filtering of the chunks a split still lacks: the models on the mesh, the loader."""

  def __init__(self, args, chunks: Chunks, b, texts, replaced, image_ids):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from blip_jax.data.examples import Examples
    from blip_jax.data.loader import BatchLoader
    from blip_jax.data.transforms import image_function
    from blip_jax.train import state as state_lib
    self.args, self.chunks = args, chunks
    self.texts, self.replaced, self.image_ids = texts, replaced, image_ids
    self.cap, self.filt = models.load_models(args.captioner, args.filter)
    self.spec = models.make_spec(self.cap, self.filt, args.num_captions)
    self.mesh = state_lib.make_mesh(-1, 1)
    table = data_lib.web_table(texts, self.filt, self.spec.text_length)
    self.loader = BatchLoader(Examples(table['record'][:, None], ('image',), table), b.as_data_source(args.split),
                              image_function(self.cap.family.image_transform, self.cap.image_size), args.batch_size,
                              shuffle=False, drop_remainder=False, sharding=state_lib.batch_sharding(self.mesh))
    replicated = NamedSharding(self.mesh, P())  # the models on every device, the batch split over them
    self.cap_state = distributed.replicate(self.cap.state, replicated)
    self.filt_state = self.cap_state if self.filt is self.cap else distributed.replicate(self.filt.state, replicated)
    self.images = outputs.ImageWriter(b, args.split, args.out)

  def load(self, step: int):
    """This process's rows of batch `step` (numpy), with their images written to OUT/images."""
    batch = self.loader.load(step)
    batch['names'] = self.images(batch['record'][batch['valid']].tolist())
    return batch

  def process(self, chunk: int, batches) -> list[dict]:
    """Sample and score the batches of `chunk`; returns this process's candidate rows."""
    results = []
    for j, batch in enumerate(batches):  # dispatch every batch before reading any result back
      inputs = self.loader.to_global({k: batch[k] for k in ('image', 'web_ids', 'web_mask')})
      outputs = jitted_step(self.cap.graphdef, self.filt.graphdef, self.spec, self.cap_state, self.filt_state,
                            inputs['image'], inputs['web_ids'], inputs['web_mask'],
                            batch_key(self.args.seed, chunk, j))
      self.clock.tick(outputs, self.chunks.batch_images(self.chunks.steps(chunk)[j]))
      results.append((batch, outputs))
    rows = []
    for batch, (sampled, scores) in results:
      rows += self.rows(batch, distributed.local_rows(sampled, self.mesh), distributed.local_rows(scores, self.mesh))
    return rows

  def rows(self, batch, sampled, scores) -> list[dict]:
    """One row per candidate (web texts, then synthetic captions) of the batch's real images."""
    tok, k = self.cap.tokenizer, self.args.num_captions
    captions = tok.decode_captions(sampled.reshape(-1, sampled.shape[-1]), self.spec.prompt) if k else []
    w = batch['web_ids'].shape[1]
    rows = []
    for i in np.flatnonzero(batch['valid']):
      r = int(batch['record'][i])
      common = {'record': r, 'image': batch['names'][r], 'image_id': self.image_ids[r]}
      for j in range(len(self.texts[r])):
        rows.append({**common, 'index': j, 'caption': self.texts[r][j], 'source': 'web',
                     'itm_score': round(float(scores[i, j]), 6), 'corrupted': self.replaced[r][j]})
      for c in range(k):
        rows.append({**common, 'index': w + c, 'caption': captions[i * k + c], 'source': 'synthetic',
                     'itm_score': round(float(scores[i, w + c]), 6)})
    return rows

  def __call__(self, todo: list[int]) -> tuple[int, float]:
    """Process the chunks `todo`; returns (images processed, images/s)."""
    chunks = self.chunks
    bar = tqdm.tqdm(total=chunks.images, initial=chunks.images - sum(map(chunks.chunk_images, chunks.todo())),
                    desc='capfilt', unit='img', dynamic_ncols=True, disable=jax.process_index() != 0)
    loaded = prefetch(self.load, [s for c in todo for s in chunks.steps(c)])
    images, self.clock = 0, Clock()
    for chunk in todo:
      rows = self.process(chunk, [next(loaded) for _ in chunks.steps(chunk)])
      storage.write_atomic(outputs.part_path(self.args.out, jax.process_index(), chunk),
                   ''.join(json.dumps(row) + '\n' for row in rows).encode())
      images += chunks.chunk_images(chunk)
      bar.update(chunks.chunk_images(chunk))
    bar.close()
    return images, self.clock.rate()


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog='blip-jax-capfilt', description=__doc__.split('\n\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--captioner', required=True, help='a BLIP caption or pretrain model directory')
  ap.add_argument('--filter', required=True, help='a BLIP retrieval (ITM) or pretrain model directory')
  ap.add_argument('--data', required=True,
                  help='synthetic_scenes/<tiny|small|large>, coco_captions, or a caption annotation JSON')
  ap.add_argument('--image-root', help='with an annotation JSON: the folder its image paths are relative to')
  ap.add_argument('--split', default='train')
  ap.add_argument('--data-dir', default='', help="TFDS data_dir ('' = ~/tensorflow_datasets)")
  ap.add_argument('--out', required=True)
  ap.add_argument('--num-captions', type=int, default=3, help='synthetic captions per image (K)')
  ap.add_argument('--threshold', type=float, default=0.5, help='keep pairs whose ITM match probability is >= this')
  ap.add_argument('--batch-size', type=int, default=32, help='images per global batch (all devices)')
  ap.add_argument('--chunk-batches', type=int, default=8, help='batches per output chunk (the unit of resuming)')
  ap.add_argument('--corrupt-fraction', type=float, default=0.0,
                  help='simulate noisy web text: replace this fraction by captions of other images')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--copy-split', action='append', default=[],
                  help='also write this split unfiltered to OUT/<split>.json (e.g. validation, for evaluation)')
  ap.add_argument('--max-chunks', type=int, help='stop after this many chunks (run again to continue)')
  ap.add_argument('--multihost', action='store_true',
                  help='call jax.distributed.initialize() (TPU pods, SLURM); also done when JAX_COORDINATOR_ADDRESS is set')
  return ap


def check_args(args) -> None:
  if args.num_captions < 0:
    raise InputError(f'--num-captions must be >= 0, got {args.num_captions}')
  if not 0.0 <= args.threshold <= 1.0:
    raise InputError(f'--threshold is a probability in [0, 1], got {args.threshold}')
  if not 0.0 <= args.corrupt_fraction < 1.0:
    raise InputError(f'--corrupt-fraction must be in [0, 1), got {args.corrupt_fraction}')
  if args.batch_size < 1 or args.chunk_batches < 1:
    raise InputError('--batch-size and --chunk-batches must be positive')
  if args.max_chunks is not None and args.max_chunks < 1:
    raise InputError(f'--max-chunks must be positive, got {args.max_chunks}')
  if args.batch_size % jax.device_count():
    raise InputError(f'--batch-size {args.batch_size} is not divisible by the {jax.device_count()} devices '
                     '(the batch is split over all of them)')


def run(argv=None) -> dict:
  """Parse `argv` and run CapFilt; returns the summary (`complete` False when --max-chunks stopped it)."""
  args = parser().parse_args(argv)
  check_args(args)
  models.check_models(args.captioner, args.filter)  # before the slow steps: building data, loading weights
  data = data_lib.source_config(args)
  os.makedirs(os.path.join(args.out, 'parts'), exist_ok=True)
  b, family = data_lib.open_source(data, args.split)  # process 0 builds the dataset, as in training
  image_ids, web = data_lib.read_web_texts(b, family, args.split)
  texts, replaced = data_lib.corrupt(web, args.corrupt_fraction, args.seed)
  settings = {'captioner': os.path.abspath(args.captioner), 'captioner_files': outputs.model_fingerprint(args.captioner),
              'filter': os.path.abspath(args.filter), 'filter_files': outputs.model_fingerprint(args.filter),
              'data': args.data, 'split': args.split, 'images': len(texts),
              'data_config': data.get('config_name', ''),  # an annotation file's content hash
              'num_captions': args.num_captions, 'batch_size': args.batch_size, 'chunk_batches': args.chunk_batches,
              'corrupt_fraction': args.corrupt_fraction, 'seed': args.seed, 'processes': jax.process_count(),
              'prompt': models.captioner_prompt(args.captioner), **SAMPLING}
  outputs.check_settings(args.out, settings)
  chunks = Chunks(args.out, len(texts), args.batch_size, args.chunk_batches)
  todo = chunks.todo()
  distributed.barrier('capfilt: parts listed')  # every process must see the same todo list before any part is written
  processed, rate = 0, float('nan')
  if todo:  # the models are loaded only when there is work left (a finished run just re-gathers)
    processed, rate = Run(args, chunks, b, texts, replaced, image_ids)(todo[:args.max_chunks])
  distributed.barrier('capfilt: parts written')
  left = len(chunks.todo())
  if left:
    print(f'capfilt: stopped after --max-chunks {args.max_chunks}: {left} of {len(chunks)} chunks left; run '
          'the same command again to continue', flush=True)
    return {'complete': False}
  rows = outputs.gather(args.out, len(chunks), jax.process_count())
  summary = outputs.summarize(rows, len(texts), args.threshold)
  if jax.process_index() == 0:
    shutil.copy(os.path.join(args.captioner, 'vocab.txt'), os.path.join(args.out, 'vocab.txt'))  # for pretraining
    copied = [outputs.copy_split(b, family, split, args.out) for split in args.copy_split]
    path, kept = outputs.finish(args.out, rows, args.threshold)
    storage.write_atomic(os.path.join(args.out, 'summary.json'), json.dumps(summary, indent=1).encode())
    print(outputs.format_summary(summary, f'{args.data}:{args.split}', processed, rate, jax.device_count()))
    print(f'wrote {path}: {kept} captions of {summary["images"]} images (image_root {args.out}/images)'
          + ''.join(f'\nwrote {p}' for p in copied), flush=True)
  return {'complete': True, **summary}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  distributed.initialize('--multihost' in argv)
  return cli.main(run, argv)
