"""Validation of evaluation configs (`config_base.eval_config`), before anything is read or compiled.

Every error names the field, the value and what is allowed, as `fnc_jax.configuration` does for
pretraining.
"""

from __future__ import annotations

import ml_collections

from fnc_jax import config_base, configuration, errors
from fnc_jax import field_checks as check
from fnc_jax.data import sources
from fnc_jax.evaluation import classification, restore
from fnc_jax.objectives import AGGREGATIONS

KNN_FEATURES = ("encoder", "projection")


def _section(config: ml_collections.ConfigDict, name: str, mode: str) -> ml_collections.ConfigDict:
    if name not in config:
        raise errors.ConfigError(
            f"config.{name} is missing: mode {mode!r} needs it (start from fnc_jax.config_base.eval_config({mode!r}))."
        )
    return config[name]


def validate_eval(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1) -> None:
    """Checks an evaluation config; raises ValueError naming the first bad field."""
    mode = config.get("mode")
    if mode not in config_base.EVAL_SECTIONS:
        raise check.invalid(
            "mode", mode, ", ".join(config_base.EVAL_SECTIONS) + " (pretrain runs through fnc_jax.pretrain)"
        )
    check.integer(config, "seed", 0)
    batch = check.integer(config, "batch_size", 1)
    for field, value in (("batch_size", batch), ("eval.batch_size", check.integer(config, "eval.batch_size", 1))):
        if value % num_devices:
            raise check.invalid(field, value, f"multiples of the device count ({num_devices})")
        if value % num_processes:
            raise check.invalid(field, value, f"multiples of the process count ({num_processes})")
    check.number(config, "epochs", 0.0, open_low=True)
    check.integer(config, "total_steps", 0)
    check.integer(config, "checkpoint_every_steps", 1)
    check.integer(config, "keep_checkpoints", 1)
    check.integer(config, "log_every_steps", 1)
    check.integer(config, "eval.every_steps", 0)
    check.choice(config, "data.source", sources.SOURCES)
    for field in ("data.name", "data.train_split", "data.eval_split"):
        if not check.string(config, field):
            raise check.invalid(field, "", "non-empty strings")
    configuration.validate_model(config)
    layers = config.model.proj_layers
    selector = config.model.ft_proj_selector
    if isinstance(selector, bool) or not isinstance(selector, int) or not -(layers + 1) <= selector <= layers:
        raise check.invalid(
            "model.ft_proj_selector",
            selector,
            f"integers in [-{layers + 1}, {layers}] (0 = encoder features, k = projection layer k-1, -1 = last)",
        )
    _validate_pretrained(config)
    if mode in config_base.TRAINED_MODES:
        _section(config, "optim", mode)
        configuration.validate_optim(config)
    if mode in ("finetune", "transfer"):
        _section(config, "finetune", mode)
        if not isinstance(config.finetune.train_projection, bool):
            raise check.invalid("finetune.train_projection", config.finetune.train_projection, "True or False")
    if mode == "knn":
        _section(config, "knn", mode)
        check.int_sequence(config, "knn.ks", 1)
        check.number(config, "knn.temperature", 0.0, open_low=True)
        check.choice(config, "knn.features", KNN_FEATURES)
        check.integer(config, "knn.test_batch_size", 1)
        check.integer(config, "knn.train_chunk_size", 1)
    if mode == "fn_analysis":
        _validate_fn_analysis(config)
    if mode == "transfer":
        _section(config, "transfer", mode)
        check.choice(config, "transfer.protocol", classification.PROTOCOLS)
        for field in ("transfer.sweep_train_split", "transfer.sweep_val_split"):
            if not check.string(config, field):
                raise check.invalid(field, "", "non-empty strings (TFDS split names or slices, e.g. 'train[:80%]')")
        check.number_sequence(config, "transfer.learning_rates", 0.0, open_low=True)
        check.number_sequence(config, "transfer.weight_decays", 0.0)
        momentum = config.transfer.bn_momentum
        if momentum != -1:
            check.number(config, "transfer.bn_momentum", 0.0, 1.0)


def _validate_pretrained(config: ml_collections.ConfigDict) -> None:
    p = config.pretrained
    workdir, checkpoint = check.string(config, "pretrained.workdir"), check.string(config, "pretrained.checkpoint")
    if workdir and checkpoint:
        raise errors.ConfigError(
            f"config.pretrained.workdir={workdir!r} and config.pretrained.checkpoint={checkpoint!r} are both set: "
            "allowed is one of them (a pretraining workdir, or one checkpoint step directory)."
        )
    if not isinstance(p.allow_random_init, bool):
        raise check.invalid("pretrained.allow_random_init", p.allow_random_init, "True or False")
    if not workdir and not checkpoint and not p.allow_random_init:
        raise errors.ConfigError(
            "config.pretrained.workdir='' and config.pretrained.checkpoint='' name no pretrained weights: allowed "
            "are a pretraining workdir (--config.pretrained.workdir=DIR), a checkpoint step directory "
            "(--config.pretrained.checkpoint=DIR/checkpoints/STEP), or --config.pretrained.allow_random_init=True "
            "for a random-initialisation baseline."
        )
    step = p.step
    if isinstance(step, bool) or not isinstance(step, int) or step < -1:
        raise check.invalid("pretrained.step", step, "-1 (latest) or a saved step >= 0")
    check.choice(config, "pretrained.network", restore.NETWORKS)


def _validate_fn_analysis(config: ml_collections.ConfigDict) -> None:
    analysis = _section(config, "fn_analysis", "fn_analysis")
    _section(config, "augment", "fn_analysis")
    if not check.string(config, "fn_analysis.split"):
        raise check.invalid("fn_analysis.split", "", "non-empty split names")
    views = check.integer(config, "fn_analysis.num_views", 2)
    check.integer(config, "fn_analysis.max_examples", 0)
    check.int_sequence(config, "fn_analysis.topks", 1)
    check.number_sequence(config, "fn_analysis.thresholds", -1.0, 1.0)
    aggregations = check.get(config, "fn_analysis.aggregations")
    if (
        not isinstance(aggregations, (tuple, list))
        or not aggregations
        or any(x not in AGGREGATIONS for x in aggregations)
    ):
        raise check.invalid(
            "fn_analysis.aggregations", aggregations, f"non-empty sequences of {', '.join(AGGREGATIONS)}"
        )
    support = check.int_sequence(config, "fn_analysis.support_sizes", 0, allow_empty=True)
    if any(s > views - 2 for s in support):
        raise check.invalid("fn_analysis.support_sizes", support, f"support sizes in [0, num_views - 2 = {views - 2}]")
    if config.batch_size % config.eval.batch_size:
        raise check.invalid(
            "batch_size",
            config.batch_size,
            f"multiples of eval.batch_size={config.eval.batch_size} in fn_analysis (views are computed eval.batch_size "
            "images at a time; batch_size is the candidate pool of one training batch)",
        )
    anchors = check.integer(config, "fn_analysis.anchor_batch_size", 0)
    if anchors and config.batch_size % anchors:
        raise check.invalid(
            "fn_analysis.anchor_batch_size", anchors, f"0 or divisors of batch_size={config.batch_size}"
        )
    check.integer(config, "fn_analysis.histogram_bins", 1)
    if not isinstance(analysis.save_embeddings, bool):
        raise check.invalid("fn_analysis.save_embeddings", analysis.save_embeddings, "True or False")
    configuration.validate_augment(config)
