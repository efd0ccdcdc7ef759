"""Command-line inference over `blip_jax.Predictor`: `blip-jax-predict COMMAND --checkpoint SOURCE
[options] IMAGES...` (or `python -m blip_jax.predict`).

  caption   captions (beam search by default, --beams 1 greedy, --sample nucleus), with a confidence
  itm       every image against every --text: ITM match probability and ITC similarity
  gradcam   every image against every --text: ITM match probability and a Grad-CAM heat map (PNG
            in --maps DIR) of where the text is found (BLIP ITM models)
  vqa       answers to --question (generated, or the best of --answers FILE)
  classify  zero-shot top classes over --classes a,b,c with prompt --template(s)
  retrieve  --index DIR IMAGES...: embed the images into the index (appends; skips indexed ones);
            --index DIR --query TEXT (or --image-query IMAGE): the --top best images (--rerank K:
            the K best rescored by ITM, as BLIP's evaluation)

SOURCE is anything `Predictor.from_pretrained` takes: a converted directory, a PyTorch checkpoint,
an HF folder or a Hub id. IMAGES are files, folders or @list.txt, read lazily in batches
(--batch-size), so memory stays flat whatever their number; an input that is missing or not an
image is reported on stderr and skipped. Rows are written as each batch finishes: a table on
stdout, or --format jsonl / csv (to --out FILE or stdout); --resume skips the images --out holds.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import hashlib
import io
import itertools
import json
import os
import sys
from collections.abc import Iterator

import numpy as np

from blip_jax import cli, storage
from blip_jax.cli import InputError
from blip_jax.inference.images import ImageError, list_images, to_rgb
from blip_jax.inference.predictor import DEFAULT_TEMPLATES

# ---------------------------------------------------------------------------------- images


def image_batches(inputs, batch_size: int, skip: set[str] = frozenset()) -> Iterator[tuple[list[str], list]]:
  """(paths, RGB arrays) of the readable images, `batch_size` at a time, decoded one batch ahead
  on a thread; unreadable inputs are reported on stderr and skipped."""
  problems: list[str] = []

  def readable(paths):
    out = []
    for path in paths:
      try:
        out.append((path, to_rgb(path)))
      except ImageError as e:
        problems.append(str(e))
    return out

  def report():
    while problems:
      print(f'skipped {problems.pop(0)}', file=sys.stderr)

  paths = (p for p in list_images(inputs, problems) if p not in skip)
  chunks = iter(lambda: list(itertools.islice(paths, batch_size)), [])
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = collections.deque(pool.submit(readable, c) for c in itertools.islice(chunks, 2))
    while pending:
      batch = pending.popleft().result()
      for more in itertools.islice(chunks, 1):
        pending.append(pool.submit(readable, more))
      report()
      if batch:
        yield [p for p, _ in batch], [a for _, a in batch]
  report()


# ---------------------------------------------------------------------------------- output


class Rows:
  """Rows written as they come: an aligned table (widths from the first batch), JSON lines or CSV.

  With `resume`, the rows `out` already holds are kept where every row of their image is there
  (`per_image` rows), a torn last line or an incomplete image is dropped, and `done` lists the
  images not to process again.
  """

  def __init__(self, out: str | None, fmt: str, *, resume: bool = False, per_image: int = 1):
    if resume and (not out or fmt == 'table'):
      raise InputError('--resume needs --out FILE with --format jsonl or csv')
    self.fmt, self.keys, self.widths = fmt, None, None
    self.done: set[str] = set()
    kept = self._read(out, per_image) if resume and os.path.exists(out) else []
    self.path = out or '<stdout>'
    self.file = open(out, 'w', newline='') if out else sys.stdout  # noqa: SIM115 - open for the run, closed by close()
    if kept:
      self.keys = list(kept[0])
      self._emit(kept, header=True)
    self.count = 0

  def _read(self, out: str, per_image: int) -> list[dict]:
    with open(out, newline='') as f:
      text = f.read()
    text = text[:text.rfind('\n') + 1]  # a torn last line (a killed write) is dropped
    if self.fmt == 'jsonl':
      rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
      rows = list(csv.DictReader(io.StringIO(text)))
    counts = collections.Counter(r['image'] for r in rows)
    kept = [r for r in rows if counts[r['image']] == per_image]
    self.done = {r['image'] for r in kept}
    return kept

  def _emit(self, rows: list[dict], header: bool) -> None:
    with storage.writing(self.path):  # a full disk: the rows written so far stay (see --resume)
      self._emit_rows(rows, header)

  def _emit_rows(self, rows: list[dict], header: bool) -> None:
    f = self.file
    if self.fmt == 'jsonl':
      f.write(''.join(json.dumps(r) + '\n' for r in rows))
    elif self.fmt == 'csv':
      writer = csv.DictWriter(f, self.keys)
      if header:
        writer.writeheader()
      writer.writerows(rows)
    else:
      cells = [[str(r.get(k, '')) for k in self.keys] for r in rows]
      if self.widths is None:
        self.widths = [max(len(k), *(len(c[j]) for c in cells)) for j, k in enumerate(self.keys)]
      lines = ([self.keys] if header else []) + cells
      f.write(''.join('  '.join(v.ljust(w) for v, w in zip(line, self.widths)).rstrip() + '\n' for line in lines))
    f.flush()

  def write(self, rows: list[dict]) -> None:
    if not rows:
      return
    header = self.keys is None
    self.keys = self.keys or list(rows[0])
    self._emit(rows, header)
    self.count += len(rows)

  def close(self) -> None:
    if self.file is not sys.stdout:
      with storage.writing(self.path):  # flushes what a full disk refused, which fails again
        self.file.close()


# ---------------------------------------------------------------------------------- commands


def _texts(option: str, values: list[str]) -> list[str]:
  if not values:
    raise InputError(f'this command needs at least one {option}')
  return values


def caption_rows(p, paths, images, args) -> list[dict]:
  texts, conf = p.caption(images, prompt=args.prompt, seed=args.seed, return_confidence=True,
                          num_beams=args.beams, max_length=args.max_length, min_length=args.min_length,
                          sample=args.sample, top_p=args.top_p, top_k=args.top_k, temperature=args.temperature,
                          repetition_penalty=args.repetition_penalty)
  return [{'image': path, 'caption': t, 'confidence': round(float(c), 4)} for path, t, c in zip(paths, texts, conf)]


def itm_rows(p, paths, images, args) -> list[dict]:
  scores = p.itm(images, args.text)
  return [{'image': path, 'text': text, 'itm': round(float(scores['itm'][i, j]), 4),
           'itc': round(float(scores['itc'][i, j]), 4)}
          for i, path in enumerate(paths) for j, text in enumerate(args.text)]


def gradcam_rows(p, paths, images, args) -> list[dict]:
  """The map of each (image, text) is the mean over the text's words, drawn over the image."""
  from blip_jax.inference.heatmap import overlay
  out = p.gradcam(images, args.text, layer=args.layer)
  os.makedirs(args.maps, exist_ok=True)
  rows = []
  for i, (path, image) in enumerate(zip(paths, images)):
    # The path's hash keeps images of one name in different folders apart.
    stem = f'{os.path.splitext(os.path.basename(path))[0]}-{hashlib.sha1(path.encode()).hexdigest()[:8]}'
    for j, text in enumerate(args.text):
      file = os.path.join(args.maps, f'{stem}-{j}.png')
      overlay(image, out['maps'][i, j, 1]).save(file)
      rows.append({'image': path, 'text': text, 'itm': round(float(out['itm'][i, j]), 4), 'map': file})
  return rows


def vqa_rows(p, paths, images, args) -> list[dict]:
  answers = p.vqa(images, args.question, answers=args.answer_list, k_test=args.k_test,
                  mask_question_padding=args.mask_question_padding)
  return [{'image': path, 'question': q, 'answer': a} for path, row in zip(paths, answers)
          for q, a in zip(args.question, row)]


def classify_rows(p, paths, images, args) -> list[dict]:
  rows = []
  for path, top in zip(paths, p.classify(images, args.class_names, templates=args.template, top=args.top)):
    rows.append({'image': path, **{f'top{r + 1}': c for r, (c, _) in enumerate(top)},
                 **{f'p{r + 1}': round(prob, 4) for r, (_, prob) in enumerate(top)}})
  return rows


# ---------------------------------------------------------------------------------- retrieval index


class Index:
  """An image index: DIR/index.json (the model it was built with) and shards DIR/shard-NNNNN.npz
  of (absolute paths, features), one per batch run, so building can stop and go on at any time."""

  def __init__(self, folder: str, checkpoint: str):
    self.folder, self.meta_path = folder, os.path.join(folder, 'index.json')
    meta = {'checkpoint': os.path.abspath(checkpoint) if os.path.exists(checkpoint) else checkpoint}
    if os.path.exists(self.meta_path):
      with open(self.meta_path) as f:
        have = json.load(f)
      if have['checkpoint'] != meta['checkpoint']:
        raise InputError(f'--index {folder} was built with {have["checkpoint"]}, not {meta["checkpoint"]}')
    elif os.path.exists(folder) and not os.path.isdir(folder):
      raise InputError(f'--index {folder} is a file; the index is a folder (of index.json and shards)')
    self.meta = meta

  def shards(self) -> list[str]:
    if not os.path.isdir(self.folder):
      return []
    return sorted(os.path.join(self.folder, n) for n in os.listdir(self.folder)
                  if n.startswith('shard-') and n.endswith('.npz'))

  def read(self) -> tuple[list[str], np.ndarray]:
    shards = self.shards()
    if not shards:
      raise InputError(f'--index {self.folder} holds no images yet: build it with IMAGES first')
    data = [np.load(s) for s in shards]
    return [str(x) for d in data for x in d['paths']], np.concatenate([d['features'] for d in data])

  def append(self, paths: list[str], features: np.ndarray) -> None:
    os.makedirs(self.folder, exist_ok=True)
    if not os.path.exists(self.meta_path):
      storage.write_atomic(self.meta_path, json.dumps(self.meta).encode())
    shard = io.BytesIO()
    np.savez(shard, paths=np.asarray(paths), features=features)
    storage.write_atomic(os.path.join(self.folder, f'shard-{len(self.shards()):05d}.npz'), shard.getvalue())


def build_index(p, args) -> int:
  index = Index(args.index, args.checkpoint)
  done = set(index.read()[0]) if index.shards() else set()
  count = 0
  for paths, images in image_batches(args.images, args.batch_size, skip=done):
    paths = [os.path.abspath(x) for x in paths]
    fresh = [(x, im) for x, im in zip(paths, images) if x not in done]
    if fresh:
      index.append([x for x, _ in fresh], p.embed_images([im for _, im in fresh]))
      count += len(fresh)
  print(f'{args.index}: {count} images added, {len(done) + count} in all', file=sys.stderr)
  return count


def query_index(p, args) -> list[dict]:
  paths, features = Index(args.index, args.checkpoint).read()
  rows = []
  if args.query:
    for query, top in zip(args.query, p.retrieve(args.query, features, top=args.top, images=paths if args.rerank else (),
                                                 rerank=args.rerank)):
      rows += [{'query': query, 'rank': r + 1, 'image': paths[i], 'score': round(s, 4)} for r, (i, s) in enumerate(top)]
  for query in args.image_query:
    if features.ndim != 2:
      raise InputError('--image-query needs one feature per image (BLIP, CLIP); this model has one per query token')
    scores = features @ p.embed_images([to_rgb(query)])[0]
    rows += [{'query': query, 'rank': r + 1, 'image': paths[i], 'score': round(float(scores[i]), 4)}
             for r, i in enumerate(np.argsort(-scores, kind='stable')[:args.top])]
  return rows


# ---------------------------------------------------------------------------------- CLI

COMMANDS = {'caption': caption_rows, 'itm': itm_rows, 'gradcam': gradcam_rows, 'vqa': vqa_rows, 'classify': classify_rows}


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog='blip-jax-predict', description=__doc__.split('\n\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest='command', required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--checkpoint', required=True, help='converted directory, PyTorch checkpoint, HF folder or Hub id')
  common.add_argument('--tokenizer', help='a tokenizer folder or vocab.txt, when the checkpoint has none')
  common.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  common.add_argument('--batch-size', type=int, default=8)
  common.add_argument('--format', default='table', choices=('table', 'jsonl', 'csv'))
  common.add_argument('--out', help='write the rows to this file (default: stdout)')
  common.add_argument('--resume', action='store_true', help='keep the rows --out holds and skip their images')
  common.add_argument('images', nargs='*', help='image files, folders or @list.txt')

  c = sub.add_parser('caption', parents=[common], help='caption images')
  c.add_argument('--beams', type=int, default=3)
  c.add_argument('--sample', action='store_true', help='nucleus sampling instead of beam search')
  c.add_argument('--top-p', type=float, default=0.9)
  c.add_argument('--top-k', type=int, default=0)
  c.add_argument('--temperature', type=float, default=1.0)
  c.add_argument('--repetition-penalty', type=float, default=1.0, help='BLIP uses 1.1 with --sample')
  c.add_argument('--max-length', type=int, default=20, help='tokens, prompt included (BLIP: 20)')
  c.add_argument('--min-length', type=int, default=5, help='tokens, prompt included (BLIP: 5)')
  c.add_argument('--prompt', help="text the caption continues (default: the model's; BLIP 'a picture of ')")
  c.add_argument('--seed', type=int, default=0)

  i = sub.add_parser('itm', parents=[common], help='image-text matching scores')
  i.add_argument('--text', action='append', default=[])

  g = sub.add_parser('gradcam', parents=[common], help='ITM match probability and Grad-CAM heat maps')
  g.add_argument('--text', action='append', default=[])
  g.add_argument('--layer', type=int, default=6, help='the cross-attention layer read (LAVIS: 6 of 12)')
  g.add_argument('--maps', default='gradcam_maps', help='folder for the heat-map PNGs')

  v = sub.add_parser('vqa', parents=[common], help='answer questions about images')
  v.add_argument('--question', action='append', default=[])
  v.add_argument('--answers', help='rank the answers of this file (one per line) instead of generating')
  v.add_argument('--k-test', type=int, default=128,
                 help='ranking scores only the K answers whose first token is likeliest (BLIP: 128)')
  v.add_argument('--mask-question-padding', action='store_true',
                 help="generation masks the padded question tokens (BLIP's generate attends to them)")

  z = sub.add_parser('classify', parents=[common], help='zero-shot classification')
  z.add_argument('--classes', required=True, help='comma-separated class names')
  z.add_argument('--template', action='append', default=[], help="prompt with {} (default 'a picture of a {}.')")
  z.add_argument('--top', type=int, default=5)

  r = sub.add_parser('retrieve', parents=[common], help='build an image index, or query one')
  r.add_argument('--index', required=True, help='the index folder to add IMAGES to, or to query')
  r.add_argument('--query', action='append', default=[], help='a text query')
  r.add_argument('--image-query', action='append', default=[], help='an image query')
  r.add_argument('--top', type=int, default=5)
  r.add_argument('--rerank', type=int, default=0, help='rescore the K best by ITM (BLIP, BLIP-2)')
  return ap


def _check(args) -> int:
  """Validates the options of `args.command`; returns the rows each image makes."""
  if args.batch_size < 1:
    raise InputError(f'--batch-size must be positive, got {args.batch_size}')
  if args.command in ('itm', 'gradcam'):
    return len(_texts('--text', args.text))
  if args.command == 'vqa':
    _texts('--question', args.question)
    args.answer_list = None
    if args.answers:
      try:
        with open(args.answers) as f:
          args.answer_list = [line.strip() for line in f if line.strip()]
      except OSError as e:
        raise InputError(f'--answers {args.answers}: cannot read ({e.strerror})') from e
      if not args.answer_list:
        raise InputError(f'--answers {args.answers}: no answers in the file')
    return len(args.question)
  if args.command == 'classify':
    args.class_names = [c.strip() for c in args.classes.split(',') if c.strip()]
    if not args.class_names:
      raise InputError('`classify` needs --classes a,b,c')
    args.template = args.template or list(DEFAULT_TEMPLATES)
  return 1


def run(argv=None, *, collect: bool = True) -> list[dict]:
  """Parse `argv`, run the command, write its rows; returns the rows written by this call (with
  `collect`; the command line keeps none, so its memory does not grow with the inputs)."""
  from blip_jax.inference import Predictor
  args = parser().parse_args(argv)
  per_image = _check(args)
  querying = args.command == 'retrieve' and not args.images
  if querying and not (args.query or args.image_query):
    raise InputError('`retrieve` needs IMAGES (to add to --index) or --query / --image-query (to search it)')
  if not querying and not args.images:
    raise InputError(f'`{args.command}` needs images (files, folders or @list.txt)')
  p = Predictor.from_pretrained(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer,
                                batch_size=args.batch_size)
  if args.command == 'retrieve' and not querying:
    if not build_index(p, args) and not Index(args.index, args.checkpoint).shards():
      raise InputError('no readable images among the inputs')
    return []
  rows = Rows(args.out, args.format, resume=args.resume, per_image=per_image)
  written = []
  try:
    if querying:
      written = query_index(p, args)
      rows.write(written)
    else:
      for paths, images in image_batches(args.images, args.batch_size, skip=rows.done):
        batch = COMMANDS[args.command](p, paths, images, args)
        rows.write(batch)
        if collect:
          written += batch
      if not rows.count and not rows.done:
        raise InputError('no readable images among the inputs')
  finally:
    rows.close()
  return written


def main(argv=None) -> int:
  return cli.main(lambda a: run(a, collect=False), argv)


if __name__ == '__main__':
  sys.exit(main())
