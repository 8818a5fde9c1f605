"""Transfer of an FNC ResNet-50 to another classification dataset: linear evaluation or fine-tuning.

Command (the argument is `<dataset>[,linear_eval|finetune]`, default protocol `linear_eval`):
  python -m fnc_jax.main --config=configs/transfer.py:cifar10 --workdir=gs://BUCKET/fnc_r50_cifar10_linear \
      --config.pretrained.workdir=gs://BUCKET/fnc_r50 --config.data.data_dir=$DATA
  python -m fnc_jax.main --config=configs/transfer.py:cifar10,finetune --workdir=gs://BUCKET/fnc_r50_cifar10_ft \
      --config.pretrained.workdir=gs://BUCKET/fnc_r50 --config.data.data_dir=$DATA

Datasets (`DATASETS`): the paper's transfer suite where TFDS has it — food101, cifar10, cifar100,
sun397, cars196, dtd, pets, caltech101, flowers — or any other TFDS name with `image` / `label`
features and `train` / `test` splits. Birdsnap and FGVC-Aircraft are not in TFDS (use
`--config.data.source=image_folder`); VOC2007 is multi-label (11-point mAP), which this single-label
protocol does not cover.

Protocol (SimCLR appendix B.8 / Kornblith et al. 2019; the paper does not describe its own, so the
mapping is unverified): images at 224 px (small datasets upsampled); a grid of learning rate x weight
decay, each point trained on the sweep-train split and scored (top-1) on a held-out validation split
(the dataset's own `validation`, or the last 20% of `train`); the best point retrained on the full
training split (train + validation where one exists) and tested on `test`. Every sweep point is in
results.json. Fine-tuning: the whole network from the pooled features (`ft_proj_selector = 0`), SGD
Nesterov 0.9, batch 256, 20,000 steps, cosine, BN momentum max(1 - 10/steps-per-epoch, 0.9), LR in
7 log-spaced values 1e-4 … 1e-1 x weight decay in 0 and 7 log-spaced values 1e-6 … 1e-3 (56 runs).
Linear evaluation: the frozen network (BN in inference mode) with a zero-initialised linear head
trained by SGD Nesterov on augmented crops (area (0.2, 1) + flip), batch 256, 20,000 steps, LR in
{0.01, 0.03, 0.1, 0.3, 1} x weight decay in {0, 1e-6, 1e-5, 1e-4, 1e-3} (25 runs). Departure: SimCLR
fitted an L2-regularised logistic regression with L-BFGS on fixed centre-crop features; fine-tuning
crops use area (0.2, 1) (the FNC recipe) rather than Inception crops (0.08, 1).

Hardware: 8 A100/H100 GPUs or a TPU v4-8. Expected wall time (estimates, not measured): about 30 min
per fine-tuning run (56 runs + 1: ~1.5 days per dataset), about 10 min per linear run (~4 h). Shrink
the grid with e.g. `--config.transfer.learning_rates='(0.01,0.1)'`.
Targets (docs/results.md §3, FNC rows): linear 74.4 / 93.0 / 76.8 / 54.0 / 63.2 / 68.8 / 61.3 / 83.0 /
76.3 / 89.0 / 93.5 / 94.9 and fine-tuned 88.3 / 97.7 / 86.8 / 76.3 / 64.2 / 92.0 / 88.5 / 84.7 / 76.0
/ 90.9 / 93.6 / 97.5 (Food, C10, C100, Birdsnap, SUN397, Cars, Aircraft, VOC07, DTD, Pets, Caltech101,
Flowers; averages 77.3 linear and 86.4 fine-tuned).
"""

import numpy as np

from fnc_jax.config_base import eval_config

# name → (TFDS name, train split, test split, sweep-train split, sweep-validation split, paper linear, paper fine-tuned)
DATASETS = {
    "food101": ("food101", "train", "validation", "train[:80%]", "train[80%:]", 74.4, 88.3),
    "cifar10": ("cifar10", "train", "test", "train[:80%]", "train[80%:]", 93.0, 97.7),
    "cifar100": ("cifar100", "train", "test", "train[:80%]", "train[80%:]", 76.8, 86.8),
    # TFDS's own SUN397 split, not partition 1 of the standard ten (unverified equivalence).
    "sun397": ("sun397/tfds", "train+validation", "test", "train", "validation", 63.2, 64.2),
    "cars196": ("cars196", "train", "test", "train[:80%]", "train[80%:]", 68.8, 92.0),
    "dtd": ("dtd", "train+validation", "test", "train", "validation", 76.3, 76.0),
    "pets": ("oxford_iiit_pet", "train", "test", "train[:80%]", "train[80%:]", 89.0, 90.9),
    "caltech101": ("caltech101", "train", "test", "train[:80%]", "train[80%:]", 93.5, 93.6),
    "flowers": ("oxford_flowers102", "train+validation", "test", "train", "validation", 94.9, 97.5),
}
UNSUPPORTED = {
    "birdsnap": "Birdsnap is not in TFDS: download it and use --config.data.source=image_folder with a generic name",
    "aircraft": "FGVC-Aircraft is not in TFDS: download it and use --config.data.source=image_folder with a generic name",
    "voc2007": "VOC2007 classification is multi-label (11-point mAP); this single-label protocol does not cover it",
}
PROTOCOLS = ("linear_eval", "finetune")


def get_config(arg: str = "cifar10"):
    name, _, protocol = arg.partition(",")
    protocol = protocol or "linear_eval"
    if name in UNSUPPORTED:
        raise ValueError(f"configs/transfer.py:{arg}: {UNSUPPORTED[name]}.")
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"configs/transfer.py:{arg}: the protocol {protocol!r} is invalid; allowed: {', '.join(PROTOCOLS)}."
        )
    tfds_name, train, test, sweep_train, sweep_val, _, _ = DATASETS.get(
        name, (name, "train", "test", "train[:80%]", "train[80%:]", None, None)
    )
    c = eval_config("transfer")
    c.batch_size = 256
    c.total_steps = 20000
    c.checkpoint_every_steps = 5000
    c.log_every_steps = 100
    c.data.name = tfds_name
    c.data.train_split = train
    c.data.eval_split = test
    c.data.image_size = 224
    c.model.depth = 50
    c.model.width_multiplier = 1.0
    c.model.ft_proj_selector = 0
    c.optim.name = "sgd_nesterov"
    c.optim.lr_scaling = "none"  # the grid holds the learning rates themselves
    c.optim.warmup_epochs = 0.0
    c.transfer.protocol = protocol
    c.transfer.sweep_train_split = sweep_train
    c.transfer.sweep_val_split = sweep_val
    if protocol == "finetune":
        c.transfer.learning_rates = tuple(float(x) for x in np.logspace(-4, -1, 7))
        c.transfer.weight_decays = (0.0,) + tuple(float(x) for x in np.logspace(-6, -3, 7))
        c.transfer.bn_momentum = -1  # max(1 - 10 / steps per epoch, 0.9)
    else:
        c.transfer.learning_rates = (0.01, 0.03, 0.1, 0.3, 1.0)
        c.transfer.weight_decays = (0.0, 1e-6, 1e-5, 1e-4, 1e-3)
        c.transfer.bn_momentum = 0.9  # unused: BN in inference mode
    return c
