"""OPT against HF `OPTForCausalLM` (pre- and post-LayerNorm variants, left padding, KV cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from blip_jax.convert import load_torch
from blip_jax.testing.torch_refs import assert_close, hf_opt

IDS = torch.tensor([[1, 1, 2, 10, 11, 12], [2, 13, 14, 15, 16, 17]])  # the first is left-padded
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])




@pytest.mark.parametrize('variant', [dict(), dict(do_layer_norm_before=False, word_embed_proj_dim=12)])
def test_logits_match_hf(tmp_path, variant):
  hf = hf_opt(**variant)
  hf.save_pretrained(tmp_path)
  model, cfg, report = load_torch(tmp_path)
  assert report.task == 'lm' and cfg.do_layer_norm_before == variant.get('do_layer_norm_before', True)
  with torch.no_grad():
    ref = hf(input_ids=IDS, attention_mask=MASK).logits
  logits = model(IDS.numpy(), MASK.numpy())
  # Padded positions are garbage in both; compare the real ones.
  real = MASK.numpy().astype(bool)
  assert_close(np.asarray(logits)[real], ref.numpy()[real], 'OPT logits')


def test_cached_decoding_matches_full_pass():
  hf = hf_opt()
  model, _, _ = load_torch(hf.state_dict(), num_heads=2)  # a bare state dict: heads not in shapes
  full = np.asarray(model(IDS.numpy(), MASK.numpy()))
  max_len = 8
  slots = np.zeros((2, max_len), np.int32)
  slots[:, :6] = MASK.numpy()
  cache = model.init_cache(2, max_len)
  step = jax.jit(lambda tok, cache: model.decode(tok, slots, cache))
  logits, cache = step(IDS.numpy()[:, :3], cache)
  pieces = [logits]
  for t in range(3, 6):
    logits, cache = step(IDS.numpy()[:, t:t + 1], cache)
    pieces.append(logits)
  cached = np.asarray(jnp.concatenate(pieces, axis=1))
  real = MASK.numpy().astype(bool)
  assert_close(cached[real], full[real], 'cached vs full')
