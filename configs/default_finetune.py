"""Fine-tuning of the quickstart model (`configs/default.py`) on the embedded MNIST-5k digits.

Command (after `python -m fnc_jax.main --config=configs/default.py --workdir=/tmp/fnc_default`):
  python -m fnc_jax.main --config=configs/default_finetune.py --workdir=/tmp/fnc_default_finetune

Hardware: any laptop CPU. The semi-supervised recipe (training recipe §6: classifier on projection
layer 0, `ft_proj_selector = 1`, zero-initialised; encoder trained with LARS, no weight decay, global
BatchNorm in training mode; projection layer 0 restored and, as in the official code, not trained)
at quickstart scale: 1/4-width ResNet-18 at 28 px, batch 256, 10 epochs (157 steps) on the 4,000
training digits (all labels: the embedded set has no label-fraction subsets), evaluated on the 1,000
held-out ones. `--config.finetune.train_projection=True` trains projection layer 0 as well.
Measured (seed 0, 2 shared CPU cores, ~3 min): 76.3% top-1 / 98.3% top-5. No paper number (the
paper's 63.7% / 71.1% are `configs/imagenet_finetune_1pct.py` / `_10pct.py`).
"""

from fnc_jax.config_base import eval_config


def get_config():
    c = eval_config("finetune")
    c.pretrained.workdir = "/tmp/fnc_default"
    c.batch_size = 256
    c.epochs = 10
    c.checkpoint_every_steps = 100
    c.log_every_steps = 20

    c.data.source = "embedded"
    c.data.name = "mnist_5k"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_size = 28

    c.model.depth = 18
    c.model.width_multiplier = 0.25
    c.model.stem = "imagenet"  # as the quickstart pretraining (stride-2 stem + max-pool at 28 px)
    c.model.proj_out_dim = 64
    c.model.ft_proj_selector = 1

    c.optim.name = "lars"
    c.optim.base_lr = 0.005  # x sqrt(256) = 0.08, the recipe's rule
    return c
