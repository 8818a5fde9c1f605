"""False-negative identification analysis of an FNC ResNet-50 on the labelled ImageNet validation set.

Command:
  python -m fnc_jax.main --config=configs/imagenet_fn_analysis.py --workdir=gs://BUCKET/fnc_r50_fn \
      --config.pretrained.workdir=gs://BUCKET/fnc_r50 --config.data.data_dir=$DATA

What it measures (docs/results.md §5): the precision of the identified false negatives, i.e. the share of
selected candidates with the anchor's label (chance ≈ 0.1% on 1000 classes), and their recall, over
top-k ∈ {1, 2, 5, 10, 20} x threshold ∈ {0.5 … 0.9, none} x aggregation max / mean x support size
S ∈ {0, 2, 4, 6, 8}. Views: the official pretraining augmentation (crop, flip, colour jitter,
RandAugment(2, 7), grayscale on the host; blur on the device), 10 views per image; candidates are the
in-batch views of global batches of 4096 shuffled validation images (12 batches, 49,152 images), as in
a training step without memory. Projections come from the online network with BatchNorm in inference
mode (`--config.pretrained.network=ema` analyses the momentum encoder of memory-mode runs). Writes
the table into results.json and PNG plots into the workdir.
Hardware: 8 A100/H100 GPUs or a TPU v4-8. Expected wall time: about 10 min (estimate, not measured).
Target: the paper's "~40% accuracy among 1000 semantic classes" (v2 abstract; protocol, k and
threshold unverified) for the final official-defaults model.
"""

from fnc_jax.config_base import eval_config


def get_config():
    c = eval_config("fn_analysis")
    c.batch_size = 4096  # candidate pool: one pretraining global batch
    c.epochs = 1  # unused: one pass
    c.checkpoint_every_steps = 1  # unused: nothing to checkpoint
    c.eval.batch_size = 256  # images per forward pass (x 10 views)
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 224
    c.model.depth = 50
    c.model.width_multiplier = 1.0
    c.fn_analysis.split = "validation"
    c.fn_analysis.num_views = 10
    c.fn_analysis.anchor_batch_size = 256  # bounds the score block to 256 x 40,960 per view
    return c
