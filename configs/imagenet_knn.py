"""Weighted kNN on ImageNet with the frozen features of an FNC ResNet-50 (no fine-tuning at all).

Command:
  python -m fnc_jax.main --config=configs/imagenet_knn.py --workdir=gs://BUCKET/fnc_r50_knn \
      --config.pretrained.workdir=gs://BUCKET/fnc_r50 --config.data.data_dir=$DATA

Protocol (Wu et al. 2018, as in DINO): 2048-d pooled encoder features (BatchNorm in inference mode,
centre crop 0.875) of the 1,281,167 training and 50,000 validation images, l2-normalised; each
validation image votes with its k = 20 and k = 200 nearest training images, weights exp(cos / 0.07).
The training features are sharded over the devices (10.5 GB in float32), each device keeps its own
top-k in chunks of 65,536 rows, and the per-device top-k are merged. Hardware: 8 A100/H100 GPUs or a
TPU v4-8, and about 25 GB of host memory per process (the gathered features). Expected wall time:
one forward pass over ImageNet, 30-60 min (estimate, not measured). The paper reports no kNN number
(docs/results.md); use it as a cheap check between pretraining checkpoints.
"""

from fnc_jax.config_base import eval_config


def get_config():
    c = eval_config("knn")
    c.batch_size = 1024  # unused: kNN reads with eval.batch_size
    c.epochs = 1  # unused: one pass over each split
    c.checkpoint_every_steps = 1  # unused: nothing to checkpoint
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 224
    c.model.depth = 50
    c.model.width_multiplier = 1.0
    c.eval.batch_size = 1024
    c.knn.ks = (20, 200)
    c.knn.temperature = 0.07
    c.knn.features = "encoder"
    c.knn.test_batch_size = 256
    return c
