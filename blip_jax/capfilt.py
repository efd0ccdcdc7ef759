"""CapFilt (BLIP's Captioning and Filtering): bootstrap a caption dataset from images and their
noisy ("web") texts.

    python -m blip_jax.capfilt --captioner runs/default/model --filter runs/default/model \\
        --data synthetic_scenes/small --out runs/capfilt --corrupt-fraction 0.3 --copy-split validation

For every image of `--split` of `--data`, the captioner samples `--num-captions` captions with the
originals' nucleus settings (prompt 'a picture of ', top-p 0.9, repetition penalty 1.1, 5 to 30
tokens with the prompt); the filter's ITM head scores the image's web texts and the synthetic
captions (the softmax of the ITM logits at index 1, "match"), and the pairs scoring at least
`--threshold` (default 0.5: the originals keep the ITM argmax "match") are kept.

`--data` is a dataset the project builds (`synthetic_scenes/<size>`, `coco_captions`) or a caption
annotation JSON (BLIP's format, with `--image-root`; built once into OUT/source_tfds, whose record
order is TFDS's, not the file's); each record's captions are its web texts.
`--corrupt-fraction F` simulates noisy web text: F of all web texts (chosen with `--seed`) are
replaced by a caption of another image, and the summary reports how well the filter finds them.

Output in OUT:
  annotations.json   the kept pairs in BLIP's caption annotation format, one entry per caption:
                     {image, caption, image_id, source: web | synthetic, itm_score[, corrupted]}
                     (the `blip_annotations` builder reads it; configs/pretrain_capfilt.py trains on it)
  images/<split>/    the images, as stored in the dataset (PNG for generated data, JPEG stays JPEG)
  <split>.json       with --copy-split: that split unfiltered (e.g. to evaluate a pretraining run)
  vocab.txt          the captioner's vocabulary (the pretraining run's tokenizer)
  parts/             every scored candidate, in chunks: part-PPPPP-CCCCC.jsonl (process, chunk)
  settings.json, summary.json

Sharding and resuming work like training: the images go in global batches over the mesh's data
axis (every device of every process; each process loads and writes only its rows, `jax.process_index`),
and one jitted function per batch samples the captions and scores them. Every chunk of
`--chunk-batches` batches is written atomically (temporary file, then rename) with its own random
key (`fold_in(key(seed), chunk)`, then the batch within the chunk), so a killed run continues with
the chunks it lacks and ends with the output an uninterrupted run writes. The threshold is applied
when the parts are gathered, so rerunning with another `--threshold` only rewrites the output.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from blip_jax import generate
from blip_jax.predict import InputError, Predictor

PROMPT = 'a picture of '
# The originals' nucleus sampling for CapFilt (BLIP `generate(sample=True, top_p=0.9, max_length=30,
# min_length=5)`, repetition penalty 1.1 with sampling).
SAMPLING = dict(top_p=0.9, repetition_penalty=1.1, max_length=30, min_length=5)
ITM_TEXT_LENGTH = 35  # the originals' text length for ITM (shorter when the model has fewer positions)
MAX_WORDS = 30  # pre_caption's word limit of the originals' pretraining data
CORRUPT_STREAM = 7  # the numpy stream of the simulated corruption (apart from anything else seeded)


# ---------------------------------------------------------------------------------- the jitted step

@dataclasses.dataclass(frozen=True)
class Spec:
  """The static settings of the jitted step (hashable, so equal runs reuse the compiled step)."""
  prompt_ids: tuple[int, ...]
  num_captions: int
  text_length: int  # the filter's text length
  eos_token_id: int
  pad_token_id: int
  cls_token_id: int
  special_ids: tuple[int, ...]  # what `decode(skip_special_tokens=True)` drops
  shared_model: bool  # captioner and filter are one model: embed the images once


def filter_text(generated, spec: Spec):
  """Sampled ids [N, L] ('[DEC] prompt caption [SEP] pad') -> the filter's ids and mask [N, T]:
  '[CLS] caption [SEP]' padded, what the tokenizer makes of the decoded, prompt-stripped caption
  (special tokens dropped, truncated to T), built on device so sampling and scoring are one step."""
  gen = generated[:, len(spec.prompt_ids):]
  keep = ~jnp.isin(gen, jnp.asarray(spec.special_ids))
  content = jnp.take_along_axis(gen, jnp.argsort(~keep, axis=1, stable=True), axis=1)  # kept tokens first
  t = spec.text_length
  n = jnp.minimum(keep.sum(1), t - 2)[:, None]
  content = jnp.pad(content, ((0, 0), (0, max(t - 1 - content.shape[1], 0))))[:, :t - 1]
  full = jnp.concatenate([jnp.full((gen.shape[0], 1), spec.cls_token_id, gen.dtype), content], 1)
  pos = jnp.arange(t)[None]
  ids = jnp.where(pos <= n, full, jnp.where(pos == n + 1, spec.eos_token_id, spec.pad_token_id))
  return ids.astype(jnp.int32), (pos <= n + 1).astype(jnp.int32)


def capfilt_step(cap_graph, filt_graph, spec: Spec, cap_state, filt_state, images, web_ids, web_mask, key):
  """One batch: `num_captions` nucleus samples per image, then the ITM match probability of every
  web text and sampled caption with its image.

  images [B, S, S, 3], web_ids / web_mask [B, W, T] -> sampled ids [B, K, L], scores [B, W + K]
  (the web texts first)."""
  captioner = nnx.merge(cap_graph, cap_state)
  filt = captioner if spec.shared_model else nnx.merge(filt_graph, filt_state)
  b, w, t = web_ids.shape
  k = spec.num_captions
  embeds = captioner.image_embeds(images)
  ids, mask = web_ids, web_mask
  sampled = jnp.zeros((b, 0, SAMPLING['max_length']), jnp.int32)
  if k:
    prompt = jnp.broadcast_to(jnp.asarray(spec.prompt_ids, jnp.int32), (b, len(spec.prompt_ids)))
    sampled = generate.sample(captioner.text_decoder, embeds, prompt, rng=key, num_return_sequences=k,
                              eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id, **SAMPLING)
    syn_ids, syn_mask = filter_text(sampled.reshape(b * k, -1), spec)
    ids = jnp.concatenate([web_ids, syn_ids.reshape(b, k, t)], 1)
    mask = jnp.concatenate([web_mask, syn_mask.reshape(b, k, t)], 1)
  filt_embeds = embeds if spec.shared_model else filt.image_embeds(images)
  logits = filt.itm_logits(jnp.repeat(filt_embeds, w + k, 0), ids.reshape(-1, t), mask.reshape(-1, t))
  return sampled, jax.nn.softmax(logits, -1)[:, 1].reshape(b, w + k)


# Module level, so runs in one process with the same models and shapes share the compiled step.
jitted_step = jax.jit(capfilt_step, static_argnums=(0, 1, 2))


def batch_key(seed: int, chunk: int, batch: int):
  """The sampling key of batch `batch` (0-based within its chunk) of chunk `chunk`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), chunk), batch)


# ---------------------------------------------------------------------------------- models

# What each role needs (BLIP tasks, `blip.TASKS`): the captioner a text decoder, the filter an ITM head.
ROLES = {'--captioner': ('caption', 'pretrain'), '--filter': ('retrieval', 'pretrain')}


def check_model_dir(path: str, flag: str) -> dict:
  """The model's config.json, after checking (without loading weights) that it can play `flag`'s role."""
  from blip_jax import model_io
  if not model_io.is_model_dir(path):
    reason = 'no such directory' if not os.path.isdir(path) else f'no blip_jax {model_io.CONFIG_FILE}'
    raise InputError(f'{flag} {path}: not a blip_jax model directory ({reason}); use a training run\'s model/ '
                     'folder or convert a checkpoint with convert_torch_weights.py')
  meta = model_io.read_config(path)
  if meta['family'] != 'blip':
    raise InputError(f'{flag} {path}: a {meta["family"]} model; CapFilt needs BLIP models')
  if meta['task'] not in ROLES[flag]:
    has = 'no text decoder' if flag == '--captioner' else 'no ITM head'
    raise InputError(f'{flag} {path}: a BLIP {meta["task"]} model has {has}; the {flag[2:]} is a '
                     f'{" or ".join(ROLES[flag])} model')
  if not os.path.isfile(os.path.join(path, 'vocab.txt')):
    raise InputError(f'{flag} {path} has no vocab.txt (train.py writes it; for a converted model, copy '
                     'bert-base-uncased\'s vocab.txt there)')
  return meta


def check_models(captioner_dir: str, filter_dir: str) -> None:
  cap, filt = check_model_dir(captioner_dir, '--captioner'), check_model_dir(filter_dir, '--filter')
  positions = cap['config']['text']['max_position_embeddings']
  if positions < SAMPLING['max_length']:
    raise InputError(f'--captioner {captioner_dir}: {positions} text positions, fewer than the '
                     f'{SAMPLING["max_length"]} tokens CapFilt samples')
  # The filter reads the captioner's token ids (no detokenize / retokenize round trip).
  if _read(os.path.join(captioner_dir, 'vocab.txt')) != _read(os.path.join(filter_dir, 'vocab.txt')):
    raise InputError(f'--captioner {captioner_dir} and --filter {filter_dir} have different vocab.txt files; '
                     'CapFilt needs one WordPiece vocabulary')
  sizes = cap['config']['vision']['image_size'], filt['config']['vision']['image_size']
  if sizes[0] != sizes[1]:
    raise InputError(f'--captioner takes {sizes[0]} px images and --filter {sizes[1]} px; CapFilt feeds both one '
                     'image batch')


def load_models(captioner_dir: str, filter_dir: str) -> tuple[Predictor, Predictor]:
  """The captioner and filter (one object when they are one directory)."""
  cap = Predictor(captioner_dir)
  return cap, cap if os.path.realpath(filter_dir) == os.path.realpath(captioner_dir) else Predictor(filter_dir)


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def make_spec(cap: Predictor, filt: Predictor, num_captions: int) -> Spec:
  tok = cap.tokenizer
  return Spec(prompt_ids=tuple(int(i) for i in tok.decoder_prompt(PROMPT)[0]), num_captions=num_captions,
              text_length=min(ITM_TEXT_LENGTH, filt.config.text.max_position_embeddings),
              eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
              special_ids=tuple(sorted(tok.tokenizer.all_special_ids)), shared_model=filt is cap)


# ---------------------------------------------------------------------------------- data

def source_config(args):
  """The `data` section (as in a training config) of `--data`, for `datasets.builder`."""
  import ml_collections
  if args.data.endswith('.json'):
    if not os.path.isfile(args.data):
      raise InputError(f'--data {args.data}: no such annotation file')
    if not args.image_root:
      raise InputError(f'--data {args.data} needs --image-root (the folder its image paths are relative to)')
    digest = hashlib.sha256(open(args.data, 'rb').read()).hexdigest()[:12]
    return ml_collections.ConfigDict({
        'name': 'blip_annotations', 'task': 'caption', 'annotations': {args.split: os.path.abspath(args.data)},
        'image_root': os.path.abspath(args.image_root), 'config_name': f'capfilt_{digest}',  # new file, new build
        'data_dir': args.data_dir or os.path.join(args.out, 'source_tfds')})
  return ml_collections.ConfigDict({'name': args.data, 'data_dir': args.data_dir})


def open_source(data, split: str):
  """The prepared builder of `data` and its dataset family (`examples.family`)."""
  from blip_jax.data import datasets, examples as examples_lib
  try:
    family = examples_lib.family(data['name'])
    b = datasets.builder(data)
  except ValueError as e:  # an unknown dataset family, or a bad annotation entry
    raise InputError(f'--data {data["name"]}: {e}') from e
  except Exception as e:  # noqa: BLE001 - tfds reports an unknown name or a failed build in many ways
    raise InputError(f'--data {data["name"]}: cannot build the dataset ({type(e).__name__}: {e}); CapFilt reads '
                     'synthetic_scenes/<tiny|small|large>, coco_captions or a caption annotation JSON') from e
  if split not in b.info.splits:
    raise InputError(f'--split {split}: {b.name} has the splits {sorted(b.info.splits)}')
  return b, family


def read_web_texts(b, family: str, split: str) -> tuple[list, list[list[str]]]:
  """Every record's image id and captions (its web texts), in record order."""
  from blip_jax.data import examples as examples_lib
  rows = [examples_lib.caption_rows(family, r) for r in examples_lib.read_text_fields(b, split)]
  as_json = lambda i: i.decode() if isinstance(i, bytes) else i.item() if isinstance(i, np.generic) else i
  return [as_json(i) for i, _ in rows], [list(c) for _, c in rows]


def corrupt(texts: list[list[str]], fraction: float, seed: int) -> tuple[list[list[str]], list[list[bool]]]:
  """Simulated noisy web text: `fraction` of all texts, chosen with `seed`, each replaced by a
  caption of another image that is not one of this image's own captions. Returns the texts and
  which were replaced."""
  out = [list(t) for t in texts]
  replaced = [[False] * len(t) for t in texts]
  flat = [(r, j) for r, t in enumerate(texts) for j in range(len(t))]
  n = int(round(fraction * len(flat)))
  if not n:
    return out, replaced
  if len(texts) < 2:
    raise InputError('--corrupt-fraction needs at least 2 images (a replacement comes from another image)')
  rng = np.random.default_rng([seed, CORRUPT_STREAM])
  for k in rng.choice(len(flat), n, replace=False):
    r, j = flat[k]
    for _ in range(1000):
      other = int(rng.integers(len(texts)))
      if other != r and texts[other]:
        caption = texts[other][int(rng.integers(len(texts[other])))]
        if caption not in texts[r]:
          break
    else:
      raise InputError(f'--corrupt-fraction: found no caption of another image that differs from image {r}\'s own')
    out[r][j], replaced[r][j] = caption, True
  return out, replaced


def web_table(texts: list[list[str]], filt: Predictor, text_length: int):
  """The loader's columns: web text ids / mask [N, W, T] (W = most texts of a record; the
  missing ones are empty texts whose scores are not read) and the record index."""
  from blip_jax.data.text import pre_caption
  w = max(1, max(len(t) for t in texts))
  flat = [pre_caption(t[j], MAX_WORDS) if j < len(t) else '' for t in texts for j in range(w)]
  ids, mask = filt.tokenizer.encode(flat, text_length)
  n = len(texts)
  return {'web_ids': ids.reshape(n, w, text_length), 'web_mask': mask.reshape(n, w, text_length),
          'record': np.arange(n)}


# ---------------------------------------------------------------------------------- output files

def write_atomic(path: str, data: bytes) -> None:
  """Write through a temporary file and a rename, so a killed run leaves no partial file."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def part_path(out: str, process: int, chunk: int) -> str:
  return os.path.join(out, 'parts', f'part-{process:05d}-{chunk:05d}.jsonl')


def image_file(split: str, record: int, encoded: bytes) -> tuple[str, bytes]:
  """(path relative to OUT/images, bytes): the stored encoding where it is PNG or JPEG, else PNG."""
  if encoded.startswith(b'\x89PNG'):
    return f'{split}/{record:08d}.png', encoded
  if encoded.startswith(b'\xff\xd8'):
    return f'{split}/{record:08d}.jpg', encoded
  from PIL import Image
  buffer = io.BytesIO()
  with Image.open(io.BytesIO(encoded)) as im:
    im.convert('RGB').save(buffer, 'PNG')
  return f'{split}/{record:08d}.png', buffer.getvalue()


class ImageWriter:
  """Writes a split's images under OUT/images from the dataset's encoded bytes (not re-encoded)."""

  def __init__(self, b, split: str, out: str):
    import tensorflow_datasets as tfds
    self.source = b.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
    self.split, self.root = split, os.path.join(out, 'images')
    os.makedirs(os.path.join(self.root, split), exist_ok=True)

  def __call__(self, records) -> dict[int, str]:
    """Writes the images of `records` that are not there yet; returns their relative paths."""
    names = {}
    for r, rec in zip(records, self.source.__getitems__(list(records))):
      name, data = image_file(self.split, r, rec['image'])
      path = os.path.join(self.root, name)
      if not os.path.exists(path):
        write_atomic(path, data)
      names[r] = name
    return names


def copy_split(b, family: str, split: str, out: str) -> str:
  """`split` unfiltered in the annotation format, with its images (e.g. the pretraining run's eval split)."""
  if split not in b.info.splits:
    raise InputError(f'--copy-split {split}: {b.name} has the splits {sorted(b.info.splits)}')
  image_ids, texts = read_web_texts(b, family, split)
  names = ImageWriter(b, split, out)(range(len(texts)))
  entries = [{'image': names[r], 'caption': caps, 'image_id': image_ids[r]} for r, caps in enumerate(texts)]
  path = os.path.join(out, f'{split}.json')
  write_atomic(path, json.dumps(entries).encode())
  return path


def check_settings(out: str, settings: dict) -> None:
  """A resumed run must be the same run: its parts were written with these settings."""
  path = os.path.join(out, 'settings.json')
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
    if changed:
      raise InputError(f'--out {out} holds the parts of a run with other settings ('
                       + ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())
                       + '); use another --out, or delete its parts/ and settings.json')
  elif os.path.isdir(os.path.join(out, 'parts')) and os.listdir(os.path.join(out, 'parts')):
    raise InputError(f'--out {out} holds parts/ but no settings.json; use another --out')
  elif jax.process_index() == 0:
    write_atomic(path, json.dumps(settings, indent=1).encode())


def model_fingerprint(path: str) -> str:
  """Names, sizes and times of a model directory's files: a retrained model is another model."""
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      h.update(f'{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns};'.encode())
  return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------- the run

def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _local(x, mesh):
  """This process's rows of a batch-sharded global array, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  from jax.sharding import PartitionSpec as P
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P(('data', 'fsdp'))))


def _replicate(state, sharding):
  """Every leaf on every device of the mesh, from each process's own copy (a plain device_put
  would be a cross-host transfer from the device the weights were loaded on)."""
  def put(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # dropout RNG streams: via their raw data
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(put, state)


def _prefetch(fn, items, ahead: int = 2):
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
    return all(os.path.exists(part_path(self.out, p, chunk)) for p in range(jax.process_count()))

  def todo(self) -> list[int]:
    return [c for c in range(len(self)) if not self.done(c)]


class Run:
  """Captioning and filtering of the chunks a split still lacks: the models on the mesh, the loader."""

  def __init__(self, args, chunks: Chunks, b, texts, replaced, image_ids):
    from blip_jax.data.examples import Examples
    from blip_jax.data.loader import BatchLoader
    from blip_jax.data.transforms import image_function
    from blip_jax.train import state as state_lib
    from jax.sharding import NamedSharding, PartitionSpec as P
    self.args, self.chunks = args, chunks
    self.texts, self.replaced, self.image_ids = texts, replaced, image_ids
    self.cap, self.filt = load_models(args.captioner, args.filter)
    self.spec = make_spec(self.cap, self.filt, args.num_captions)
    self.mesh = state_lib.make_mesh(-1, 1)
    table = web_table(texts, self.filt, self.spec.text_length)
    self.loader = BatchLoader(Examples(table['record'][:, None], ('image',), table), b.as_data_source(args.split),
                              image_function(self.cap.transform, self.cap.image_size), args.batch_size,
                              shuffle=False, drop_remainder=False, sharding=state_lib.batch_sharding(self.mesh))
    replicated = NamedSharding(self.mesh, P())  # the models on every device, the batch split over them
    self.cap_state = _replicate(self.cap.state, replicated)
    self.filt_state = self.cap_state if self.filt is self.cap else _replicate(self.filt.state, replicated)
    self.images = ImageWriter(b, args.split, args.out)

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
      rows += self.rows(batch, _local(sampled, self.mesh), _local(scores, self.mesh))
    return rows

  def rows(self, batch, sampled, scores) -> list[dict]:
    """One row per candidate (web texts, then synthetic captions) of the batch's real images."""
    tok, k = self.cap.tokenizer, self.args.num_captions
    captions = [tok.strip_prompt(t, PROMPT) for t in tok.decode(sampled.reshape(-1, sampled.shape[-1]))] if k else []
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
    loaded = _prefetch(self.load, [s for c in todo for s in chunks.steps(c)])
    images, self.clock = 0, Clock()
    for chunk in todo:
      rows = self.process(chunk, [next(loaded) for _ in chunks.steps(chunk)])
      write_atomic(part_path(self.args.out, jax.process_index(), chunk),
                   ''.join(json.dumps(row) + '\n' for row in rows).encode())
      images += chunks.chunk_images(chunk)
      bar.update(chunks.chunk_images(chunk))
    bar.close()
    return images, self.clock.rate()


def gather(out: str, num_chunks: int, processes: int) -> list[dict]:
  """Every candidate row of the parts, in record order (independent of the process count)."""
  rows = []
  for chunk in range(num_chunks):
    for p in range(processes):
      with open(part_path(out, p, chunk)) as f:
        rows += [json.loads(line) for line in f]
  return sorted(rows, key=lambda r: (r['record'], r['index']))


def summarize(rows: list[dict], images: int, threshold: float) -> dict:
  """Counts kept / dropped by source and, with simulated corruption, the filter's precision and
  recall at finding the replaced web texts."""
  s = {'images': images, 'threshold': threshold}
  for source in ('web', 'synthetic'):
    scores = np.asarray([r['itm_score'] for r in rows if r['source'] == source])
    s[source] = {'total': int(scores.size), 'kept': int((scores >= threshold).sum()),
                 'dropped': int((scores < threshold).sum())}
  web = [r for r in rows if r['source'] == 'web']
  corrupt = np.asarray([r['corrupted'] for r in web], bool)
  if corrupt.any():
    dropped = np.asarray([r['itm_score'] < threshold for r in web], bool)
    s['corruption'] = {
        'replaced': int(corrupt.sum()),
        'precision': float((dropped & corrupt).sum() / max(dropped.sum(), 1)),  # dropped texts that were replaced
        'recall': float((dropped & corrupt).sum() / corrupt.sum()),  # replaced texts that were dropped
        'clean_kept': float((~dropped & ~corrupt).sum() / max((~corrupt).sum(), 1))}
  return s


def format_summary(s: dict, source: str, processed: int, rate: float, devices: int) -> str:
  lines = [f'capfilt: {s["images"]} images of {source}, threshold {s["threshold"]}',
           f'  {"source":10s} {"total":>7s} {"kept":>7s} {"dropped":>8s} {"kept %":>7s}']
  for name in ('web', 'synthetic'):
    c = s[name]
    lines.append(f'  {name:10s} {c["total"]:7d} {c["kept"]:7d} {c["dropped"]:8d} '
                 f'{100 * c["kept"] / max(c["total"], 1):7.1f}')
  if 'corruption' in s:
    c = s['corruption']
    lines.append(f'  filter vs the {c["replaced"]} replaced web texts: precision {c["precision"]:.3f} (dropped that '
                 f'were replaced), recall {c["recall"]:.3f} (replaced that were dropped), clean kept {c["clean_kept"]:.3f}')
  if not processed:
    lines.append('  this run: no chunk left to process (the parts were complete)')
  else:
    speed = f'{rate:.1f} images/s after the first batch (compile)' if np.isfinite(rate) else 'one batch, not timed'
    lines.append(f'  this run: {processed} images on {devices} device(s), {speed}')
  return '\n'.join(lines)


def finish(out: str, rows: list[dict], threshold: float) -> tuple[str, int]:
  """annotations.json: the kept candidates in BLIP's caption annotation format."""
  keys = ('image', 'caption', 'image_id', 'source', 'itm_score')
  kept = [{**{k: r[k] for k in keys}, **({'corrupted': True} if r.get('corrupted') else {})}
          for r in rows if r['itm_score'] >= threshold]
  path = os.path.join(out, 'annotations.json')
  data = json.dumps(kept, indent=0).encode()
  if os.path.exists(path) and open(path, 'rb').read() != data:
    # configs/pretrain_capfilt.py builds its dataset under OUT/tfds: a new output needs a new build.
    shutil.rmtree(os.path.join(out, 'tfds'), ignore_errors=True)
  write_atomic(path, data)
  return path, len(kept)


# ---------------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog='python -m blip_jax.capfilt', description=__doc__.split('\n\n')[0],
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


def init_distributed(multihost: bool) -> None:
  """Join the other processes, as train.py does: every host runs the same command."""
  if multihost or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    env = {'coordinator_address': os.environ['JAX_COORDINATOR_ADDRESS']} if 'JAX_COORDINATOR_ADDRESS' in os.environ else {}
    if 'JAX_NUM_PROCESSES' in os.environ:
      env.update(num_processes=int(os.environ['JAX_NUM_PROCESSES']), process_id=int(os.environ['JAX_PROCESS_ID']))
    jax.distributed.initialize(**env)


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
  check_models(args.captioner, args.filter)  # before the slow steps: building data, loading weights
  data = source_config(args)
  os.makedirs(os.path.join(args.out, 'parts'), exist_ok=True)
  b, family = open_source(data, args.split)  # process 0 builds the dataset, as in training
  image_ids, web = read_web_texts(b, family, args.split)
  texts, replaced = corrupt(web, args.corrupt_fraction, args.seed)
  settings = {'captioner': os.path.abspath(args.captioner), 'captioner_files': model_fingerprint(args.captioner),
              'filter': os.path.abspath(args.filter), 'filter_files': model_fingerprint(args.filter),
              'data': args.data, 'split': args.split, 'images': len(texts),
              'data_config': data.get('config_name', ''),  # an annotation file's content hash
              'num_captions': args.num_captions, 'batch_size': args.batch_size, 'chunk_batches': args.chunk_batches,
              'corrupt_fraction': args.corrupt_fraction, 'seed': args.seed, 'processes': jax.process_count(),
              'prompt': PROMPT, **SAMPLING}
  check_settings(args.out, settings)
  chunks = Chunks(args.out, len(texts), args.batch_size, args.chunk_batches)
  todo = chunks.todo()
  _sync('capfilt: parts listed')  # every process must see the same todo list before any part is written
  processed, rate = 0, float('nan')
  if todo:  # the models are loaded only when there is work left (a finished run just re-gathers)
    processed, rate = Run(args, chunks, b, texts, replaced, image_ids)(todo[:args.max_chunks])
  _sync('capfilt: parts written')
  left = len(chunks.todo())
  if left:
    print(f'capfilt: stopped after --max-chunks {args.max_chunks}: {left} of {len(chunks)} chunks left; run '
          'the same command again to continue', flush=True)
    return {'complete': False}
  rows = gather(args.out, len(chunks), jax.process_count())
  summary = summarize(rows, len(texts), args.threshold)
  if jax.process_index() == 0:
    shutil.copy(os.path.join(args.captioner, 'vocab.txt'), os.path.join(args.out, 'vocab.txt'))  # for pretraining
    copied = [copy_split(b, family, split, args.out) for split in args.copy_split]
    path, kept = finish(args.out, rows, args.threshold)
    write_atomic(os.path.join(args.out, 'summary.json'), json.dumps(summary, indent=1).encode())
    print(format_summary(summary, f'{args.data}:{args.split}', processed, rate, jax.device_count()))
    print(f'wrote {path}: {kept} captions of {summary["images"]} images (image_root {args.out}/images)'
          + ''.join(f'\nwrote {p}' for p in copied), flush=True)
  return {'complete': True, **summary}


def main(argv=None) -> int:
  args = sys.argv[1:] if argv is None else argv
  init_distributed('--multihost' in args)
  try:
    run(args)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
