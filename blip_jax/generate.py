"""Decoding under jit with a preallocated KV cache and `jax.lax.while_loop`.

`greedy`, `sample` and `beam_search` work for any decoder with `init_cache(batch, max_length,
encoder_states)` and `decode(ids, slot_mask, cache) -> (logits, cache)`: the MED decoder
(`BertLMHeadModel`, conditioned on image embeddings) and BLIP-2's OPT behind its image prefix
(`Blip2OPT.decoder`, conditioned on `Blip2OPT.prefix(image_embeds)`) and BLIP's VQA answer
decoder (`BlipVQA.answer_decoder`, conditioned on `(question_states, question_mask)`). Lengths count the prompt,
as HF `generate` and the originals count them: the output has `max_length` tokens; before
`min_length` the end-of-sequence token cannot be chosen. After a sequence's end-of-sequence
token come `pad_token_id`s.

The cache is a dict. The prompt runs once per row of the encoder states; its cache is then
repeated for the beams (or returned samples) of that row. Every array in the cache is per
sequence (repeated, and reordered as beams are chosen) except the scalar `'index'` and what the
decoder keeps under `'shared'`: arrays per encoder row that all of a row's sequences read as they
are (the MED decoder's cross-attention keys/values of the image), so `decode` must accept a
batch that is a multiple of their rows. The decoder runs only for tokens whose successor is
still to be chosen: there is no decoding step after the last token.

The logits go through HF's processors in HF's order: repetition penalty (on every token of the
sequence so far, prompt included), the minimum length, then, when sampling, temperature, top-k
and top-p (`process_logits`, `warp_logits`). Beam search applies the processors to the
log-probabilities, as HF does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def process_logits(logits, ids, length, *, min_length: int = 0, eos_token_id: int,
                   repetition_penalty: float = 1.0):
  """HF's `RepetitionPenaltyLogitsProcessor` and `MinLengthLogitsProcessor` on `logits` [B, V]
  after the tokens `ids[:, :length]` ([B, max_length]; later slots are ignored)."""
  if repetition_penalty != 1.0:
    b, v = logits.shape
    seen = jnp.arange(ids.shape[1])[None] < length
    present = jnp.zeros((b, v + 1), bool).at[jnp.arange(b)[:, None], jnp.where(seen, ids, v)].set(True)[:, :v]
    penalised = jnp.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
    logits = jnp.where(present, penalised, logits)
  return logits.at[:, eos_token_id].set(jnp.where(length < min_length, -jnp.inf, logits[:, eos_token_id]))


def warp_logits(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """HF's temperature, top-k and top-p (nucleus) warpers: removed tokens get -inf.

  top-k keeps the tokens whose logit is at least the k-th largest; top-p removes the least
  likely tokens whose cumulative probability (counted from the least likely) stays <= 1 - top_p,
  always keeping the most likely one."""
  if temperature != 1.0:
    logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(logits, axis=-1)  # ascending, as HF sorts
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    remove = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1) <= 1.0 - top_p
    remove = remove.at[:, -1].set(False)
    logits = jnp.where(jnp.zeros_like(remove).at[jnp.arange(logits.shape[0])[:, None], order].set(remove),
                       -jnp.inf, logits)
  return logits


def _per_sequence(cache, fn):
  """`fn` on every per-sequence array of `cache`: all but the scalar index and `cache['shared']`."""
  rest = jax.tree.map(lambda x: fn(x) if x.ndim else x, {k: v for k, v in cache.items() if k != 'shared'})
  return {**cache, **rest}


def _start(decoder, encoder_states, prompt_ids, copies: int, max_length: int):
  """Runs the prompt [B, P] once per encoder row and returns the last position's logits and the
  cache, both repeated for `copies` sequences per row ([B * copies, V], rows in order)."""
  b = prompt_ids.shape[0]
  cache = decoder.init_cache(b, max_length, encoder_states)
  logits, cache = decoder.decode(prompt_ids, jnp.ones((b, max_length), jnp.int32), cache)
  if copies == 1:
    return logits[:, -1], cache
  return jnp.repeat(logits[:, -1], copies, axis=0), _per_sequence(cache, lambda x: jnp.repeat(x, copies, axis=0))


def _decode_loop(decoder, encoder_states, prompt_ids, choose, *, max_length: int, eos_token_id: int,
                 pad_token_id: int, copies: int = 1, rng=None):
  """One token per step for every row (`copies` rows per prompt row):
  `choose(logits [B, V], ids, length, key) -> tokens [B]`. Returns ids [B * copies, max_length]."""
  b, p = prompt_ids.shape
  n = b * copies
  ids = jnp.full((n, max_length), pad_token_id, jnp.int32).at[:, :p].set(jnp.repeat(prompt_ids, copies, axis=0))
  if p >= max_length:
    return ids
  logits, cache = _start(decoder, encoder_states, prompt_ids, copies, max_length)
  slots = jnp.ones((n, max_length), jnp.int32)  # future slots are hidden by the causal rule
  rng = jax.random.key(0) if rng is None else rng

  def pick(length, ids, done, logits, rng):
    rng, key = jax.random.split(rng)
    token = jnp.where(done, pad_token_id, choose(logits.astype(jnp.float32), ids, length, key).astype(jnp.int32))
    ids = jax.lax.dynamic_update_slice(ids, token[:, None], (0, length))
    return length + 1, ids, done | (token == eos_token_id), token, rng

  def cond(carry):
    length, _, done, _, _, _ = carry
    return (length < max_length) & ~jnp.all(done)

  def body(carry):
    length, ids, done, token, cache, rng = carry
    logits, cache = decoder.decode(token[:, None], slots, cache)
    length, ids, done, token, rng = pick(length, ids, done, logits[:, -1], rng)
    return length, ids, done, token, cache, rng

  length, ids, done, token, rng = pick(jnp.asarray(p, jnp.int32), ids, jnp.zeros((n,), bool), logits, rng)
  return jax.lax.while_loop(cond, body, (length, ids, done, token, cache, rng))[1]


def greedy(decoder, encoder_states, prompt_ids, *, max_length: int, min_length: int = 0, eos_token_id: int,
           pad_token_id: int = 0, repetition_penalty: float = 1.0):
  """Greedy decoding of `prompt_ids` [B, P] (all rows the same length) conditioned on
  `encoder_states` [B, N, D]. Returns ids [B, max_length]: the prompt, then the generated
  tokens; after a row's end-of-sequence token, padding."""
  def choose(logits, ids, length, key):
    return jnp.argmax(process_logits(logits, ids, length, min_length=min_length, eos_token_id=eos_token_id,
                                     repetition_penalty=repetition_penalty), -1)

  return _decode_loop(decoder, encoder_states, prompt_ids, choose, max_length=max_length,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def sample(decoder, encoder_states, prompt_ids, *, rng, max_length: int, min_length: int = 0, eos_token_id: int,
           pad_token_id: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           repetition_penalty: float = 1.0, num_return_sequences: int = 1):
  """Sampling (`do_sample=True` in HF): each token is drawn from the softmax of the processed and
  warped logits with keys split from `rng`. BLIP's nucleus captions: `top_p=0.9,
  repetition_penalty=1.1`. Returns ids [B, num_return_sequences, max_length]."""
  r = num_return_sequences

  def choose(logits, ids, length, key):
    logits = process_logits(logits, ids, length, min_length=min_length, eos_token_id=eos_token_id,
                            repetition_penalty=repetition_penalty)
    return jax.random.categorical(key, warp_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p))

  ids = _decode_loop(decoder, encoder_states, prompt_ids, choose, max_length=max_length, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id, copies=r, rng=rng)
  return ids.reshape(prompt_ids.shape[0], r, max_length)


NEG = -1.0e9  # HF's "impossible" score: added, not assigned, so orderings stay as HF's


def _reorder(cache, rows):
  """The per-sequence cache rows of the beams that continue."""
  return _per_sequence(cache, lambda x: x[rows])


def beam_search(decoder, encoder_states, prompt_ids, *, num_beams: int, max_length: int, min_length: int = 0,
                length_penalty: float = 1.0, early_stopping: bool = False, eos_token_id: int,
                pad_token_id: int = 0, num_return_sequences: int = 1, repetition_penalty: float = 1.0):
  """Beam search as HF `generate(num_beams=..., do_sample=False)` does it (transformers >= 4.50).

  Each step keeps the best `2 * num_beams` continuations of all beams; those ending in the
  end-of-sequence token (or reaching `max_length`) among the first `num_beams` join the finished
  set with score `sum log p / generated_length ** length_penalty`, the others continue. The
  search stops at `max_length`, or when no running beam can beat the worst finished one (HF's
  heuristic for `early_stopping=False`), or, with `early_stopping=True`, when `num_beams`
  sequences are finished.

  Returns ids [B, num_return_sequences, max_length] (best first) and their scores [B, R].
  """
  b, p = prompt_ids.shape
  nb, k = num_beams, 2 * num_beams
  n = b * nb
  seqs = jnp.full((b, nb, max_length), pad_token_id, jnp.int32).at[:, :, :p].set(prompt_ids[:, None])
  # Only the first beam starts: the others' NEG keeps their copies of it out of the first choice.
  state = (jnp.asarray(p, jnp.int32), seqs, jnp.zeros((b, nb)).at[:, 1:].set(NEG), seqs, jnp.full((b, nb), NEG),
           jnp.zeros((b, nb), bool), jnp.ones((b,), bool))
  if p >= max_length:
    return seqs[:, :num_return_sequences], state[4][:, :num_return_sequences]
  logits, cache = _start(decoder, encoder_states, prompt_ids, nb, max_length)
  slots = jnp.ones((n, max_length), jnp.int32)
  gather = lambda x, index: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

  def advance(state, logits):
    """Chooses the token at `length`; returns the new state, the beam each running beam continues
    and whether the search is over."""
    length, seqs, scores, done_seqs, done_scores, done, unsatisfied = state
    logp = process_logits(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), seqs.reshape(n, max_length),
                          length, min_length=min_length, eos_token_id=eos_token_id,
                          repetition_penalty=repetition_penalty)
    vocab = logp.shape[-1]
    total = (logp.reshape(b, nb, vocab) + scores[:, :, None]).reshape(b, nb * vocab)
    top_scores, top_index = jax.lax.top_k(total, k)
    source, token = top_index // vocab, top_index % vocab
    candidates = gather(seqs, source).at[:, :, length].set(token)
    ended = (token == eos_token_id) | (length + 1 >= max_length)
    # The best `num_beams` continuations that did not end keep running.
    running_scores = top_scores + ended * NEG
    keep = jax.lax.top_k(running_scores, nb)[1]
    seqs, scores, source = gather(candidates, keep), gather(running_scores, keep), gather(source, keep)
    # Ended ones among the first `num_beams` compete with the finished set.
    just_ended = ended & (jnp.arange(k) < nb)[None]
    final = top_scores / (length + 1 - p).astype(jnp.float32) ** length_penalty
    final += (jnp.all(done, -1, keepdims=True) & early_stopping) * NEG
    final += (~unsatisfied)[:, None] * NEG + (~just_ended) * NEG
    best = jax.lax.top_k(jnp.concatenate([done_scores, final], 1), nb)[1]
    done_seqs = gather(jnp.concatenate([done_seqs, candidates], 1), best)
    done_scores = gather(jnp.concatenate([done_scores, final], 1), best)
    done = gather(jnp.concatenate([done, just_ended], 1), best)
    length = length + 1
    best_running = scores[:, :1] / (length - p).astype(jnp.float32) ** length_penalty
    worst_done = jnp.where(done, jnp.min(done_scores, -1, keepdims=True), NEG)
    unsatisfied = unsatisfied & jnp.any(best_running > worst_done, -1)
    stop = ~jnp.any(unsatisfied) | (jnp.all(done) & early_stopping) | jnp.all(ended) | (length >= max_length)
    return (length, seqs, scores, done_seqs, done_scores, done, unsatisfied), source, stop

  def body(carry):
    state, source, cache, _ = carry
    length, seqs = state[:2]
    cache = _reorder(cache, (jnp.arange(b)[:, None] * nb + source).reshape(-1))
    logits, cache = decoder.decode(seqs[:, :, length - 1].reshape(n, 1), slots, cache)
    state, source, stop = advance(state, logits[:, -1])
    return state, source, cache, stop

  state, source, stop = advance(state, logits)
  state = jax.lax.while_loop(lambda c: ~c[-1], body, (state, source, cache, stop))[0]
  return state[3][:, :num_return_sequences], state[4][:, :num_return_sequences]
