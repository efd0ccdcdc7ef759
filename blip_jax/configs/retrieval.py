"""BLIP image-text retrieval fine-tuning (ITC with momentum encoders and queues + ITM with hard
negatives), the originals' COCO / Flickr30k recipe.

    python convert_torch_weights.py model_base.pth --out weights/blip_base
    python train.py --config configs/retrieval.py:coco --workdir runs/retrieval_coco \\
        --config.init_from=weights/blip_base --config.data.vocab=/path/to/bert-base-uncased \\
        --config.data.annotations.train=coco_karpathy_train.json \\
        --config.data.annotations.validation=coco_karpathy_val.json --config.data.image_root=/data/coco

Arguments: `coco` (k_test 256) or `flickr` (k_test 128); `tiny` = the few-step test version.
Expected (BLIP ViT-B from model_base.pth, 6 epochs at 384 px, global batch 256): COCO 5k TR@1
about 82 / IR@1 about 64.5, Flickr30k TR@1 about 97 / IR@1 about 87.5 (REFERENCE.md section 9).
"""

from blip_jax import evaluate
from blip_jax.models import blip
from blip_jax.train.config_base import base, make_tiny, model_fields, tiny_blip


def get_config(arg: str = 'coco'):
  if arg not in ('coco', 'flickr', 'tiny'):
    raise ValueError(f"configs/retrieval.py takes 'coco', 'flickr' or 'tiny', got {arg!r}")
  c = base()
  c.objective = 'retrieval'
  c.model = model_fields(blip.blip_config('base', 384, embed_dim=256, queue_size=57600, momentum=0.995))
  c.data.update(name='blip_annotations', task='caption', text_length=35)
  c.batch_size = 256
  c.num_epochs = 6
  c.alpha, c.alpha_ramp_epochs = 0.4, 1
  c.optim.update(schedule='cosine', lr=1e-5, min_lr=0.0, weight_decay=0.05)
  c.evals.retrieval = evaluate.settings('retrieval', k_test=128 if arg == 'flickr' else 256, batch_size=128)
  if arg == 'tiny':
    make_tiny(c, tiny_blip())
    c.optim.lr = 1e-3
  return c
