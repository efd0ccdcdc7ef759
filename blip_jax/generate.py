"""Decoding under jit with a preallocated KV cache and `jax.lax.while_loop`.

`greedy` works for any decoder with `init_cache(batch, max_length, encoder_states)` and
`decode(ids, slot_mask, cache) -> (logits, cache)` (the MED decoder `BertLMHeadModel`).
Lengths count the prompt, as HF `generate` and the originals count them: the output has
`max_length` tokens; before `min_length` the end-of-sequence token cannot be chosen.
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
