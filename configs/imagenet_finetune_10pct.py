"""Semi-supervised ImageNet: fine-tuning an FNC ResNet-50 on 10% of the labels (training recipe §6).

Command (prepare `tfds build imagenet2012_subset/10pct --manual_dir=$MANUAL --data_dir=$DATA` first):
  python -m fnc_jax.main --config=configs/imagenet_finetune_10pct.py --workdir=gs://BUCKET/fnc_r50_ft10 \
      --config.pretrained.workdir=gs://BUCKET/fnc_r50 --config.data.data_dir=$DATA

Same recipe as `imagenet_finetune_1pct.py` on the 128,116 images of `imagenet2012_subset/10pct` for
30 epochs (3,754 steps; SimCLR v2's count, the paper's is unverified).
Hardware: 8 A100/H100 GPUs or a TPU v4-8. Expected wall time: a few hours (estimate, not measured).
Target (docs/results.md §2): **71.1% top-1 / 90.2% top-5** (official defaults, 1000 pretraining epochs).
"""

from fnc_jax.config_base import eval_config


def get_config():
    c = eval_config("finetune")
    c.batch_size = 1024
    c.epochs = 30
    c.checkpoint_every_steps = 1000
    c.log_every_steps = 50
    c.data.name = "imagenet2012_subset/10pct"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 224
    c.model.depth = 50
    c.model.width_multiplier = 1.0
    c.model.ft_proj_selector = 1
    c.optim.name = "lars"
    c.optim.base_lr = 0.005
    c.optim.lr_scaling = "sqrt"
    c.optim.weight_decay = 0.0
    c.optim.warmup_epochs = 0.0
    c.finetune.train_projection = False
    return c
