"""BLIP-2 stage 1: the Q-Former learns from a frozen image encoder with ITC + ITM + ITG.

    python convert_torch_weights.py blip2_pretrained.pth eva_vit_g.pth --out weights/blip2_stage1
    python train.py --config configs/blip2_stage1.py --workdir runs/blip2_stage1 \\
        --config.init_from=weights/blip2_stage1 --config.data.vocab=/path/to/bert-base-uncased \\
        --config.data.annotations.train=pretrain_pairs.json \\
        --config.data.annotations.validation=coco_karpathy_val.json --config.data.image_root=/data/images

Recipe (LAVIS): EVA ViT-g at 224 px, 32 query tokens, lr 1e-4 after 5000 warmup steps from 1e-6
(in epoch 0 only, as LAVIS's LinearWarmupCosineLRScheduler),
cosine to 1e-5, weight decay 0.05, 10 epochs, global batch 1600, bf16 image encoder. The image
encoder never trains (its parameters are outside the optimiser); it comes with `init_from` (a
converted LAVIS checkpoint brings EVA ViT-g from `eva_vit_g.pth`; the Q-Former may start from
it or, with `init_from` of a converted stage-1 model, continue). `:tiny` is the test version.
Expected: the released stage-1 model reaches COCO TR@1 about 85 / IR@1 about 68 after
retrieval fine-tuning.
"""

from blip_jax import evaluate
from blip_jax.models import blip2, vit
from blip_jax.train.config_base import base, make_tiny, model_fields, tiny_blip2


def get_config(arg: str = ''):
  c = base()
  c.objective = 'blip2_stage1'
  c.model = model_fields(blip2.Blip2Config(vision=vit.vit_config('eva_g', image_size=224), embed_dim=256))
  c.data.update(name='blip_annotations', task='caption', text_length=32)
  c.batch_size = 1600
  c.num_epochs = 10
  c.optim.update(schedule='warmup_cosine', lr=1e-4, warmup_steps=5000, warmup_lr=1e-6, min_lr=1e-5,
                 weight_decay=0.05)
  c.checkpoint_every_steps = 5000
  c.evals.retrieval = evaluate.settings('retrieval', k_test=128)
  if arg == 'tiny':
    make_tiny(c, tiny_blip2())
    c.optim.lr = 1e-3
  elif arg:
    raise ValueError(f"configs/blip2_stage1.py takes no argument or 'tiny', got {arg!r}")
  return c
