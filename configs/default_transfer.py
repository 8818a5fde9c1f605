"""Transfer of the quickstart model (`configs/default.py`, MNIST digits) to a small TFDS dataset.

Command (after the quickstart pretraining, and `tfds build fashion_mnist --data_dir=$TFDS_DATA_DIR`):
  python -m fnc_jax.main --config=configs/default_transfer.py:fashion_mnist --workdir=/tmp/fnc_default_transfer \
      --config.data.data_dir=$TFDS_DATA_DIR

The argument is `<tfds name>[,linear_eval|finetune]` (default `fashion_mnist,linear_eval`), any TFDS
classification dataset with `image` / `label` features, `train` and `test` splits, at 28 px. The
protocol of `configs/transfer.py` at quickstart scale: a 2 x 2 sweep of base LR x weight decay trained
on the first 80% of `train` and selected on the last 20%, then the best point retrained on all of
`train` and tested on `test`; every sweep point is in results.json. Each run: batch 256, 5 epochs.
Hardware: a laptop CPU; 60,000-image datasets take tens of minutes (5 runs). No paper number.
"""

from fnc_jax.config_base import eval_config


def get_config(arg: str = "fashion_mnist"):
    name, _, protocol = arg.partition(",")
    c = eval_config("transfer")
    c.pretrained.workdir = "/tmp/fnc_default"
    c.batch_size = 256
    c.epochs = 5
    c.checkpoint_every_steps = 500
    c.log_every_steps = 50

    c.data.source = "tfds"
    c.data.name = name
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_size = 28

    c.model.depth = 18
    c.model.width_multiplier = 0.25
    c.model.stem = "imagenet"  # as the quickstart pretraining (stride-2 stem + max-pool at 28 px)
    c.model.proj_out_dim = 64

    c.transfer.protocol = protocol or "linear_eval"
    c.transfer.sweep_train_split = "train[:80%]"
    c.transfer.sweep_val_split = "train[80%:]"
    c.transfer.learning_rates = (0.05, 0.01)  # base LRs, x sqrt(256)
    c.transfer.weight_decays = (0.0, 1e-4)
    if c.transfer.protocol == "finetune":
        c.optim.name = "sgd_nesterov"
        c.transfer.learning_rates = (0.01, 0.001)
    return c
