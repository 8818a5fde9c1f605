"""FNC attraction on CIFAR-10 (TFDS `cifar10`, prepared in a data dir), ResNet-18 with the CIFAR stem.

Command:
  python -m fnc_jax.main --config=configs/cifar10.py --workdir=/tmp/fnc_cifar10 \
      --config.data.data_dir=$TFDS_DATA_DIR

Setting: batch 512, 2 + 2 views of 32 px without RandAugment (translate ±70 px makes no sense at
32 px), in-batch FNC attraction (top-10 ∩ cos > 0.7), tau = 0.2, LARS 0.1·√B, 500 epochs.
Hardware: one GPU (about 1 h per 100 epochs on an A100, estimated, not measured). Expected: kNN
accuracy around 85-90% (SimCLR-on-CIFAR folklore, not measured by this project).
"""

from fnc_jax.config_base import pretrain_config


def get_config():
    c = pretrain_config()
    c.batch_size = 512
    c.epochs = 500
    c.checkpoint_every_steps = 1000
    c.data.name = "cifar10"
    c.data.eval_split = "test"
    c.data.image_size = 32
    c.views.support_size = 2
    c.augment.use_randaugment = False
    c.augment.color_strength = 0.5
    c.model.depth = 18
    c.loss.temperature = 0.2
    c.memory.multiplier = 0
    c.eval.final_report = True
    return c
