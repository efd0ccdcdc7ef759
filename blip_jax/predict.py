"""Command-line inference: `python -m blip_jax.predict COMMAND --checkpoint DIR [options] IMAGES...`

  caption   captions by beam search (default 3 beams), greedy (--beams 1) or nucleus sampling
            (--sample), each with a confidence (the geometric mean of its tokens' probabilities)
  itm       every image against every --text: ITM match probability and ITC cosine
  retrieve  --index FILE.npz IMAGES...: embed the images and save the index;
            --index FILE.npz --query TEXT (or --image-query IMAGE): the --top best images
  vqa       answers to --question by generation (beam 3, at most 10 tokens), or, with
            --answers FILE (one answer per line), the best-ranked answer of the list
  classify  zero-shot over --classes a,b,c with prompt --template(s): BLIP / BLIP-2 ITC or CLIP

IMAGES are image files, folders (their images, sorted) or @list.txt (one path per line). An input
that is missing or not an image is reported on stderr and skipped; the others are processed.
Output: an aligned table, or one JSON object per line with --json.

The checkpoint is a converted or trained directory (`blip_jax.load`): BLIP, BLIP-2 (stage 1:
caption with the Q-Former, itm, retrieve, classify; stage 2 with OPT: caption) or CLIP. Text goes
through its tokenizer: `vocab.txt` in the directory (train.py puts it there), or --vocab (a
bert-base-uncased folder or vocab.txt) for BLIP and BLIP-2 stage 1, --tokenizer (an HF tokenizer
folder) for CLIP and for BLIP-2 with OPT (the OPT tokenizer). Images are batched
(--batch-size, the last batch padded, so every batch has one shape) and each model function is
compiled once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from blip_jax import features

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
BLIP_TEXT_LENGTH = 35  # the originals' retrieval / ITM / question length
BLIP2_TEXT_LENGTH = 32  # LAVIS Blip2Qformer.max_txt_len
DEFAULT_PROMPTS = {'blip': 'a picture of ', 'blip2': ''}  # BLIP's caption prompt; LAVIS BLIP-2 uses none
DEFAULT_TEMPLATES = ('a picture of a {}.',)


class InputError(ValueError):
  """Bad command-line input: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------- inputs

def list_images(inputs: list[str]) -> tuple[list[str], list[str]]:
  """Expand files, folders and @lists into image paths; returns (paths, problems)."""
  paths, problems = [], []
  for item in inputs:
    if item.startswith('@'):
      try:
        with open(item[1:]) as f:
          listed = [line.strip() for line in f if line.strip()]
      except OSError as e:
        problems.append(f'{item[1:]}: cannot read the list ({e.strerror})')
        continue
      more, bad = list_images(listed)
      paths += more
      problems += bad
    elif os.path.isdir(item):
      found = sorted(os.path.join(item, n) for n in os.listdir(item) if n.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        problems.append(f'{item}: folder holds no images ({", ".join(IMAGE_EXTENSIONS)})')
      paths += found
    elif os.path.isfile(item):
      paths.append(item)
    else:
      problems.append(f'{item}: no such file or folder')
  return paths, problems


def read_image(path: str) -> np.ndarray:
  """RGB uint8 [H, W, 3]; raises InputError naming the file."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise InputError(f'{path}: not a readable image ({e})') from e


class Images:
  """The readable images of the inputs, preprocessed for the model, in fixed-size batches."""

  def __init__(self, inputs, transform: str, size: int, batch_size: int):
    from blip_jax.data.transforms import image_function
    self.transform = image_function(transform, size)
    self.batch_size = batch_size
    candidates, self.problems = list_images(inputs)
    self.paths, self.pixels = [], []
    for path in candidates:
      try:
        self.pixels.append(self.transform(read_image(path), (0, 0)))
        self.paths.append(path)
      except InputError as e:
        self.problems.append(str(e))
    for problem in self.problems:
      print(f'skipped {problem}', file=sys.stderr)
    if not self.paths:
      raise InputError('no readable images among the inputs')

  def batches(self, desc: str):
    """(batch [batch_size, S, S, 3], number of real rows) with the last batch padded."""
    for start in tqdm.trange(0, len(self.paths), self.batch_size, desc=desc, leave=False,
                             disable=len(self.paths) <= self.batch_size):
      rows = self.pixels[start:start + self.batch_size]
      pad = [rows[0]] * (self.batch_size - len(rows))
      yield np.stack(rows + pad), len(rows)

  def map(self, fn, desc: str):
    """`fn(batch)` (a pytree of arrays with rows first) over all images, padding dropped."""
    out = [jax.tree.map(lambda x: np.asarray(x)[:n], fn(batch)) for batch, n in self.batches(desc)]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *out)


# ---------------------------------------------------------------------------------- model

class Predictor:
  """A loaded checkpoint with its tokenizer; its functions run under jit on the split state."""

  def __init__(self, checkpoint: str, vocab: str | None = None, tokenizer: str | None = None):
    from blip_jax import model_io
    if not model_io.is_model_dir(checkpoint):
      raise InputError(f'--checkpoint {checkpoint}: not a blip_jax model directory (convert it with '
                       'convert_torch_weights.py, or use a training run\'s model/ folder)')
    meta = model_io.read_config(checkpoint)
    self.family, self.task = meta['family'], meta['task']
    model, self.config = model_io.load(checkpoint)
    self.graphdef, self.state = nnx.split(model)
    self.model = model
    self.image_size = self.config.vision.image_size
    self.with_opt = getattr(self.config, 'opt', None) is not None  # BLIP-2 stage 2
    self.transform = 'clip_eval' if self.family in ('clip', 'chinese_clip') else 'blip_eval'
    self.tokenizer = self._tokenizer(checkpoint, vocab, tokenizer)
    self._jitted = {}

  def _tokenizer(self, checkpoint, vocab, tokenizer):
    if self.family not in ('blip', 'blip2', 'clip', 'chinese_clip'):
      raise InputError(f'{self.family} checkpoints are not served by blip_jax.predict; use the Python API')
    if tokenizer:  # CLIP: CLIPTokenizer; Chinese-CLIP: BertTokenizer; BLIP-2 stage 2: OPT's GPT-2 BPE
      import transformers
      return transformers.AutoTokenizer.from_pretrained(tokenizer)
    if self.with_opt:
      raise InputError(f'{checkpoint} is BLIP-2 with OPT: pass --tokenizer (a local OPT tokenizer folder, '
                       'e.g. facebook/opt-2.7b)')
    from blip_jax.data.tokenizer import BlipTokenizer
    vocab = vocab or os.path.join(checkpoint, 'vocab.txt')  # BLIP, and CLIP trained by train.py
    if not os.path.exists(vocab):
      raise InputError(f'{checkpoint} has no vocab.txt: pass --vocab (a bert-base-uncased folder or vocab.txt)'
                       ' or, for CLIP, --tokenizer (a local HF tokenizer folder)')
    tok = BlipTokenizer(vocab, with_enc=self.family != 'blip2')  # BLIP-2 adds [DEC] only
    bos = getattr(self.config, 'bos_token_id', None)
    if self.family in ('blip', 'blip2') and bos is not None and tok.bos_token_id != bos:
      raise InputError(f'{vocab}: its [DEC] would be token {tok.bos_token_id}, the checkpoint\'s is {bos} '
                       '(a vocabulary of another size than the model\'s)')
    return tok

  def encode(self, texts, first_token='cls'):
    """Token ids and mask [N, L]: BLIP's tokenizer (first-token rules), or the HF tokenizer."""
    from blip_jax.data.tokenizer import BlipTokenizer
    if self.family == 'blip2':
      length = BLIP2_TEXT_LENGTH
    else:
      length = getattr(self.config.text, 'context_length', BLIP_TEXT_LENGTH)
    if isinstance(self.tokenizer, BlipTokenizer):
      return self.tokenizer.encode(texts, length, first_token)
    enc = self.tokenizer(list(texts), padding='max_length', truncation=True, max_length=length, return_tensors='np')
    return enc['input_ids'], enc['attention_mask']

  def require(self, command: str, *attrs: str):
    missing = [a for a in attrs if not hasattr(self.model, a)]
    if missing:
      raise InputError(f'`{command}` needs a model with {", ".join(missing)}; this checkpoint is a '
                       f'{self.family} {self.task} model')

  def run(self, name: str, fn, *args):
    """`fn(model, *args)` compiled once per name (and shape)."""
    if name not in self._jitted:
      graphdef = self.graphdef
      self._jitted[name] = jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))
    return self._jitted[name](self.state, *args)

  # --- shared pieces --------------------------------------------------------------------

  def image_features(self, images: Images):
    """Normalised ITC image features [N, E] (BLIP-2: [N, queries, E])."""
    return images.map(lambda x: self.run('image_feat', features.image_features, x), 'images')

  def text_features(self, texts) -> np.ndarray:
    """Normalised ITC text features [N, E]."""
    ids, mask = self.encode(texts)
    return np.asarray(self.run('text_feat', features.text_features, ids, mask))


# ---------------------------------------------------------------------------------- commands

@dataclasses.dataclass
class Captioner:
  """What captioning needs of a model family: the decoder (in `blip_jax.generate`'s interface)
  and its conditioning, the start ids, the end / pad ids, the teacher-forced logits of a
  finished caption (for its confidence) and the text of generated ids."""
  prompt_ids: np.ndarray  # [1, P]
  eos_token_id: int
  pad_token_id: int
  decoder: Callable  # (model, image_embeds) -> (decoder, encoder_states)
  logits: Callable  # (model, image_embeds, ids, mask) -> [B, T, V] predicting ids[:, 1:]
  texts: Callable  # ids [N, L] -> captions without the prompt


def captioner(p: Predictor, prompt: str) -> Captioner:
  tok = p.tokenizer
  if p.with_opt:  # BLIP-2 stage 2: BOS + prompt before OPT; LAVIS trains captions to end with '\n'
    prompt_ids = np.asarray([[tok.bos_token_id, *tok(prompt, add_special_tokens=False)['input_ids']]], np.int32)
    q = p.config.qformer.num_query_tokens
    return Captioner(
        prompt_ids, tok('\n', add_special_tokens=False)['input_ids'][0], tok.pad_token_id,
        lambda m, embeds: (m.decoder, m.prefix(embeds)),
        lambda m, embeds, ids, mask: m.logits(embeds, ids, mask)[:, q:],
        lambda ids: [t.strip() for t in tok.batch_decode(np.asarray(ids)[:, prompt_ids.shape[1]:],
                                                         skip_special_tokens=True)])
  texts = lambda ids: [tok.strip_prompt(t, prompt) for t in tok.decode(ids)]
  if p.family == 'blip2':  # stage 1: the Q-Former's image-grounded text generation
    return Captioner(np.asarray(tok.decoder_prompt(prompt)), tok.sep_token_id, tok.pad_token_id,
                     lambda m, embeds: (m.decoder, embeds), lambda m, embeds, ids, mask: m.itg_logits(embeds, ids, mask),
                     texts)
  return Captioner(np.asarray(tok.decoder_prompt(prompt)), tok.sep_token_id, tok.pad_token_id,
                   lambda m, embeds: (m.text_decoder, embeds),
                   lambda m, embeds, ids, mask: m.text_decoder(ids, mask, embeds), texts)


def caption(p: Predictor, images: Images, args) -> list[dict]:
  from blip_jax import generate
  if p.family not in ('blip', 'blip2') or p.task == 'vqa' or not hasattr(p.model, 'image_embeds'):
    raise InputError(f'`caption` needs a BLIP captioning / pretrained or a BLIP-2 checkpoint; this one is a '
                     f'{p.family} {p.task} model')
  p.require('caption', 'decoder' if p.family == 'blip2' else 'text_decoder')
  prompt = DEFAULT_PROMPTS[p.family] if args.prompt is None else args.prompt
  c = captioner(p, prompt)
  prompt_ids = jnp.asarray(c.prompt_ids)
  lengths = dict(max_length=args.max_length, min_length=args.min_length, eos_token_id=c.eos_token_id,
                 pad_token_id=c.pad_token_id, repetition_penalty=args.repetition_penalty)
  key = jax.random.key(args.seed)

  def decode(m, x, key):
    embeds = m.image_embeds(x)
    decoder, states = c.decoder(m, embeds)
    start = jnp.broadcast_to(prompt_ids, (x.shape[0], prompt_ids.shape[1]))
    if args.sample:
      ids = generate.sample(decoder, states, start, rng=key, top_p=args.top_p, top_k=args.top_k,
                            temperature=args.temperature, **lengths)[:, 0]
    elif args.beams > 1:
      ids = generate.beam_search(decoder, states, start, num_beams=args.beams, **lengths)[0][:, 0]
    else:
      ids = generate.greedy(decoder, states, start, **lengths)
    real = (ids != c.pad_token_id).astype(jnp.int32)
    return ids, caption_confidence(c.logits(m, embeds, ids, real), ids, prompt_ids.shape[1], c.pad_token_id)

  def batch(x):
    nonlocal key
    key, sub = jax.random.split(key)
    return p.run('caption', decode, x, sub)

  ids, confidence = images.map(batch, 'caption')
  return [{'image': path, 'caption': t, 'confidence': round(float(conf), 4)}
          for path, t, conf in zip(images.paths, c.texts(ids), confidence)]


def caption_confidence(logits, ids, prompt_length: int, pad_token_id: int):
  """exp(mean log p) of the generated tokens (end token included) from the teacher-forced
  `logits` [B, T, V] of `ids` [B, T] (position t predicts token t + 1)."""
  real = (ids != pad_token_id).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  token_logp = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  generated = real[:, 1:] * (jnp.arange(1, ids.shape[1]) >= prompt_length)[None]
  return jnp.exp((token_logp * generated).sum(1) / jnp.maximum(generated.sum(1), 1))


def itm(p: Predictor, images: Images, args) -> list[dict]:
  p.require('itm', 'itm_logits', 'image_features')
  if not args.text:
    raise InputError('`itm` needs at least one --text')
  ids, mask = p.encode([pre_caption(t) for t in args.text])
  n = len(args.text)

  def scores(m, x):
    embeds = m.image_embeds(x)
    b = x.shape[0]
    itc = m.similarity(m.image_features(embeds), features.text_features(m, ids, mask))
    logits = m.itm_logits(jnp.repeat(embeds, n, 0), jnp.tile(ids, (b, 1)), jnp.tile(mask, (b, 1)))
    return jax.nn.softmax(logits, -1)[:, 1].reshape(b, n), itc

  match, itc = images.map(lambda x: p.run('itm', scores, x), 'itm')
  return [{'image': path, 'text': text, 'itm': round(float(match[i, j]), 4), 'itc': round(float(itc[i, j]), 4)}
          for i, path in enumerate(images.paths) for j, text in enumerate(args.text)]


def pre_caption(text: str) -> str:
  from blip_jax.data.text import pre_caption as clean
  return clean(text, max_words=50)


def retrieve_build(p: Predictor, images: Images, args) -> list[dict]:
  features = p.image_features(images)
  np.savez(args.index, paths=np.asarray([os.path.abspath(x) for x in images.paths]), features=features,
           family=p.family, checkpoint=os.path.abspath(args.checkpoint))
  print(f'wrote {args.index}: {len(images.paths)} images, features {features.shape[1]}-d', file=sys.stderr)
  return []


def retrieve_query(p: Predictor, args) -> list[dict]:
  try:
    index = np.load(args.index)
  except OSError as e:
    raise InputError(f'--index {args.index}: cannot read ({e})') from e
  if str(index['family']) != p.family:
    raise InputError(f'--index {args.index} was built by a {index["family"]} model; --checkpoint is {p.family}')
  queries = [(q, p.text_features([pre_caption(q) if p.family in ('blip', 'blip2') else q])[0]) for q in args.query]
  if args.image_query:
    if p.family == 'blip2':
      raise InputError('--image-query needs one feature per image (BLIP or CLIP); BLIP-2 has one per query token')
    query_images = Images(args.image_query, p.transform, p.image_size, 1)
    queries += list(zip(query_images.paths, p.image_features(query_images)))
  rows = []
  for query, feature in queries:
    scores = features.cosine(index['features'], feature[None])[:, 0]
    for rank, i in enumerate(np.argsort(-scores, kind='stable')[:args.top]):
      rows.append({'query': query, 'rank': rank + 1, 'image': str(index['paths'][i]), 'score': round(float(scores[i]), 4)})
  return rows


def vqa(p: Predictor, images: Images, args) -> list[dict]:
  from blip_jax import generate
  from blip_jax.data.text import pre_question
  if p.family != 'blip':
    raise InputError(f'`vqa` needs a BLIP VQA checkpoint; this one is {p.family} (BLIP-2 with OPT answers from '
                     'Python: README, BLIP-2)')
  p.require('vqa', 'question_states')
  if not args.question:
    raise InputError('`vqa` needs --question')
  tok = p.tokenizer
  questions = [pre_question(q) for q in args.question]
  q_ids, q_mask = p.encode(questions, 'enc')
  n = len(questions)
  if args.answers:
    try:
      with open(args.answers) as f:
        answers = [line.strip() for line in f if line.strip()]
    except OSError as e:
      raise InputError(f'--answers {args.answers}: cannot read ({e.strerror})') from e
    if not answers:
      raise InputError(f'--answers {args.answers}: no answers in the file')
    a_ids, a_mask = tok.encode(answers, 12, 'dec')

    def answer(m, x):
      b = x.shape[0]
      states = m.question_states(jnp.repeat(m.image_embeds(x), n, 0), jnp.tile(q_ids, (b, 1)), jnp.tile(q_mask, (b, 1)))
      scores = m.answer_scores(states, jnp.tile(q_mask, (b, 1)), a_ids, a_mask)
      return jnp.argmax(scores, -1).reshape(b, n)

    best = images.map(lambda x: p.run('vqa_rank', answer, x), 'vqa')
    text = lambda i, j: answers[best[i, j]]
  else:
    def answer(m, x):
      b = x.shape[0]
      mask = jnp.tile(q_mask, (b, 1))
      states = m.question_states(jnp.repeat(m.image_embeds(x), n, 0), jnp.tile(q_ids, (b, 1)), mask)
      start = jnp.full((b * n, 1), tok.bos_token_id, jnp.int32)
      ids = generate.beam_search(m.answer_decoder, (states, mask), start, num_beams=3, max_length=10, min_length=1,
                                 eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)[0][:, 0]
      return ids.reshape(b, n, -1)

    ids = images.map(lambda x: p.run('vqa_generate', answer, x), 'vqa')
    decoded = [tok.decode(row) for row in ids]
    text = lambda i, j: decoded[i][j].strip()
  return [{'image': path, 'question': q, 'answer': text(i, j)}
          for i, path in enumerate(images.paths) for j, q in enumerate(args.question)]


def classify(p: Predictor, images: Images, args) -> list[dict]:
  from blip_jax.zero_shot import ensemble_prompts
  classes = [c.strip() for c in args.classes.split(',') if c.strip()]
  if not classes:
    raise InputError('`classify` needs --classes a,b,c')
  templates = args.template or list(DEFAULT_TEMPLATES)
  bad = [t for t in templates if '{}' not in t]
  if bad:
    raise InputError(f'--template must contain "{{}}" where the class name goes: {bad}')
  if p.family in ('blip', 'blip2'):
    p.require('classify', 'image_features', 'text_features')
  prompts = p.text_features([t.format(c) for c in classes for t in templates])
  classifier = np.asarray(ensemble_prompts(jnp.asarray(prompts).reshape(len(classes), len(templates), -1)))
  if p.family == 'blip':
    scale = 1.0 / float(p.run('temp', lambda m: m.temperature()))
  elif p.family == 'blip2':  # LAVIS divides by the raw temperature
    scale = 1.0 / float(p.run('temp', lambda m: m.temp[...]))
  else:
    scale = float(p.run('scale', lambda m: jnp.exp(m.logit_scale[...])))
  probs = np.asarray(jax.nn.softmax(scale * features.cosine(p.image_features(images), classifier), axis=-1))
  k = min(args.top, len(classes))
  rows = []
  for path, prob in zip(images.paths, probs):
    top = np.argsort(-prob, kind='stable')[:k]
    rows.append({'image': path, **{f'top{r + 1}': classes[c] for r, c in enumerate(top)},
                 **{f'p{r + 1}': round(float(prob[c]), 4) for r, c in enumerate(top)}})
  return rows


# ---------------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog='python -m blip_jax.predict', description=__doc__.split('\n\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest='command', required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--checkpoint', required=True, help='a converted or trained model directory')
  common.add_argument('--vocab', help='BLIP, BLIP-2 stage 1: bert-base-uncased folder or vocab.txt '
                                      '(default: DIR/vocab.txt)')
  common.add_argument('--tokenizer', help='CLIP, BLIP-2 with OPT: a local HF tokenizer folder')
  common.add_argument('--batch-size', type=int, default=8)
  common.add_argument('--json', action='store_true', help='one JSON object per line instead of a table')
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
  c.add_argument('--prompt', help="text the caption continues (default: BLIP 'a picture of ', BLIP-2 none)")
  c.add_argument('--seed', type=int, default=0)

  i = sub.add_parser('itm', parents=[common], help='image-text matching scores')
  i.add_argument('--text', action='append', default=[])

  r = sub.add_parser('retrieve', parents=[common], help='build an image index, or query one')
  r.add_argument('--index', required=True, help='the .npz index to write (with IMAGES) or to query')
  r.add_argument('--query', action='append', default=[], help='a text query')
  r.add_argument('--image-query', action='append', default=[], help='an image query')
  r.add_argument('--top', type=int, default=5)

  v = sub.add_parser('vqa', parents=[common], help='answer questions about images')
  v.add_argument('--question', action='append', default=[])
  v.add_argument('--answers', help='rank the answers of this file (one per line) instead of generating')

  z = sub.add_parser('classify', parents=[common], help='zero-shot classification')
  z.add_argument('--classes', required=True, help='comma-separated class names')
  z.add_argument('--template', action='append', default=[], help="prompt with {} (default 'a picture of a {}.')")
  z.add_argument('--top', type=int, default=5)
  return ap


def run(argv=None) -> list[dict]:
  """Parse `argv`, run the command and return its rows (also printed)."""
  args = parser().parse_args(argv)
  p = Predictor(args.checkpoint, args.vocab, args.tokenizer)
  if args.command == 'retrieve' and not args.images:
    if not (args.query or args.image_query):
      raise InputError('`retrieve` needs IMAGES (to build --index) or --query / --image-query (to search it)')
    rows = retrieve_query(p, args)
  else:
    if not args.images:
      raise InputError(f'`{args.command}` needs images (files, folders or @list.txt)')
    images = Images(args.images, p.transform, p.image_size, args.batch_size)
    command = {'caption': caption, 'itm': itm, 'retrieve': retrieve_build, 'vqa': vqa, 'classify': classify}
    rows = command[args.command](p, images, args)
  print_rows(rows, as_json=args.json)
  return rows


def print_rows(rows: list[dict], as_json: bool) -> None:
  if as_json:
    for row in rows:
      print(json.dumps(row))
    return
  if not rows:
    return
  keys = list(rows[0])
  cells = [[str(row.get(k, '')) for k in keys] for row in rows]
  widths = [max(len(k), *(len(c[j]) for c in cells)) for j, k in enumerate(keys)]
  print('  '.join(k.ljust(w) for k, w in zip(keys, widths)))
  for c in cells:
    print('  '.join(v.ljust(w) for v, w in zip(c, widths)))


def main(argv=None) -> int:
  try:
    run(argv)
  except (InputError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
