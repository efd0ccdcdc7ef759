"""The workloads: each builds a PyTorch reference with random weights, converts it with
`blip_jax.convert.load_torch` (as the tests do), and returns a `Workload` of the two sides."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

from benchmarks.harness import Workload, as_numpy, cost_flops
from benchmarks.settings import CLS, DEC, ENC, RUN, SEP, compute_dtype, torch_ids
from benchmarks.torch_train_step import TorchRetrievalStep, bench_retrieval_loss
from blip_jax import generate, registry
from blip_jax.convert import load_torch
from blip_jax.testing import torch_refs
from blip_jax.train import objectives
from blip_jax.train import state as train_state

SCALES = ('full', 'quick', 'tiny')
# Workloads whose two sides do not fit in 24 GiB together: timed one side after the other by default.
SEQUENTIAL = {('blip_train', 'full'): 'sequential'}


def pick(scale: str, full, quick, tiny):
  """The value for `scale`: 'full' (the issue's sizes), 'quick' (the real widths with 2 layers
  and small batches: minutes on 2 cores) or 'tiny' (1 layer, tiny images: checks the wiring)."""
  return {'full': full, 'quick': quick, 'tiny': tiny}[scale]


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """The model in eval mode with a little noise on every tensor: the libraries' own
  initialisation leaves biases at 0 and norms at 1, so the output check would not see a bias
  that one side drops; 0.02 keeps activations at their usual scale. Tied tensors stay tied."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.02)
  return model.eval()


def attention_of(hf) -> str:
  """The HF model's attention implementation (`attn_implementation`: 'sdpa', 'eager', ...)."""
  return getattr(hf.config, '_attn_implementation', None) or 'eager'


def split_jit(model: nnx.Module, fn: Callable):
  """`jax.jit(fn(model, *inputs))` as a pure function of the model's state, the project's hot
  path (split once, merge inside jit; closing over the model would bake the weights into the
  program as constants); returns (jitted, state)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, *inputs: fn(nnx.merge(graphdef, state), *inputs)), state


def image_batch(batch: int, size: int, seed: int = 1):
  """Normalised-looking random images: torch NCHW (on PyTorch's device) and the same pixels as
  numpy NHWC."""
  x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
  return x.to(RUN.torch_device), x.permute(0, 2, 3, 1).numpy()


def token_batch(batch: int, length: int, *, first: int, end: int, vocab: tuple[int, int], seed: int = 2):
  """ids [B, T] `first ... end` then padding (0), of random lengths (the first row full), and
  their mask, as numpy int32."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(*vocab, size=(batch, length))
  lengths = rng.integers(length // 2, length + 1, size=batch)
  lengths[0] = length
  ids[:, 0] = first
  ids[np.arange(batch), lengths - 1] = end
  mask = np.arange(length)[None] < lengths[:, None]
  return np.where(mask, ids, 0).astype(np.int32), mask.astype(np.int32)


def blip_hf(cls, scale: str, image_size: int):
  """An HF BLIP model of BLIP's real shapes (ViT-B/16, BERT-base with 12 heads; fewer layers
  below full scale) with random weights, and the blip_jax model converted from it."""
  layers = pick(scale, 12, 2, 1)
  config = transformers.BlipConfig(
      vision_config=dict(image_size=image_size, patch_size=16, num_hidden_layers=layers,
                         layer_norm_eps=1e-6),  # BLIP's ViT eps (HF's default is 1e-5)
      text_config=dict(num_hidden_layers=layers, num_attention_heads=12))
  torch.manual_seed(0)
  hf = randomized(cls(config))
  hf.tie_weights()
  task = {transformers.BlipForImageTextRetrieval: 'retrieval',
          transformers.BlipForConditionalGeneration: 'caption'}[cls]
  model, _, _ = load_torch(hf.state_dict(), task=task, **compute_dtype('vision', 'text'))
  return hf.to(RUN.torch_device), model, layers


def blip_texts(batch: int):
  return token_batch(batch, 35, first=CLS, end=SEP, vocab=(1000, 30000))  # BLIP retrieval: 35 tokens


# -------------------------------------------------------------------------------- workloads


def blip_vit(scale: str) -> Workload:
  batch, size = pick(scale, (8, 384), (2, 224), (2, 32))
  hf, model, layers = blip_hf(transformers.BlipForImageTextRetrieval, scale, size)
  x, x_nhwc = image_batch(batch, size)
  fn, state = split_jit(model, lambda m, images: m.image_embeds(images))
  return Workload(f'ViT-B/16 x{layers} layers, {size}px, batch {batch}', batch, fn, (state, x_nhwc),
                  lambda: hf.vision_model(pixel_values=x).last_hidden_state, torch_attention=attention_of(hf))


def blip_text_itm(scale: str) -> Workload:
  """Text features (ITC) and ITM logits of `batch` captions against precomputed image states,
  the work of ranking captions for images (retrieval's re-ranking step)."""
  batch, size = pick(scale, (32, 384), (4, 224), (2, 32))
  hf, model, layers = blip_hf(transformers.BlipForImageTextRetrieval, scale, size)
  ids, mask = blip_texts(batch)
  tokens = (size // 16) ** 2 + 1
  image_states = np.random.default_rng(3).standard_normal((batch, tokens, 768)).astype(np.float32)

  def ours(m, image_states, ids, mask):
    return m.text_features(m.text_embeds(ids, mask)), m.itm_logits(image_states, ids, mask)

  t_ids, t_mask, t_states = torch_ids(ids), torch_ids(mask), torch.from_numpy(image_states).to(RUN.torch_device)
  enc_ids = t_ids.clone()
  enc_ids[:, 0] = ENC  # the HF class leaves the multimodal encoder's first token to the caller

  def theirs():
    text = hf.text_encoder(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
    joint = hf.text_encoder(input_ids=enc_ids, attention_mask=t_mask, encoder_hidden_states=t_states).last_hidden_state
    return torch.nn.functional.normalize(hf.text_proj(text[:, 0]), dim=-1), hf.itm_head(joint[:, 0])

  fn, state = split_jit(model, ours)
  return Workload(f'BERT-base x{layers} layers, 35 tokens, {tokens} image tokens, batch {batch}', batch, fn,
                  (state, image_states, ids, mask), theirs, torch_attention=attention_of(hf))


def blip_train(scale: str) -> Workload:
  """One retrieval fine-tuning step through the project's `Trainer` (its jitted, donated step)."""
  batch, size = pick(scale, (8, 384), (2, 224), (2, 32))
  lr, weight_decay = 1e-5, 0.05  # BLIP's COCO retrieval fine-tuning
  hf, model, layers = blip_hf(transformers.BlipForImageTextRetrieval, scale, size)
  x, x_nhwc = image_batch(batch, size)
  ids, mask = blip_texts(batch)
  rng = np.random.default_rng(4)  # a negative is never the positive: shift by 1..B-1
  neg_image = ((np.arange(batch) + rng.integers(1, batch, batch)) % batch).astype(np.int32)
  neg_text = ((np.arange(batch) + rng.integers(1, batch, batch)) % batch).astype(np.int32)
  # Dropout is off on both sides, so that the outputs are comparable: HF's model is in eval mode,
  # and the project's step (which trains with dropout on) gets a config with rate 0.
  task = objectives.Objective('bench_retrieval', 'blip', 'retrieval', 'pairs', bench_retrieval_loss)
  no_dropout = dataclasses.replace(model.config, text=dataclasses.replace(model.config.text, hidden_dropout=0.0,
                                                                           attention_dropout=0.0))
  # Weight decay on every parameter on both sides: the project's no-decay list matches its own
  # parameter names, which differ from HF's.
  trainer = train_state.Trainer(task, lambda: registry.build('blip', 'retrieval', no_dropout),
                                optax.adamw(lr, weight_decay=weight_decay), train_state.make_mesh())
  state = trainer.with_model(trainer.init(), model)
  data = {'image': x_nhwc, 'text_ids': ids, 'text_mask': mask, 'neg_image': neg_image, 'neg_text': neg_text}
  step = TorchRetrievalStep(hf, lr, weight_decay)
  t_args = (x, *map(torch_ids, (ids, mask, neg_image, neg_text)))

  def params(model):
    """Every parameter but `temp` (HF has none), in the order of the model's tree."""
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
            if 'temp' not in jax.tree_util.keystr(path)]

  def jax_result(out):
    """The loss of the first step and every parameter after it."""
    new_state, metrics = out
    return as_numpy((metrics['loss'], params(trainer.model(new_state))))

  def torch_result(loss):
    """The same from HF's side: its weights after the step converted again."""
    return as_numpy((loss, params(load_torch(hf.state_dict(), task='retrieval')[0])))

  return Workload(f'ITC+ITM step, ViT-B/16 x{layers} + BERT x{layers}, {size}px, batch {batch}', batch,
                  trainer.step_fn, (state, data, np.int32(-1)), lambda: step(*t_args), jax_result=jax_result,
                  torch_result=torch_result, carry=lambda out, args: (out[0], *args[1:]), grad=True,
                  torch_attention=attention_of(hf))


def decode_step_flops(model, decoder_of, condition, images, prompt_rows: int, max_length: int) -> float:
  """FLOPs of one decoding step (one token for each of `prompt_rows` sequences against the full
  cache), from the cost analysis of that step compiled alone."""
  graphdef, state = nnx.split(model)

  def states(state, images):
    return condition(nnx.merge(graphdef, state), images)

  spec = jax.eval_shape(states, state, images)
  spec = jax.ShapeDtypeStruct((prompt_rows, *spec.shape[1:]), spec.dtype)  # beams repeat the rows
  cache = jax.eval_shape(lambda state, s: decoder_of(nnx.merge(graphdef, state)).init_cache(prompt_rows, max_length, s),
                         state, spec)
  slots = jnp.ones((prompt_rows, max_length), jnp.int32)
  step = jax.jit(lambda state, ids, cache: decoder_of(nnx.merge(graphdef, state)).decode(ids, slots, cache))
  return cost_flops(step.lower(state, jax.ShapeDtypeStruct((prompt_rows, 1), jnp.int32), cache).compile())


def decoding(model, decoder_of, condition, search, x_nhwc, prompt, *, rows: int, max_length: int,
             torch_fn, size: str, torch_attention: str) -> Workload:
  """Image -> tokens under one jit: `search(decoder, condition(model, images), prompt)`. The
  minimum length equals the maximum, so every sequence runs all steps on both sides."""
  fn, state = split_jit(model, lambda m, images, prompt: search(decoder_of(m), condition(m, images), prompt))
  # The prompt's call gives the first token; the while loop decodes each later one, one call an
  # iteration (none after the last token), and XLA's cost analysis counts its body once.
  iterations = max_length - prompt.shape[1] - 1
  extra = lambda: max(iterations - 1, 0) * decode_step_flops(model, decoder_of, condition, x_nhwc, rows, max_length)
  return Workload(size, prompt.shape[0], fn, (state, x_nhwc, prompt), torch_fn, extra_flops=extra,
                  torch_attention=torch_attention)


def blip_caption(scale: str) -> Workload:
  """Beam search (3 beams) for 20 tokens after BLIP's prompt 'a picture of'."""
  batch, size = pick(scale, (4, 384), (2, 224), (2, 32))
  beams, new = 3, 20
  hf, model, layers = blip_hf(transformers.BlipForConditionalGeneration, scale, size)
  x, x_nhwc = image_batch(batch, size)
  words = [1037, 3861, 1997]  # a picture of
  prompt = np.asarray([[DEC, *words]] * batch, np.int32)
  max_length = prompt.shape[1] + new
  search = functools.partial(generate.beam_search, num_beams=beams, max_length=max_length, min_length=max_length,
                             eos_token_id=SEP, pad_token_id=0)
  # HF swaps in [DEC] and drops the last token
  hf_ids = torch.tensor([[CLS, *words, SEP]] * batch, device=RUN.torch_device)

  def theirs():
    return hf.generate(pixel_values=x, input_ids=hf_ids, num_beams=beams, do_sample=False, max_length=max_length,
                       min_length=max_length, length_penalty=1.0)

  return decoding(model, lambda m: m.text_decoder, lambda m, images: m.image_embeds(images),
                  lambda *a: search(*a)[0][:, 0], x_nhwc, prompt, rows=batch * beams, max_length=max_length,
                  torch_fn=theirs, torch_attention=attention_of(hf), size=f'ViT-B/16 x{layers} + decoder x{layers}, {size}px, '
                                        f'{beams} beams x {new} tokens, batch {batch}')


def blip2_hf(cls, scale: str, **config):
  """An HF BLIP-2 model with the real Q-Former (BERT-base, 32 queries, cross-attention every 2nd
  layer) reading ViT-g-wide image states. The ViT-g itself (1B parameters) is cut to one layer:
  the Q-Former workload skips it and the captioning one counts it once per caption."""
  layers = pick(scale, 12, 2, 1)
  hf_config = transformers.Blip2Config(
      vision_config=dict(num_hidden_layers=1, layer_norm_eps=1e-6, image_size=pick(scale, 224, 224, 28)),
      qformer_config=dict(num_hidden_layers=layers, use_qformer_text_input=cls is transformers.Blip2ForImageTextRetrieval),
      **config)
  torch.manual_seed(0)
  hf = randomized(cls(hf_config))
  with torch.no_grad():  # EVA has no key bias: the middle third of HF's fused qkv bias stays 0
    for layer in hf.vision_model.encoder.layers:
      width = layer.self_attn.qkv.bias.shape[0] // 3
      layer.self_attn.qkv.bias[width:2 * width] = 0
  hf.tie_weights()
  towers = ('qformer', 'opt') if cls is transformers.Blip2ForConditionalGeneration else ('qformer',)
  model, _, _ = load_torch(hf.state_dict(), family='blip2', ln_vision_eps=1e-6,
                           **compute_dtype(*towers, vision={'ln_eps': 1e-6}))
  return hf.to(RUN.torch_device), model, layers


def blip2_qformer(scale: str) -> Workload:
  """ITC image features [B, 32, 256] from precomputed ViT-g states (ln_vision applied)."""
  batch = pick(scale, 32, 4, 2)
  hf, model, layers = blip2_hf(transformers.Blip2ForImageTextRetrieval, scale)
  states = np.random.default_rng(5).standard_normal((batch, 257, 1408)).astype(np.float32)
  t_states = torch.from_numpy(states).to(RUN.torch_device)

  def theirs():
    queries = hf.qformer(query_embeds=hf.query_tokens.expand(batch, -1, -1), encoder_hidden_states=t_states)
    return torch.nn.functional.normalize(hf.vision_projection(queries.last_hidden_state), dim=-1)

  fn, state = split_jit(model, lambda m, s: m.image_features(s))
  return Workload(f'Q-Former x{layers} layers, 32 queries, 257x1408 image states, batch {batch}', batch, fn,
                  (state, states), theirs, torch_attention=attention_of(hf))


def blip2_opt(scale: str) -> Workload:
  """Greedy captioning with an OPT-125m-sized LLM: one-layer ViT-g, Q-Former, 20 tokens."""
  batch, new = pick(scale, 4, 2, 2), 20
  opt_layers = pick(scale, 12, 2, 1)
  image_token = 50265  # the `<image>` placeholder HF's BLIP-2 processor adds after OPT's vocabulary
  hf, model, layers = blip2_hf(transformers.Blip2ForConditionalGeneration, scale, image_token_index=image_token,
                               text_config=dict(model_type='opt', num_hidden_layers=opt_layers))
  queries = hf.config.num_query_tokens
  size = hf.config.vision_config.image_size
  x, x_nhwc = image_batch(batch, size)
  bos, pad = 2, 1  # OPT's `</s>` starts and ends a text
  prompt = np.full((batch, 1), bos, np.int32)
  max_length = 1 + new
  search = functools.partial(generate.greedy, max_length=max_length, min_length=max_length, eos_token_id=bos,
                             pad_token_id=pad)
  hf_ids = torch.tensor([[image_token] * queries + [bos]] * batch, device=RUN.torch_device)

  def theirs():  # HF counts the query placeholders in the lengths
    return hf.generate(pixel_values=x, input_ids=hf_ids, num_beams=1, do_sample=False,
                       max_length=queries + max_length, min_length=queries + max_length)[:, queries:]

  return decoding(model, lambda m: m.decoder, lambda m, images: m.prefix(m.image_embeds(images)), search, x_nhwc,
                  prompt, rows=batch, max_length=max_length, torch_fn=theirs, torch_attention=attention_of(hf),
                  size=f'ViT-g x1 + Q-Former x{layers} + OPT-125m x{opt_layers}, {size}px, greedy {new} tokens, '
                       f'batch {batch}')


def clip(scale: str) -> Workload:
  """open_clip ViT-B-16 (GELU): image features of `batch` images and text features of `batch`
  77-token texts."""
  open_clip = torch_refs.import_open_clip()  # without torchvision (see there)
  batch, size = pick(scale, (16, 224), (2, 224), (2, 32))
  layers = pick(scale, 12, 2, 1)
  name = 'ViT-B-16'
  if scale != 'full':  # ViT-B-16's widths with fewer layers, registered as open_clip's own configs are
    folder = tempfile.mkdtemp(prefix='blip_jax_bench_')
    cfg = dict(embed_dim=512, vision_cfg=dict(image_size=size, layers=layers, width=768, patch_size=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=layers))
    name = f'blip-jax-bench-ViT-B-16-{scale}'
    with open(os.path.join(folder, name + '.json'), 'w') as f:
      json.dump(cfg, f)
    open_clip.add_model_config(folder)
  torch.manual_seed(0)
  ref = randomized(open_clip.create_model(name, pretrained=None))
  # open_clip's non-quickgelu configs use GELU
  model, _, _ = load_torch(ref.state_dict(), act='gelu', **compute_dtype('vision', 'text'))
  ref.to(RUN.torch_device)
  x, x_nhwc = image_batch(batch, size)
  ids, _ = token_batch(batch, 77, first=49406, end=49407, vocab=(1, 49406))  # EOT = largest id
  t_ids = torch_ids(ids)
  fn, state = split_jit(model, lambda m, images, ids: (m.embed_image(images), m.embed_text(ids)))
  return Workload(f'ViT-B/16 x{layers} + text x{layers}, {size}px, 77 tokens, batch {batch}', batch, fn,
                  (state, x_nhwc, ids), lambda: (ref.encode_image(x), ref.encode_text(t_ids)),
                  torch_attention='nn.MultiheadAttention')  # open_clip's; it calls scaled_dot_product_attention


WORKLOADS = {'blip_vit': blip_vit, 'blip_text_itm': blip_text_itm, 'blip_train': blip_train,
             'blip_caption': blip_caption, 'blip2_qformer': blip2_qformer, 'blip2_opt': blip2_opt, 'clip': clip}
