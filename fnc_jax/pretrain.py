"""Pretraining: `run(config, workdir)` validates the config, builds the step (`fnc_jax.step`), drives it
with the shared loop (`fnc_jax.loop`) and writes the results, ending with the representation-quality
report on small data (`eval.final_report`).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from clu import metric_writers
from etils import epath

from fnc_jax import checkpoints, config_base, configuration, errors, loop, optim, parallel, step
from fnc_jax.data import pipeline, sources
from fnc_jax.evaluation import representation


def _summary(metrics: dict[str, float]) -> str:
    line = f"contrastive loss {metrics['contrastive_loss']:.4f}"
    if "fn_topk" in metrics:  # a false-negative schedule is on: the selection in force
        line += f" | FN k {metrics['fn_topk']:.0f}, cos > {metrics['fn_threshold']:.3f}"
    return line


def run(config: ml_collections.ConfigDict, workdir: str, *, start_over: bool = False) -> dict[str, Any]:
    """Runs (or resumes) pretraining in `workdir`; returns the final results (also in results.json)."""
    process_index, process_count = jax.process_index(), jax.process_count()
    fn = configuration.validate_pretrain(config, num_devices=jax.device_count(), num_processes=process_count)
    info = sources.get_source_info(config.data)
    num_train = info.num_examples[config.data.train_split]
    if config.augment.crop_on_device:
        pipeline.canvas_size(config, info.image_shape)  # fails now rather than in the input pipeline
    if num_train < config.batch_size:
        raise errors.ConfigError(
            f"config.batch_size={config.batch_size} is invalid: the training split has only {num_train} images "
            f"(allowed: batch_size <= {num_train})."
        )
    workdir_path = epath.Path(workdir)
    if process_index == 0:
        defaults = config_base.pretrain_config().to_dict()
        checkpoints.record_config(workdir_path, config.to_dict(), start_over=start_over, defaults=defaults)
    parallel.barrier("fnc_jax_config_recorded")  # moving an old run aside can take minutes

    warmup, total_steps = optim.step_counts(config, num_train)
    mesh = parallel.create_mesh()
    program = step.build_step(config, fn, mesh, num_classes=info.num_classes, num_train=num_train)
    writer = metric_writers.create_default_writer(str(workdir_path), just_logging=process_index > 0)
    result = loop.train(
        loop.LoopSettings.from_config(config, "pretrain", total_steps),
        workdir=workdir_path,
        state=program.initial_state(),
        step_fn=program.step_fn,
        batches=lambda start: pipeline.pretrain_iterator(
            config, process_index=process_index, process_count=process_count, start_step=start
        ),
        mesh=mesh,
        writer=writer,
        summary=_summary,
    )
    state = result.state
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "steps": int(state.step),
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "final_train_metrics": result.last_metrics,
        "preempted": result.preempted,
    }
    if config.eval.final_report and not result.preempted:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        quality = representation.quality_report(config, program.model, variables, mesh, info)
        quality["fn_precision_last_window"] = result.last_metrics.get("fn_precision")
        quality["fn_recall_last_window"] = result.last_metrics.get("fn_recall")
        representation.print_report(quality)
        writer.write_scalars(int(state.step), representation.flat_scalars(quality))
        results["quality"] = quality
    if process_index == 0:
        checkpoints.write_json_atomic(workdir_path / "results.json", results)
    writer.close()
    return results
