"""Weighted kNN (k = 20, 200; T = 0.07) on the quickstart model's frozen features (embedded MNIST-5k).

Command (after `python -m fnc_jax.main --config=configs/default.py --workdir=/tmp/fnc_default`):
  python -m fnc_jax.main --config=configs/default_knn.py --workdir=/tmp/fnc_default_knn

Hardware: any laptop CPU; under a minute. Pooled encoder features (BatchNorm in inference mode) of the
4,000 training and 1,000 held-out digits, l2-normalised; the training rows are sharded over the
devices and each device's top-k is merged. Measured (seed 0): 80.5% top-1 at k = 20, 75.3% at k = 200,
the same as the quickstart's final report (same features). No paper number.
"""

from fnc_jax.config_base import eval_config


def get_config():
    c = eval_config("knn")
    c.pretrained.workdir = "/tmp/fnc_default"
    c.batch_size = 256
    c.epochs = 1  # unused: one pass over each split
    c.checkpoint_every_steps = 1  # unused: kNN has nothing to checkpoint

    c.data.source = "embedded"
    c.data.name = "mnist_5k"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_size = 28

    c.model.depth = 18
    c.model.width_multiplier = 0.25
    c.model.stem = "imagenet"  # as the quickstart pretraining (stride-2 stem + max-pool at 28 px)
    c.model.proj_out_dim = 64
    return c
