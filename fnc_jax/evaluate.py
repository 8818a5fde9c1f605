"""Evaluation modes, all starting from a pretraining checkpoint: `run(config, workdir)`.

| `config.mode` | what | protocol |
|---|---|---|
| `linear_eval` | zero-init linear head on the frozen network (BN in inference mode) | training recipe §5 |
| `finetune` | encoder + head from projection layer 0, LARS, global BN in training mode | §6 (1% / 10% labels) |
| `knn` | weighted kNN (k = 20, 200; T = 0.07) on frozen l2-normalised features, sharded over devices | Wu et al. 2018 |
| `fn_analysis` | false-negative identification precision / recall over a grid of selection settings | docs/method.md §4 |
| `transfer` | linear eval or fine-tuning on another dataset; LR × weight-decay sweep on a held-out part of train, retrain on all of train with the best point, report test accuracy | SimCLR / Kornblith et al. 2019 |

Each run validates its config before anything is read or compiled, records `config.json` in its
workdir (refusing an incompatible config there unless `start_over`), restores the pretrained weights
by the rules of `evaluation.restore`, writes TensorBoard scalars (process 0) and `results.json`, and
returns the results. `linear_eval`, `finetune` and every transfer run checkpoint themselves and
resume automatically from their workdir, like pretraining.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from etils import epath

from fnc_jax import checkpoints, config_base, console, errors, parallel
from fnc_jax.data import sources
from fnc_jax.evaluation import classification, features, fn_analysis, knn, restore, starting_variables, validation
from fnc_jax.models import factory

FN_VIEWS_DOC = (
    "pretraining views: the host pipeline of pretraining (pipeline.pretrain_iterator: augment.pretrain_view with "
    "config.augment, shuffled with config.seed) applied to the analysis split, then the device-side blur (and colour "
    "with augment.on_device) of the train step; projections from the network with BatchNorm in inference mode"
)


def _split_sizes(config: ml_collections.ConfigDict, splits: tuple[str, ...]) -> dict[str, int]:
    """Example counts of `splits` (TFDS slices allowed); errors name the split."""
    sizes = {}
    for split in splits:
        data = config.data.copy_and_resolve_references()
        with data.unlocked():
            data.train_split = split
        sizes[split] = sources.get_source_info(data).num_examples[split]
    return sizes


def _protocol_summary(protocol: classification.Protocol) -> dict[str, Any]:
    return {
        "trained": ["/".join(p) for p in protocol.trainable],
        "batchnorm": "training mode (batch statistics)"
        if protocol.bn_train
        else "inference mode (frozen moving statistics)",
        "optimizer": protocol.optimizer,
    }


def _run_classifier(config, workdir, source, info, mesh) -> dict[str, Any]:
    kind = config.mode
    model = factory.classifier_model(config, info.num_classes)
    variables, report = starting_variables.starting_variables(config, model, source, mesh, workdir)
    starting_variables.print_restore(report)
    hparams = classification.hparams_from_config(
        config,
        info.num_examples[config.data.train_split],
        base_lr=config.optim.base_lr,
        weight_decay=config.optim.weight_decay,
    )
    protocol = classification.protocol_from_config(config, kind)
    results, _ = classification.train(
        config=config,
        model=model,
        protocol=protocol,
        variables=variables,
        hparams=hparams,
        workdir=workdir,
        train_split=config.data.train_split,
        eval_split=config.data.eval_split,
        mesh=mesh,
    )
    return {"pretrained": report, "protocol": _protocol_summary(protocol), **results}


def _encoder_variables(config, source, mesh) -> tuple[Any, dict, dict]:
    model = factory.contrastive_model(config)
    variables, report = starting_variables.initial_variables(config, model, source, mesh)
    starting_variables.print_restore(report)
    return model, variables, report


def _run_knn(config, workdir, source, info, mesh) -> dict[str, Any]:
    model, variables, report = _encoder_variables(config, source, mesh)
    output = "features" if config.knn.features == "encoder" else "projection"
    (train_x, train_y), (test_x, test_y) = features.extract_train_and_eval(
        model, variables, config, mesh, output=output
    )
    scores = knn.knn_evaluate(
        test_x,
        test_y,
        train_x,
        train_y,
        num_classes=info.num_classes,
        ks=tuple(config.knn.ks),
        temperature=config.knn.temperature,
        mesh=mesh,
        batch_size=config.knn.test_batch_size,
        train_chunk_size=config.knn.train_chunk_size,
    )
    for k in config.knn.ks:
        console.say(
            f"kNN k={k}: top-1 {100 * scores[f'knn_top1_k{k}']:.2f}% | top-5 {100 * scores[f'knn_top5_k{k}']:.2f}%"
        )
    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
    writer.write_scalars(source.step or 0, {f"knn/{k}": v for k, v in scores.items()})
    writer.close()
    return {
        "pretrained": report,
        "features": output,
        "num_train": len(train_y),
        "num_test": len(test_y),
        "train_split": config.data.train_split,
        "eval_split": config.data.eval_split,
        **scores,
    }


def fn_analysis_size(config: ml_collections.ConfigDict) -> int:
    """Images analysed: the split (or max_examples), within every process's shard, whole batches only."""
    split = config.fn_analysis.split
    shards = sources.shard_sizes(config.data, split, jax.process_count())
    available = jax.process_count() * min(shards)
    wanted = min(available, config.fn_analysis.max_examples or available)
    n = wanted // config.batch_size * config.batch_size
    if n == 0:
        raise errors.ConfigError(
            f"config.batch_size={config.batch_size} is invalid for fn_analysis: split {split!r} has {available} usable "
            f"images (fn_analysis.max_examples={config.fn_analysis.max_examples}); allowed: batch_size <= {wanted}."
        )
    return n


def _run_fn_analysis(config, workdir, source, info, mesh) -> dict[str, Any]:
    a = config.fn_analysis
    n = fn_analysis_size(config)
    model, variables, report = _encoder_variables(config, source, mesh)
    embeddings, labels = features.view_projections(
        model,
        variables,
        config,
        mesh,
        split=a.split,
        num_views=a.num_views,
        num_examples=n,
        batch_size=config.eval.batch_size,
    )
    anchors = a.anchor_batch_size or None
    rows = fn_analysis.sweep(
        embeddings,
        labels,
        batch_size=config.batch_size,
        topks=tuple(a.topks),
        thresholds=tuple(a.thresholds),
        aggregations=tuple(a.aggregations),
        support_sizes=tuple(a.support_sizes) or None,
        anchor_batch_size=anchors,
    )
    histograms = fn_analysis.similarity_histograms(
        embeddings, labels, batch_size=config.batch_size, bins=a.histogram_bins, anchor_batch_size=anchors
    )
    plots = []
    if jax.process_index() == 0:
        plots = [p.name for p in fn_analysis.write_report(rows, histograms, workdir)]
        if a.save_embeddings:
            with (workdir / "embeddings.npz").open("wb") as f:
                np.savez(f, embeddings=embeddings, labels=labels)
    chance = float(np.sum(np.bincount(labels) ** 2) / len(labels) ** 2)
    largest = max(r["support_size"] for r in rows)
    shown = "max" if "max" in a.aggregations else a.aggregations[0]
    console.say(
        f"False-negative identification on {n} images of {a.split!r}, {a.num_views} views, batches of "
        f"{config.batch_size} (chance precision ~{100 * chance:.1f}%), support size {largest}, {shown} "
        "aggregation (the full table is in results.json):"
    )
    for r in rows:
        if r["support_size"] == largest and r["aggregation"] == shown and r["selection"] != "threshold":
            console.say(
                f"  {r['aggregation']:<4} top-{r['topk']:<3} θ={r['threshold'] if r['threshold'] is not None else 'none':<5} "
                f"precision {100 * r['precision']:5.1f}% | recall {100 * r['recall']:5.1f}% | mean |F| {r['mean_num_fn']:.2f}"
            )
    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
    scalars = {}
    for r in rows:
        name = f"S{r['support_size']}_{r['aggregation']}_k{r['topk'] or 'none'}_t{r['threshold'] or 'none'}"
        scalars[f"fn_precision/{name}"] = r["precision"]
        scalars[f"fn_recall/{name}"] = r["recall"]
    writer.write_scalars(source.step or 0, scalars)
    writer.close()
    return {
        "pretrained": report,
        "split": a.split,
        "num_examples": n,
        "num_views": a.num_views,
        "batch_size": config.batch_size,
        "views": FN_VIEWS_DOC,
        "chance_precision": chance,
        "sweep": rows,
        "histograms": {k: np.asarray(v).tolist() for k, v in histograms.items()},
        "plots": plots,
    }


def transfer_bn_momentum(config: ml_collections.ConfigDict, num_train: int) -> float:
    """`transfer.bn_momentum`, or with -1 Kornblith et al.'s max(1 - 10 / steps per epoch, 0.9).

    Steps per epoch are counted on the full training split for the sweep runs too, so that every run
    shares one network (and one compiled step)."""
    if config.transfer.bn_momentum != -1:
        return float(config.transfer.bn_momentum)
    steps_per_epoch = max(num_train // config.batch_size, 1)
    return max(1.0 - 10.0 / steps_per_epoch, 0.9)


def _run_transfer(config, workdir, source, info, mesh) -> dict[str, Any]:
    t = config.transfer
    kind = t.protocol
    sizes = _split_sizes(config, (t.sweep_train_split, t.sweep_val_split, config.data.train_split))
    bn_momentum = transfer_bn_momentum(config, sizes[config.data.train_split])
    model = factory.classifier_model(config, info.num_classes, bn_momentum=bn_momentum)
    protocol = classification.protocol_from_config(config, kind)
    variables, report = starting_variables.starting_variables(config, model, source, mesh, workdir)
    starting_variables.print_restore(report)

    def one_run(run_dir: epath.Path, base_lr: float, weight_decay: float, train_split: str, eval_split: str):
        done_file = run_dir / "results.json"
        if done_file.exists():
            return json.loads(done_file.read_text())
        hparams = classification.hparams_from_config(
            config, sizes[train_split], base_lr=base_lr, weight_decay=weight_decay
        )
        console.say(
            f"transfer ({kind}) run {run_dir.name}: base LR {base_lr:g}, weight decay {weight_decay:g}, "
            f"train on {train_split!r}, evaluate on {eval_split!r}"
        )
        results, _ = classification.train(
            config=config,
            model=model,
            protocol=protocol,
            variables=variables,
            hparams=hparams,
            workdir=run_dir,
            train_split=train_split,
            eval_split=eval_split,
            mesh=mesh,
        )
        results = {"base_lr": base_lr, "weight_decay": weight_decay, "train_split": train_split, **results}
        if jax.process_index() == 0 and not results["preempted"]:
            checkpoints.write_json_atomic(done_file, results)
        parallel.barrier(f"fnc_jax_eval_transfer run {run_dir.name}")
        return results

    sweep = []
    grid = [(lr, wd) for lr in t.learning_rates for wd in t.weight_decays]
    for i, (lr, wd) in enumerate(grid):
        run = one_run(workdir / "sweep" / f"{i:02d}_lr{lr:g}_wd{wd:g}", lr, wd, t.sweep_train_split, t.sweep_val_split)
        if run["preempted"]:
            return {"pretrained": report, "sweep": sweep, "preempted": True}
        sweep.append(
            {
                "base_lr": lr,
                "learning_rate": run["hparams"]["learning_rate"],
                "weight_decay": wd,
                "steps": run["steps"],
                "val_top1": run["eval"]["top1"],
                "val_top5": run["eval"]["top5"],
                "val_loss": run["eval"]["loss"],
            }
        )
    # Highest validation top-1; ties go to the earlier grid point. A NaN never wins.
    best = max(sweep, key=lambda r: r["val_top1"] if math.isfinite(r["val_top1"]) else -1.0)
    console.say(
        f"transfer sweep: best base LR {best['base_lr']:g}, weight decay {best['weight_decay']:g} "
        f"(validation top-1 {100 * best['val_top1']:.2f}%); retraining on {config.data.train_split!r}"
    )
    final = one_run(
        workdir / "final", best["base_lr"], best["weight_decay"], config.data.train_split, config.data.eval_split
    )
    results = {
        "pretrained": report,
        "protocol": {**_protocol_summary(protocol), "kind": kind, "bn_momentum": bn_momentum},
        "dataset": config.data.name,
        "splits": {
            "sweep_train": t.sweep_train_split,
            "sweep_val": t.sweep_val_split,
            "train": config.data.train_split,
            "test": config.data.eval_split,
        },
        "split_sizes": sizes,
        "sweep": sweep,
        "best": best,
        "preempted": final["preempted"],
        "final": final,
    }
    if not final["preempted"]:
        results["test"] = final["eval"]
    return results


RUNNERS = {
    "linear_eval": _run_classifier,
    "finetune": _run_classifier,
    "knn": _run_knn,
    "fn_analysis": _run_fn_analysis,
    "transfer": _run_transfer,
}


def run(config: ml_collections.ConfigDict, workdir: str, *, start_over: bool = False) -> dict[str, Any]:
    """Runs (or resumes) the evaluation `config.mode` in `workdir`; returns results (also in results.json)."""
    validation.validate_eval(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    source = restore.find_checkpoint(config.pretrained)
    restore.check_model_matches(config, source)
    info = sources.get_source_info(config.data)
    workdir_path = epath.Path(workdir)
    if jax.process_index() == 0:
        defaults = config_base.eval_config(config.mode).to_dict()
        checkpoints.record_config(workdir_path, config.to_dict(), start_over=start_over, defaults=defaults)
    parallel.barrier("fnc_jax_eval_config recorded")
    mesh = parallel.create_mesh()
    console.say(
        f"{config.mode}: pretrained weights from {source.describe()}; data {config.data.name} "
        f"({info.num_classes} classes); workdir {workdir}"
    )
    results = RUNNERS[config.mode](config, workdir_path, source, info, mesh)
    results = {"config": config.to_dict(), "mode": config.mode, **results}
    if jax.process_index() == 0:
        checkpoints.write_json_atomic(workdir_path / "results.json", results)
    return results
