"""The base pretraining configuration: every field, with the official FNC values as defaults.

Experiment files in `configs/` start from `pretrain_config()` and change what differs; the field
names are the contract with `fnc_jax.configuration` (validation) and the trainer. Defaults are the
official implementation's (google-research/fnc; docs/training_recipe.md), except for an official bug not
to replicate (the EMA encoder's random initialisation, §9.1) and a recommended departure from an official
quirk (one blur sigma per image rather than per device, §9.2); both official behaviours stay selectable.
"""

import ml_collections


def pretrain_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = PRETRAIN
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
    c.augment.on_device = False  # colour jitter, RandAugment, grayscale on the accelerator
    c.augment.crop_on_device = False  # also crop, resize and flip there; the host sends canvases (needs on_device)
    c.augment.canvas_size = 0  # host canvas side with crop_on_device; 0 = the source's fixed image side
    c.augment.area_range = (0.08, 1.0)
    c.augment.blur = True
    c.augment.blur_sigma = "per_image"  # per_image | per_device (the official quirk)
    c.augment.solarize_p = 0.0  # on-device solarisation probability (needs on_device)

    c.model = ml_collections.ConfigDict()
    c.model.depth = 50
    c.model.width_multiplier = 1.0
    c.model.stem = "auto"  # auto: CIFAR stem (3x3, no max-pool) at <= 32 px, else ImageNet stem | cifar | imagenet
    c.model.sk_ratio = 0.0
    c.model.se_ratio = 0.0
    c.model.proj_layers = 3
    c.model.proj_out_dim = 128
    c.model.proj_hidden_dim = 0  # 0 = encoder width
    c.model.online_probe = True  # linear probe on stop-gradient features, when labels exist

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "fnc"  # fnc (FNC; with fn.mode='none' the multi-view NT-Xent baseline) | dcl | hcl
    c.loss.tau_plus = 0.1  # dcl, hcl: the class prior of the debiased estimator, in [0, 1)
    c.loss.beta = 1.0  # hcl: how strongly hard negatives are up-weighted, >= 0 (0 = dcl)
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
    # The schedule (objectives.FNSchedule), as shares of the run's steps; both 0 = off (the fixed selection
    # from step 0). Nothing is cancelled before start_fraction; over ramp_fraction, k rises from
    # ramp_from_topk to topk and the threshold falls from ramp_from_threshold (1.0: nothing passes) to threshold.
    c.fn.start_fraction = 0.0
    c.fn.ramp_fraction = 0.0
    c.fn.ramp_from_topk = 1
    c.fn.ramp_from_threshold = 1.0

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
    # The online probe's LR relative to the main schedule (1.0: official, the probe shares it).
    c.optim.probe_lr_multiplier = 1.0

    c.eval = ml_collections.ConfigDict()
    c.eval.final_report = False  # kNN + linear probe on frozen features after training (small data)
    c.eval.compare_random_init = True  # report the same evaluations for a random encoder
    c.eval.batch_size = 256
    c.eval.knn_ks = (20, 200)
    c.eval.knn_temperature = 0.07
    c.eval.probe_epochs = 100  # full-batch logistic-regression epochs of the final-report probe
    return c


PRETRAIN = "pretrain"
# The evaluation modes (`fnc_jax.evaluate`) and the config sections each adds to the common fields.
EVAL_SECTIONS = {
    "linear_eval": ("optim",),
    "finetune": ("optim", "finetune"),
    "knn": ("knn",),
    "fn_analysis": ("fn_analysis", "augment"),
    "transfer": ("optim", "finetune", "transfer"),
}
MODES = (PRETRAIN, *EVAL_SECTIONS)
TRAINED_MODES = tuple(mode for mode, sections in EVAL_SECTIONS.items() if "optim" in sections)


def eval_config(mode: str) -> ml_collections.ConfigDict:
    """The base of every evaluation mode (`fnc_jax.evaluate`), with the ImageNet protocol defaults.

    Common fields: the run (seed, global batch, epochs / total_steps, checkpoints, logging), `data`,
    `model` (must match the pretraining network; `ft_proj_selector` picks the classifier input),
    `pretrained` (where the weights come from) and `eval` (held-out evaluation). The mode adds its
    own sections (`EVAL_SECTIONS`): `optim` for trained modes, `finetune`, `knn`, `fn_analysis` with
    the pretraining `augment` settings, `transfer`. Defaults are the linear-evaluation recipe
    (training recipe §5): SGD Nesterov 0.9, 0.005·√1024 = 0.16, no weight decay or warm-up, cosine,
    batch 1024, 90 epochs; the fine-tuning recipe (§6) changes the optimiser to LARS.
    """
    if mode not in EVAL_SECTIONS:
        raise ValueError(f"eval_config(mode={mode!r}) is invalid: allowed modes are {', '.join(EVAL_SECTIONS)}.")
    base = pretrain_config()
    c = ml_collections.ConfigDict()
    c.mode = mode
    c.seed = 0
    c.batch_size = 1024  # global; for fn_analysis the candidate pool of one training batch
    c.epochs = 90
    c.total_steps = 0  # > 0 overrides epochs
    c.checkpoint_every_steps = 5000
    c.keep_checkpoints = 2
    c.log_every_steps = 100
    c.dtype = "float32"

    c.data = base.data.copy_and_resolve_references()  # train_split: trained on / features; eval_split: reported

    c.model = base.model.copy_and_resolve_references()
    del c.model["online_probe"]
    c.model.ft_proj_selector = 0  # 0 = pooled encoder features, k = projection layer k-1 output, -1 = last
    c.model.zero_init_head = True

    c.pretrained = ml_collections.ConfigDict()
    c.pretrained.workdir = ""  # a pretraining workdir: its checkpoints/ (latest step unless `step`)
    c.pretrained.checkpoint = ""  # or one checkpoint step directory, e.g. <workdir>/checkpoints/31279
    c.pretrained.step = -1  # with `workdir`: the step to use, -1 = latest
    c.pretrained.allow_random_init = False  # both empty = random-init baseline, only when True
    c.pretrained.network = "online"  # online | ema (memory-mode checkpoints hold the EMA network too)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256  # global, padded last batch (masked)
    c.eval.every_steps = 0  # > 0: also evaluate on data.eval_split during training

    if "optim" in EVAL_SECTIONS[mode]:
        c.optim = ml_collections.ConfigDict()
        c.optim.name = "sgd_nesterov"  # lars | sgd_nesterov | adamw
        c.optim.base_lr = 0.005
        c.optim.lr_scaling = "sqrt"
        c.optim.warmup_epochs = 0.0
        c.optim.weight_decay = 0.0
        c.optim.momentum = 0.9
        c.optim.trust_coefficient = 1e-3
    if "finetune" in EVAL_SECTIONS[mode]:
        c.finetune = ml_collections.ConfigDict()
        # Official quirk (§9.2): the projection layers below the classifier input stay at their
        # pretrained values (their BN still runs in training mode). True trains them too.
        c.finetune.train_projection = False
    if mode == "knn":
        c.knn = ml_collections.ConfigDict()
        c.knn.ks = (20, 200)
        c.knn.temperature = 0.07
        c.knn.features = "encoder"  # encoder (pooled) | projection (l2-normalised in the vote)
        c.knn.test_batch_size = 256
        c.knn.train_chunk_size = 65536
    if mode == "fn_analysis":
        c.augment = base.augment.copy_and_resolve_references()
        c.fn_analysis = ml_collections.ConfigDict()
        c.fn_analysis.split = "validation"  # labelled split whose views are analysed
        c.fn_analysis.num_views = 10  # V = 2 + support views, as in pretraining
        c.fn_analysis.max_examples = 0  # 0 = the whole split (rounded down to whole batches)
        c.fn_analysis.topks = (1, 2, 5, 10, 20)
        c.fn_analysis.thresholds = (0.5, 0.6, 0.7, 0.8, 0.9)
        c.fn_analysis.aggregations = ("max", "mean")
        c.fn_analysis.support_sizes = ()  # () = every even S up to V - 2, and V - 2
        c.fn_analysis.anchor_batch_size = 0  # 0 = all anchors of a batch at once; else a divisor of batch_size
        c.fn_analysis.histogram_bins = 50
        c.fn_analysis.save_embeddings = False  # embeddings.npz: (V, N, d) projections and labels
    if mode == "transfer":
        c.transfer = ml_collections.ConfigDict()
        c.transfer.protocol = "linear_eval"  # linear_eval | finetune
        c.transfer.sweep_train_split = "train[:80%]"  # hyper-parameter selection: train here ...
        c.transfer.sweep_val_split = "train[80%:]"  # ... select the best top-1 here
        c.transfer.learning_rates = (0.1, 0.01)  # each replaces optim.base_lr (then optim.lr_scaling)
        c.transfer.weight_decays = (0.0, 1e-4)
        c.transfer.bn_momentum = 0.9  # -1 = max(1 - 10 / steps per epoch, 0.9) (Kornblith et al.)
    return c
