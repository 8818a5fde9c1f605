"""Semi-supervised ImageNet: fine-tuning an FNC ResNet-50 on 1% of the labels (training recipe §6).

Command (prepare `tfds build imagenet2012_subset/1pct --manual_dir=$MANUAL --data_dir=$DATA` first):
  python -m fnc_jax.main --config=configs/imagenet_finetune_1pct.py --workdir=gs://BUCKET/fnc_r50_ft1 \
      --config.pretrained.workdir=gs://BUCKET/fnc_r50 --config.data.data_dir=$DATA

Recipe (SimCLR v2 / official FNC): classifier on the output of projection layer 0 (2048-d, post-ReLU;
`ft_proj_selector = 1`), zero-initialised; encoder and classifier trained with LARS (LR 0.005·√1024 =
0.16, cosine, no warm-up, weight decay 0; the trust ratio stays on), global BatchNorm in training mode,
batch 1024, 60 epochs of the 12,811 labelled images (751 steps), crops area (0.2, 1) + flip; evaluated
on the full validation split (centre crop 0.875). Restored: encoder and projection head; not restored:
step, optimiser slots, probe. Official quirk kept: projection layer 0 is not trained (its BN runs in
training mode); `--config.finetune.train_projection=True` trains it.
Hardware: 8 A100/H100 GPUs or a TPU v4-8. Expected wall time: under an hour (estimate, not measured).
Target (docs/results.md §2): **63.7% top-1 / 85.3% top-5** (official defaults, 1000 pretraining epochs).
"""

from fnc_jax.config_base import eval_config


def get_config():
    c = eval_config("finetune")
    c.batch_size = 1024
    c.epochs = 60
    c.checkpoint_every_steps = 250
    c.log_every_steps = 10
    c.data.name = "imagenet2012_subset/1pct"
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
