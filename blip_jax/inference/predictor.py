"""`Predictor`: a model with its preprocessing and tokenizer, for every family.

    p = Predictor.from_pretrained('Salesforce/blip-image-captioning-base')   # or a path
    p.caption(['cat.jpg'])                       # ['a cat sitting on a couch']
    p.itm(['cat.jpg'], ['a cat', 'a dog'])       # {'itm': [1, 2] match probabilities, 'itc': cosines}
    p.classify(['cat.jpg'], ['cat', 'dog'])      # [[('cat', 0.97), ('dog', 0.03)]]

Images are paths, PIL images or uint8 arrays; they are preprocessed in numpy as the originals
do (`blip_jax.data.preprocess`) and run in fixed-size batches (`batch_size`, the last one padded,
split over the local devices) through functions compiled once per shape. What a method needs of
the model is asked of the model (`caption_decoder`, `encode_image`, `itm_logits`, ...), so a
method works for every family whose models can do it, and says clearly when one cannot.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip_jax import generate, hub, model_io, registry
from blip_jax.data.preprocess import eval_transform
from blip_jax.inference.images import to_rgb
from blip_jax.zero_shot import check_templates, ensemble_prompts

DEFAULT_TEMPLATES = ('a picture of a {}.',)


@dataclasses.dataclass(frozen=True)
class CaptionSettings:
  """How captions are decoded (the originals' defaults: beam search, 3 beams, 5 to 20 tokens with
  the prompt); `sample=True` is nucleus sampling (BLIP's CapFilt: top_p 0.9, repetition 1.1)."""
  num_beams: int = 3
  max_length: int = 20
  min_length: int = 5
  sample: bool = False
  top_p: float = 0.9
  top_k: int = 0
  temperature: float = 1.0
  repetition_penalty: float = 1.0
  length_penalty: float = 1.0


class Predictor:
  def __init__(self, model: nnx.Module, config, tokenizer, *, task: str, batch_size: int = 8):
    self.family = registry.family_of(config)
    self.config, self.tokenizer, self.task = config, tokenizer, task
    # The batch is split over this host's devices, the weights replicated on each (Auto axes:
    # XLA places the rest).
    self.mesh = jax.make_mesh((jax.local_device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                              devices=jax.local_devices())
    self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size  # a multiple of the devices
    self.graphdef, state = nnx.split(model)
    self.state = jax.device_put(state, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    # What the model can do is asked of its class: keeping the model itself would hold a second
    # copy of the weights beside the replicated state.
    self.model_class = type(model)
    self._rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec('data'))
    self._jitted: dict[str, Callable] = {}
    self.image_size = config.vision.image_size if hasattr(config, 'vision') else None
    self._transform = eval_transform(self.family.image_transform, self.image_size) if self.image_size else None

  @classmethod
  def from_pretrained(cls, source, *, dtype: str = 'float32', tokenizer=None, batch_size: int = 8,
                      **convert_kwargs) -> Predictor:
    """`source`: a converted directory, a PyTorch checkpoint file or a list of files (`.pth`, `.bin`,
    `.safetensors`, TorchScript), an HF model folder, or an HF Hub id (resolved through the HF cache).

    `dtype='bfloat16'` stores the weights in bf16 (half the memory) and computes in bf16.
    `tokenizer`: a folder or vocab.txt, when the source carries none. `convert_kwargs` go to the
    converter (`task`, `image_size`, `act`, ...) for sources that are not converted directories.
    """
    if dtype not in ('float32', 'bfloat16'):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    from blip_jax.data import tokenizer as tokenizers
    if hub.looks_like_hub_id(source):
      source = hub.resolve(source)
    if model_io.is_model_dir(source):
      if convert_kwargs:
        raise ValueError(f'{source} is already converted; {sorted(convert_kwargs)} apply to PyTorch checkpoints only')
      model, config = model_io.load(source, dtype=dtype)
      task = model_io.read_config(source)['task']
      tok = _tokenizer_arg(tokenizer, registry.family_of(config)) or model_io.load_tokenizer(source)
    else:
      from blip_jax.convert import load_torch
      model, config, report = load_torch(source, **convert_kwargs)
      task, family = report.task, registry.family_of(config)
      if dtype == 'bfloat16':
        model = _cast_params(model, jnp.bfloat16)
      folders = [s for s in (source if isinstance(source, (list, tuple)) else [source])
                 if isinstance(s, (str, os.PathLike)) and os.path.isdir(s)]
      tok = _tokenizer_arg(tokenizer, family) or next(
          (t for t in (tokenizers.from_folder(f, family.tokenizer) for f in folders) if t is not None), None)
      if tok is None:
        raise ValueError(f'{source}: no tokenizer found beside the weights; pass tokenizer= (a bert-base-uncased '
                         'folder or vocab.txt for BLIP / BLIP-2, the HF tokenizer folder for CLIP / OPT)')
      registry.check_tokenizer(config, tok, where=str(source))
    if dtype == 'bfloat16':  # compute in bf16 too: the graph is rebuilt from the bf16 config
      config = registry.with_dtype(config, 'bfloat16')
      model = _rebuild(model, config, task)
    return cls(model, config, tok, task=task, batch_size=batch_size)

  # ------------------------------------------------------------------ processing
  def preprocess(self, images: Sequence) -> np.ndarray:
    """Images (paths, PIL images, uint8 arrays) -> float32 [N, S, S, 3], normalised."""
    if self._transform is None:
      raise ValueError(f'a {self.family.name} model takes no images')
    return np.stack([self._transform(to_rgb(im)) for im in images])

  def clean(self, texts: Sequence[str]) -> list[str]:
    """The originals' text cleaning for BLIP's tokenizer (`pre_caption`); other tokenizers see
    texts as they are."""
    return [self.tokenizer.clean(t) for t in texts] if hasattr(self.tokenizer, 'clean') else list(texts)

  def tokenize(self, texts: Sequence[str], first_token: str = 'cls'):
    """Token ids and mask [N, L] (L: the family's text length), cleaned as the originals clean."""
    return self.tokenizer.encode(self.clean(texts), self.family.text_length(self.config), first_token)

  # ------------------------------------------------------------------ running
  def require(self, what: str, *methods: str) -> None:
    missing = [m for m in methods if not hasattr(self.model_class, m)]
    if missing:
      raise ValueError(f'{what} needs a model with {", ".join(missing)}; this is a {self.family.name} {self.task} '
                       f'model ({self.model_class.__name__})')

  def run(self, name: str, fn: Callable, *args):
    """`fn(model, *args)` jitted once per name (and shapes) on the split state. The first `fn`
    given a name is the one compiled, for new shapes too: everything that varies between calls
    must be an argument or part of the name, never a value `fn` closes over."""
    if name not in self._jitted:
      graphdef = self.graphdef
      self._jitted[name] = jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))
    return self._jitted[name](self.state, *args)

  def map_images(self, name: str, fn: Callable, images: Sequence, *args, seed: int | None = None) -> Any:
    """`fn(model, pixels [batch_size, S, S, 3], *args)` over `images` in padded batches; the outputs
    (rows first) concatenated as numpy without the padding. With `seed`, `fn` also gets a random
    key per batch (`fold_in(key(seed), batch)`)."""
    out = []
    for batch, start in enumerate(range(0, len(images), self.batch_size)):
      pixels = self.preprocess(images[start:start + self.batch_size])
      n = len(pixels)
      pixels = np.concatenate([pixels, np.repeat(pixels[:1], self.batch_size - n, 0)])
      key = () if seed is None else (jax.random.fold_in(jax.random.key(seed), batch),)
      result = self.run(name, fn, jax.device_put(pixels, self._rows), *args, *key)
      out.append(jax.tree.map(lambda x: np.asarray(x)[:n], result))
    if not out:
      raise ValueError('no images given')
    return jax.tree.map(lambda *xs: np.concatenate(xs), *out)

  # ------------------------------------------------------------------ tasks
  def caption(self, images: Sequence, *, prompt: str | None = None, seed: int = 0, return_confidence: bool = False,
              **settings) -> list[str] | tuple[list[str], np.ndarray]:
    """Captions of `images` (`CaptionSettings` keywords: num_beams, max_length, ...), continuing
    `prompt` (default: the model's, BLIP's 'a picture of '). With `return_confidence`, also the
    geometric mean probability of each caption's generated tokens."""
    self.require('caption', 'image_embeds', 'caption_decoder')
    s = CaptionSettings(**settings)
    prompt = getattr(self.config, 'prompt', '') if prompt is None else prompt
    ids, confidence = self._generate(f'caption:{s}', images, self.tokenizer.decoder_prompt(prompt), s, seed)
    texts = self.tokenizer.decode_captions(ids, prompt)
    return (texts, confidence) if return_confidence else texts

  def _generate(self, name, images, prompt_ids, s: CaptionSettings, seed: int):
    """Generated ids [N, L] (prompt included) and confidences [N] of every image, from `prompt_ids`
    [1, P] through the model's caption decoder."""
    def decode(m, x, prompt_ids, key):  # the prompt an argument: the compiled function serves every prompt
      p = prompt_ids.shape[1]
      embeds = m.image_embeds(x)
      decoder, condition = m.caption_decoder(embeds)
      special = m.caption_token_ids()
      lengths = dict(max_length=s.max_length, min_length=s.min_length, repetition_penalty=s.repetition_penalty,
                     **special)
      start = jnp.broadcast_to(prompt_ids, (x.shape[0], p))
      if s.sample:
        ids = generate.sample(decoder, condition, start, rng=key, top_p=s.top_p, top_k=s.top_k,
                              temperature=s.temperature, **lengths)[:, 0]
      elif s.num_beams > 1:
        ids = generate.beam_search(decoder, condition, start, num_beams=s.num_beams, length_penalty=s.length_penalty,
                                   **lengths)[0][:, 0]
      else:
        ids = generate.greedy(decoder, condition, start, **lengths)
      real = (ids != special['pad_token_id']).astype(jnp.int32)
      return ids, confidence(m.caption_logits(embeds, ids, real), ids, p, special['pad_token_id'])

    return self.map_images(name, decode, images, jnp.asarray(prompt_ids), seed=seed)

  def itm(self, images: Sequence, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Every image against every text: {'itm': match probability [N_img, N_txt] (the ITM head;
    BLIP-2: averaged over the queries), 'itc': similarity [N_img, N_txt] (cosine; BLIP-2: the best
    query's)}."""
    self.require('itm', 'itm_logits', 'image_features', 'encode_text')
    if not texts:
      raise ValueError('itm needs at least one text')
    ids, mask = self.tokenize(texts)

    def scores(m, x, ids, mask):
      embeds = m.image_embeds(x)
      b, n = x.shape[0], ids.shape[0]
      itc = m.similarity(m.image_features(embeds), m.encode_text(ids, mask))
      logits = m.itm_logits(jnp.repeat(embeds, n, 0), jnp.tile(ids, (b, 1)), jnp.tile(mask, (b, 1)))
      return jax.nn.softmax(logits, -1)[:, 1].reshape(b, n), itc

    match, itc = self.map_images('itm', scores, images, ids, mask)
    return {'itm': match, 'itc': itc}

  def gradcam(self, images: Sequence, texts: Sequence[str], *, layer: int = 6) -> dict[str, np.ndarray]:
    """Grad-CAM of every image with every text (BLIP ITM models, as LAVIS `compute_gradcam` at
    cross-attention `layer`): {'itm': match probability [N_img, N_txt], 'maps': [N_img, N_txt,
    L + 1, g, g]} on the model's g x g patch grid, rows 0 the `[ENC]` token, 1 the mean over the
    text's words, 1 + t token t (`blip_jax.models.gradcam`); `inference.heatmap.overlay` draws one."""
    self.require('gradcam', 'itm_gradcam')
    if not texts:
      raise ValueError('gradcam needs at least one text')
    ids, mask = self.tokenize(texts)

    def pairs(m, x, ids, mask):
      b, n = x.shape[0], ids.shape[0]
      maps, logits = m.itm_gradcam(jnp.repeat(m.image_embeds(x), n, 0), jnp.tile(ids, (b, 1)), jnp.tile(mask, (b, 1)),
                                   layer=layer)
      return jax.nn.softmax(logits, -1)[:, 1].reshape(b, n), maps.reshape(b, n, *maps.shape[1:])

    match, maps = self.map_images(f'gradcam-{layer}', pairs, images, ids, mask)  # the layer names the program
    return {'itm': match, 'maps': maps}

  def embed_images(self, images: Sequence) -> np.ndarray:
    """Normalised contrastive image features [N, E] (BLIP-2: [N, queries, E])."""
    self.require('embed_images', 'encode_image')
    return self.map_images('embed_images', lambda m, x: m.encode_image(x), images)

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Normalised contrastive text features [N, E]."""
    self.require('embed_texts', 'encode_text')
    ids, mask = self.tokenize(texts)
    out = [np.asarray(self.run('embed_texts', lambda m, i, k: m.encode_text(i, k), *_padded(ids[rows], mask[rows],
                                                                                            size=self.batch_size)))[:len(rows)]
           for rows in _chunks(len(texts), self.batch_size)]
    return np.concatenate(out)

  def similarity(self, image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """The model's contrastive similarity [N_img, N_txt] of embedded images and texts."""
    out = [np.asarray(self.run('similarity', lambda m, i, t: m.similarity(i, t),
                               *_padded(image_features[rows], size=self.batch_size), text_features))[:len(rows)]
           for rows in _chunks(len(image_features), self.batch_size)]
    return np.concatenate(out)

  def retrieve(self, queries: Sequence[str], image_features: np.ndarray, *, top: int = 5, images: Sequence = (),
               rerank: int = 0) -> list[list[tuple[int, float]]]:
    """The `top` images of an index (`embed_images` output) for each text query: [(image index,
    score)] best first. With `rerank=k` and the index's `images`, the k best by similarity are
    rescored as BLIP's evaluation does (ITM match logit + similarity)."""
    sim = self.similarity(image_features, self.embed_texts(queries))  # [N_img, N_query]
    out = []
    for q in range(sim.shape[1]):
      order = np.argsort(-sim[:, q], kind='stable')
      scores = sim[:, q].copy()
      if rerank:
        self.require('retrieve(rerank=...)', 'itm_logits')
        if len(images) != len(image_features):
          raise ValueError(f'rerank needs the {len(image_features)} images of the index, got {len(images)}')
        candidates = order[:rerank]
        ids, mask = self.tokenize([queries[q]])
        logits = self.map_images('itm_logit', lambda m, x, i, k: m.itm_logits(
            m.image_embeds(x), jnp.tile(i, (x.shape[0], 1)), jnp.tile(k, (x.shape[0], 1)))[:, 1],
            [images[i] for i in candidates], ids, mask)
        scores = np.full_like(scores, -100.0)
        scores[candidates] = logits + sim[candidates, q]
        order = np.argsort(-scores, kind='stable')
      out.append([(int(i), float(scores[i])) for i in order[:top]])
    return out

  def vqa(self, images: Sequence, questions: Sequence[str], *, answers: Sequence[str] | None = None,
          num_beams: int | None = None, k_test: int = 128, mask_question_padding: bool = False) -> list[list[str]]:
    """The answer to every question about every image ([image][question]). BLIP VQA: generated
    (beam 3, at most 10 tokens) or, with `answers`, the best-ranked of the list, by the
    original's rules: ranking scores only the `k_test` answers whose first token is likeliest;
    generation attends over the padded question positions too (`question_atts = ones` in BLIP's
    `blip_vqa.py`; `mask_question_padding=True` masks them, as training does). BLIP-2 with an
    LLM: generated from LAVIS's prompt ('Question: {} Short answer:', beam 5, 10 new tokens)."""
    if not questions:
      raise ValueError('vqa needs at least one question')
    if k_test < 1:
      raise ValueError(f'k_test must be at least 1, got {k_test}')
    if hasattr(self.model_class, 'question_states'):
      return self._vqa_question_states(images, questions, answers, num_beams or 3, k_test, mask_question_padding)
    if answers is not None:
      raise ValueError(f'answers= (ranking a list) needs a BLIP VQA model; this is a {self.family.name} {self.task} '
                       'model, which generates its answers')
    self.require('vqa', 'caption_decoder')
    vqa_prompt = getattr(self.config, 'vqa_prompt', None)
    if not vqa_prompt or not hasattr(self.model_class, 'prefix'):
      raise ValueError(f'vqa needs a BLIP VQA model or BLIP-2 with an LLM; this is a {self.family.name} {self.task} '
                       'model')
    out = [[] for _ in images]
    for question in questions:
      prompt_ids = self.tokenizer.decoder_prompt(vqa_prompt.format(question))
      s = CaptionSettings(num_beams=num_beams or 5, max_length=prompt_ids.shape[1] + 10, min_length=1,
                          length_penalty=-1.0)
      ids, _ = self._generate(f'vqa:{s}', images, prompt_ids, s, 0)
      for row, text in zip(out, self.tokenizer.decode(ids[:, prompt_ids.shape[1]:])):
        row.append(text.strip())
    return out

  def _vqa_question_states(self, images, questions, answers, num_beams, k_test, mask_question_padding):
    from blip_jax.data.text import pre_question
    q_ids, q_mask = self.tokenizer.encode([pre_question(q) for q in questions], self.family.text_length(self.config),
                                          'enc')

    # Questions and answers are arguments, not constants of the compiled function (see `run`).
    def states(m, x, q_ids, q_mask):
      b, n = x.shape[0], q_ids.shape[0]
      mask = jnp.tile(q_mask, (b, 1))
      return m.question_states(jnp.repeat(m.image_embeds(x), n, 0), jnp.tile(q_ids, (b, 1)), mask), mask

    tok = self.tokenizer
    if answers is not None:
      if not answers:
        raise ValueError('answers= is empty')
      a_ids, a_mask = tok.encode(list(answers), 12, 'dec')

      def best(m, x, q_ids, q_mask, a_ids, a_mask):
        s, mask = states(m, x, q_ids, q_mask)
        return m.rank_answers(s, mask, a_ids, a_mask, k_test).reshape(x.shape[0], -1)

      picked = self.map_images(f'vqa_rank:{k_test}', best, images, q_ids, q_mask, a_ids, a_mask)
      return [[answers[j] for j in row] for row in picked]

    def answer(m, x, q_ids, q_mask):
      s, mask = states(m, x, q_ids, q_mask)
      mask = mask if mask_question_padding else jnp.ones_like(mask)
      start = jnp.full((s.shape[0], 1), tok.bos_token_id, jnp.int32)
      ids = generate.beam_search(m.answer_decoder, (s, mask), start, num_beams=num_beams, max_length=10, min_length=1,
                                 eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)[0][:, 0]
      return ids.reshape(x.shape[0], q_ids.shape[0], -1)

    ids = self.map_images(f'vqa_generate:{num_beams}:{mask_question_padding}', answer, images, q_ids, q_mask)
    return [[t.strip() for t in tok.decode(row)] for row in ids]

  def classify(self, images: Sequence, class_names: Sequence[str], *, templates: Sequence[str] = DEFAULT_TEMPLATES,
               top: int = 5) -> list[list[tuple[str, float]]]:
    """Zero-shot top-`top` classes of every image: [(class name, probability)] best first, the
    probabilities a softmax of the contrastive logits (`itc_scale` x similarity) over
    prompt-ensembled class embeddings."""
    self.require('classify', 'encode_image', 'encode_text', 'similarity', 'itc_scale')
    if not class_names:
      raise ValueError('classify needs at least one class name')
    check_templates(templates)
    prompts = self.embed_texts([t.format(c) for c in class_names for t in templates])
    classes = np.asarray(ensemble_prompts(jnp.asarray(prompts).reshape(len(class_names), len(templates), -1)))

    def probs(m, x, classes):
      return jax.nn.softmax(m.itc_scale() * m.similarity(m.encode_image(x), classes), -1)

    p = self.map_images('classify', probs, images, classes)
    k = min(top, len(class_names))
    return [[(class_names[c], float(row[c])) for c in np.argsort(-row, kind='stable')[:k]] for row in p]


# ---------------------------------------------------------------------------------- helpers

def confidence(logits, ids, prompt_length: int, pad_token_id: int):
  """exp(mean log p) of the generated tokens (end token included) from the teacher-forced
  `logits` [B, T, V] of `ids` [B, T] (position t predicts token t + 1)."""
  real = (ids != pad_token_id).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  token_logp = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  generated = real[:, 1:] * (jnp.arange(1, ids.shape[1]) >= prompt_length)[None]
  return jnp.exp((token_logp * generated).sum(1) / jnp.maximum(generated.sum(1), 1))


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield np.arange(start, min(start + size, n))


def _padded(*arrays, size: int):
  """`arrays` padded to `size` rows with copies of their first row (one compiled shape)."""
  return tuple(np.concatenate([a, np.repeat(a[:1], size - len(a), 0)]) for a in arrays)


def _tokenizer_arg(tokenizer, family):
  """`tokenizer=` of from_pretrained: None, a tokenizer object, or a folder / vocab.txt."""
  if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
    return tokenizer
  from blip_jax.data import tokenizer as tokenizers
  if os.path.isfile(tokenizer):
    return tokenizers.BlipTokenizer(tokenizer, with_enc=family.with_enc)
  tok = tokenizers.from_folder(tokenizer, family.tokenizer)
  if tok is None:
    raise ValueError(f'tokenizer={tokenizer}: no vocab.txt or HF tokenizer files in it')
  return tok


def _cast_params(model, dtype):
  """The model with its floating parameters stored in `dtype`."""
  graphdef, state = nnx.split(model)
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return nnx.merge(graphdef, jax.tree.map(cast, state))


def _rebuild(model, config, task):
  """`model`'s weights in a model built from `config` (another compute dtype, same weights)."""
  family = registry.family_of(config)
  abstract = nnx.eval_shape(lambda: family.build(task, config))
  _, state = nnx.split(model)
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, state)
