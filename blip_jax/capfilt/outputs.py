"""CapFilt's output files: parts written atomically, the images, the gathered annotations and
the summary."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shutil

import jax
import numpy as np

from blip_jax import storage
from blip_jax.capfilt.data import read_web_texts
from blip_jax.cli import InputError
from blip_jax.data import image_files


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
    Image.fromarray(image_files.rgb(im)).save(buffer, 'PNG')
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
        storage.write_atomic(path, data)
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
  storage.write_atomic(path, json.dumps(entries).encode())
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
    storage.write_atomic(path, json.dumps(settings, indent=1).encode())


def model_fingerprint(path: str) -> str:
  """Names, sizes and times of a model directory's files: a retrained model is another model."""
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      h.update(f'{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns};'.encode())
  return h.hexdigest()[:16]


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
  if os.path.exists(path) and pathlib.Path(path).read_bytes() != data:
    # configs/pretrain_capfilt.py builds its dataset under OUT/tfds: a new output needs a new build.
    shutil.rmtree(os.path.join(out, 'tfds'), ignore_errors=True)
  storage.write_atomic(path, data)
  return path, len(kept)
