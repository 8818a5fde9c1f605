"""The official FNC pretraining recipe on ImageNet (google-research/fnc defaults), exactly.

Command (prepare ImageNet first: `tfds build imagenet2012 --data_dir=$DATA --manual_dir=$MANUAL`):
  python -m fnc_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/fnc_r50 \
      --config.data.data_dir=$DATA

Recipe: ResNet-50, global batch 4096, 2 + 8 views of 224 px with RandAugment(2, 7), memory queue of
16 x batch fed by an EMA encoder (0.999), FN attraction with max over all views and top-10 ∩ cos > 0.7,
tau = 0.1, LARS at 0.1·√4096 = 6.4, weight decay 1e-4, 10 warm-up epochs + cosine, global BatchNorm,
100 epochs (31,279 steps). Hardware: a TPU v4-128 / v5p-128 pod slice or 64+ A100/H100 GPUs
(launch/). Expected: ImageNet linear evaluation 71.43% top-1 after 100 epochs (docs/results.md §4.3,
"SimCLR + multi-crop + momentum encoder" + FN cancellation); 74.4% after 1000 epochs (`--config.epochs=1000`,
docs/results.md §1; epoch count unverified). Wall time: not yet measured by this project.

At full speed: as written, the recipe makes every view on the host (2.3-3.1 CPU-ms per view with
RandAugment on this project's 2-core VM), more host cores than most accelerator nodes have. The same
recipe, RandAugment(2, 7) included, runs on the accelerator with
  --config.augment.on_device=True --config.augment.crop_on_device=True --config.augment.canvas_size=512
(`fnc_jax.data.layout.DEVICE_CROP`: the host only decodes, pads each image onto a 512 px canvas, larger
images shrunk to fit, and draws the crop boxes and flips, about 0.13 CPU-ms per view; crop, resize,
colour jitter, RandAugment, grayscale and blur run in the jitted step). `augment.on_device=True` alone
keeps crop and resize on the host (about 0.6 CPU-ms per view). The colour and RandAugment draws then
come from the step's keys instead of the host's seeds: the same distribution, other samples, so a run
does not resume across a change of these switches.
"""

from fnc_jax.config_base import pretrain_config


def get_config():
    c = pretrain_config()
    c.checkpoint_every_steps = 1000
    c.log_every_steps = 100
    return c
