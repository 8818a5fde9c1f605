"""SimCLR baseline on ImageNet with the FNC recipe: 2 views, no FN cancellation, no memory.

Command:
  python -m fnc_jax.main --config=configs/imagenet_simclr.py --workdir=gs://BUCKET/simclr_r50 \
      --config.data.data_dir=$DATA

ResNet-50, batch 4096, 2 views of 224 px (RandAugment on, as in the FNC code base), tau = 0.1, LARS
0.1·√B, 100 epochs. Hardware as configs/imagenet.py (about 1/5 of its compute per step). Expected:
66.41% linear-evaluation top-1 (the paper's 100-epoch SimCLR baseline, docs/results.md §4).
"""

from fnc_jax.config_base import pretrain_config


def get_config():
    c = pretrain_config()
    c.views.support_size = 0
    c.fn.mode = "none"
    c.memory.multiplier = 0
    return c
