"""The base pretraining configuration: every field, with the official FNC values as defaults.

Experiment files in `configs/` start from `pretrain_config()` and change what differs; the field
names are the contract with `fnc_jax.configuration` (validation) and the trainer. Defaults are the
official implementation's (google-research/fnc; `shared/spec/training_recipe.md`), except where
the spec lists an official bug not to replicate (EMA initialisation, per-image blur sigma).
"""

import ml_collections


def pretrain_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "pretrain"
    c.seed = 0
    c.batch_size = 4096  # global, in images (each gives 2 + support_size views)
    c.epochs = 100
    c.total_steps = 0  # > 0 overrides epochs
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.log_every_steps = 100
    c.dtype = "float32"  # compute dtype of the networks: float32 or bfloat16 (params, loss: float32)

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # tfds | image_folder | embedded
    c.data.name = "imagenet2012"
    c.data.data_dir = ""  # TFDS data dir or image-folder root ("" = TFDS default)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 224
    c.data.shuffle_buffer = 0  # 0 = 10 x per-host batch

    c.views = ml_collections.ConfigDict()
    c.views.support_size = 8  # V = 2 + support_size views per image

    c.augment = ml_collections.ConfigDict()
    c.augment.color_strength = 1.0
    c.augment.use_randaugment = True
    c.augment.on_device = False  # colour jitter / grayscale on the accelerator (needs use_randaugment=False)
    c.augment.area_range = (0.08, 1.0)
    c.augment.blur = True
    c.augment.blur_sigma = "per_image"  # per_image | per_device (the official quirk)
    c.augment.solarize_p = 0.0  # on-device solarisation probability (needs on_device)

    c.model = ml_collections.ConfigDict()
    c.model.depth = 50
    c.model.width_multiplier = 1.0
    c.model.sk_ratio = 0.0
    c.model.se_ratio = 0.0
    c.model.proj_layers = 3
    c.model.proj_out_dim = 128
    c.model.proj_hidden_dim = 0  # 0 = encoder width
    c.model.online_probe = True  # linear probe on stop-gradient features, when labels exist

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.1
    c.loss.hidden_norm = True
    c.loss.low_memory = True  # view-by-view loss: peak memory ~ B*V*N instead of B*V*V*N

    c.fn = ml_collections.ConfigDict()
    c.fn.mode = "attraction"  # attraction | elimination | none
    c.fn.aggregation = "max"  # max | mean
    c.fn.support_set = "all_views"  # all_views | support_only
    c.fn.selection = "topk_and_threshold"  # topk | threshold | topk_and_threshold | oracle
    c.fn.topk = 10
    c.fn.threshold = 0.7
    c.fn.support_as_positives = True

    c.memory = ml_collections.ConfigDict()
    c.memory.multiplier = 16  # M: queue of M x global-batch rows; 0 = in-batch candidates only

    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.999
    c.ema.init = "copy"  # copy (fnc_jax) | independent (official bug, for fidelity)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "lars"  # lars | sgd_nesterov | adamw
    c.optim.base_lr = 0.1
    c.optim.lr_scaling = "sqrt"  # sqrt: base*sqrt(B) | linear: base*B/256 | none
    c.optim.warmup_epochs = 10.0
    c.optim.weight_decay = 1e-4
    c.optim.momentum = 0.9
    c.optim.trust_coefficient = 1e-3

    c.eval = ml_collections.ConfigDict()
    c.eval.final_report = False  # kNN + linear probe on frozen features after training (small data)
    c.eval.compare_random_init = True  # report the same evaluations for a random encoder
    c.eval.batch_size = 256
    c.eval.knn_ks = (20, 200)
    c.eval.knn_temperature = 0.07
    c.eval.probe_epochs = 100  # full-batch logistic-regression epochs of the final-report probe
    return c
