"""False-negative identification analysis of the quickstart model on the embedded MNIST-5k digits.

Command (after `python -m fnc_jax.main --config=configs/default.py --workdir=/tmp/fnc_default`):
  python -m fnc_jax.main --config=configs/default_fn_analysis.py --workdir=/tmp/fnc_default_fn

Hardware: any laptop CPU; about a minute. 768 of the 1,000 held-out digits, shuffled into 3 batches of
256 (the candidate pool, as the quickstart's training batch), each image with 2 + 2 views from the quickstart's pretraining
augmentation; precision / recall of the identified false negatives (same digit as the anchor) over
top-k x threshold x max/mean x support size, similarity histograms and PNG plots in the workdir.
Chance precision is ~10% (10 balanced classes). Measured (seed 0, ~1 min): top-10 ∩ cos > 0.7 with max
over 4 views selects 9.8 candidates per anchor at 50.6% precision (4.9% recall); top-1 at 53%. The
paper's ImageNet figure (~40% of 1000 classes) is `configs/imagenet_fn_analysis.py`.
"""

from fnc_jax.config_base import eval_config


def get_config():
    c = eval_config("fn_analysis")
    c.pretrained.workdir = "/tmp/fnc_default"
    c.batch_size = 256  # candidate pool of one analysed batch
    c.epochs = 1  # unused: one pass
    c.checkpoint_every_steps = 1  # unused
    c.eval.batch_size = 64  # images per forward pass (x 4 views)

    c.data.source = "embedded"
    c.data.name = "mnist_5k"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_size = 28

    c.model.depth = 18
    c.model.width_multiplier = 0.25
    c.model.stem = "imagenet"  # as the quickstart pretraining (stride-2 stem + max-pool at 28 px)
    c.model.proj_out_dim = 64
    # The quickstart's pretraining augmentation (configs/default.py); blur on the device as in training.
    c.augment.use_randaugment = False
    c.augment.color_strength = 0.5
    c.augment.area_range = (0.2, 1.0)

    c.fn_analysis.split = "test"
    c.fn_analysis.num_views = 4  # 2 + the quickstart's 2 support views
    c.fn_analysis.topks = (1, 2, 5, 10, 20)
    return c
