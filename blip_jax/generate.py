"""Decoding under jit with a preallocated KV cache and `jax.lax.while_loop`.

`greedy` and `beam_search` work for any decoder with `init_cache(batch, max_length,
encoder_states)` and `decode(ids, slot_mask, cache) -> (logits, cache)` (the MED decoder
`BertLMHeadModel`). Lengths count the prompt, as HF `generate` and the originals count them: the
output has `max_length` tokens; before `min_length` the end-of-sequence token cannot be chosen.
After a sequence's end-of-sequence token come `pad_token_id`s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def greedy(decoder, encoder_states, prompt_ids, *, max_length: int, min_length: int = 0, eos_token_id: int,
           pad_token_id: int = 0):
  """Greedy decoding of `prompt_ids` [B, P] (all rows the same length) conditioned on
  `encoder_states` [B, N, D]. Returns ids [B, max_length]: the prompt, then the generated
  tokens; after a row's end-of-sequence token, padding."""
  b, p = prompt_ids.shape
  cache = decoder.init_cache(b, max_length, encoder_states)
  slots = jnp.ones((b, max_length), jnp.int32)  # future slots are hidden by the causal rule
  logits, cache = decoder.decode(prompt_ids, slots, cache)
  ids = jnp.full((b, max_length), pad_token_id, jnp.int32).at[:, :p].set(prompt_ids)

  def pick(logits, length):
    logits = logits.at[:, eos_token_id].set(jnp.where(length < min_length, -jnp.inf, logits[:, eos_token_id]))
    return jnp.argmax(logits, -1).astype(jnp.int32)

  def cond(carry):
    length, _, done, _, _ = carry
    return (length < max_length) & ~jnp.all(done)

  def body(carry):
    length, ids, done, last_logits, cache = carry
    token = jnp.where(done, pad_token_id, pick(last_logits, length))
    ids = jax.lax.dynamic_update_slice(ids, token[:, None], (0, length))
    done = done | (token == eos_token_id)
    logits, cache = decoder.decode(token[:, None], slots, cache)
    return length + 1, ids, done, logits[:, -1], cache

  carry = (jnp.asarray(p, jnp.int32), ids, jnp.zeros((b,), bool), logits[:, -1], cache)
  return jax.lax.while_loop(cond, body, carry)[1]


NEG = -1.0e9  # HF's "impossible" score: added, not assigned, so orderings stay as HF's


def _reorder(cache, rows):
  """The cache rows of the beams that continue (the index scalar is shared)."""
  n = rows.shape[0]
  return jax.tree.map(lambda x: x[rows] if x.ndim and x.shape[0] == n else x, cache)


def beam_search(decoder, encoder_states, prompt_ids, *, num_beams: int, max_length: int, min_length: int = 0,
                length_penalty: float = 1.0, early_stopping: bool = False, eos_token_id: int,
                pad_token_id: int = 0, num_return_sequences: int = 1):
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
  cache = decoder.init_cache(n, max_length, jnp.repeat(encoder_states, nb, axis=0))
  slots = jnp.ones((n, max_length), jnp.int32)
  logits, cache = decoder.decode(jnp.repeat(prompt_ids, nb, axis=0), slots, cache)
  seqs = jnp.full((b, nb, max_length), pad_token_id, jnp.int32).at[:, :, :p].set(prompt_ids[:, None])
  gather = lambda x, index: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

  def body(carry):
    length, seqs, scores, done_seqs, done_scores, done, unsatisfied, logits, cache, _ = carry
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = logp.at[:, eos_token_id].set(jnp.where(length < min_length, -jnp.inf, logp[:, eos_token_id]))
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
    cache = _reorder(cache, (jnp.arange(b)[:, None] * nb + source).reshape(-1))
    logits, cache = decoder.decode(seqs[:, :, length].reshape(n, 1), slots, cache)
    length = length + 1
    best_running = scores[:, :1] / (length - p).astype(jnp.float32) ** length_penalty
    worst_done = jnp.where(done, jnp.min(done_scores, -1, keepdims=True), NEG)
    unsatisfied = unsatisfied & jnp.any(best_running > worst_done, -1)
    stop = ~jnp.any(unsatisfied) | (jnp.all(done) & early_stopping) | jnp.all(ended)
    return length, seqs, scores, done_seqs, done_scores, done, unsatisfied, logits[:, -1], cache, stop

  carry = (jnp.asarray(p, jnp.int32), seqs, jnp.zeros((b, nb)).at[:, 1:].set(NEG), seqs,
           jnp.full((b, nb), NEG), jnp.zeros((b, nb), bool), jnp.ones((b,), bool), logits[:, -1], cache,
           jnp.asarray(False))
  out = jax.lax.while_loop(lambda c: ~c[-1] & (c[0] < max_length), body, carry)
  return out[3][:, :num_return_sequences], out[4][:, :num_return_sequences]
