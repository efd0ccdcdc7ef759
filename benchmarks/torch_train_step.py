"""The retrieval train step (ITC + ITM with hard negatives, AdamW) written in PyTorch on the HF
model, the PyTorch side of the `blip_train` workload, and the same loss in blip_jax without the
momentum encoders and queues (the HF model has none)."""

from __future__ import annotations

import jax.numpy as jnp
import torch

from benchmarks.settings import ENC, RUN
from blip_jax import losses


def bench_retrieval_loss(model, batch, rng, alpha):
  """Retrieval fine-tuning's ITC + ITM (hard negatives) without the momentum encoders and queues,
  which HF's BLIP does not have: in-batch ITC over `itc_logits` and the project's ITM loss. The
  negatives come with the batch (drawn once outside) so both sides score the same pairs."""
  ids, mask = batch['text_ids'], batch['text_mask']
  image_embeds = model.image_embeds(batch['image'])
  logits = model.itc_logits(model.image_features(image_embeds), model.text_features(model.text_embeds(ids, mask)))
  targets = jnp.eye(logits.shape[0])
  itc = (losses.soft_cross_entropy(logits, targets) + losses.soft_cross_entropy(logits.T, targets)) / 2
  itm, _ = losses.itm_loss_with_negatives(model.itm_logits, image_embeds, ids, mask, batch['neg_image'],
                                              batch['neg_text'])
  return itc + itm, {'itc': itc, 'itm': itm}


class TorchRetrievalStep:
  """The same step over HF's modules: forward, ITC + ITM loss, backward, AdamW. The temperature
  (not in HF's class) is a parameter as in BLIP, clamped to [0.001, 0.5] when used and after
  each step."""

  def __init__(self, hf, lr: float, weight_decay: float):
    self.hf = hf
    self.temp = torch.nn.Parameter(torch.tensor(0.07, device=RUN.torch_device))
    self.opt = torch.optim.AdamW([*hf.parameters(), self.temp], lr=lr, weight_decay=weight_decay)

  def __call__(self, images, ids, mask, neg_image, neg_text):
    hf, b = self.hf, ids.shape[0]
    image_embeds = hf.vision_model(pixel_values=images).last_hidden_state
    image_feat = torch.nn.functional.normalize(hf.vision_proj(image_embeds[:, 0]), dim=-1)
    text = hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    text_feat = torch.nn.functional.normalize(hf.text_proj(text[:, 0]), dim=-1)
    logits = image_feat @ text_feat.T / self.temp.clamp(0.001, 0.5)
    targets = torch.arange(b, device=ids.device)
    itc = (torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)) / 2
    enc_ids = ids.clone()
    enc_ids[:, 0] = ENC
    joint = hf.text_encoder(input_ids=torch.cat([enc_ids, enc_ids, enc_ids[neg_text]]),
                            attention_mask=torch.cat([mask, mask, mask[neg_text]]),
                            encoder_hidden_states=torch.cat([image_embeds, image_embeds[neg_image], image_embeds]),
                            ).last_hidden_state
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(ids.device)
    itm = torch.nn.functional.cross_entropy(hf.itm_head(joint[:, 0]), labels)
    loss = itc + itm
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    with torch.no_grad():
      self.temp.clamp_(0.001, 0.5)
    return loss.detach()


