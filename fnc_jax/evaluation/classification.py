"""Supervised training on a pretrained network: linear evaluation, fine-tuning, and their transfer runs.

* **Linear evaluation** (training recipe §5): a zero-initialised linear `head` on the frozen network,
  whose BatchNorm runs in inference mode (moving statistics never change). Gradients are taken with
  respect to the head only, so XLA drops the encoder's backward pass altogether.
* **Fine-tuning** (§6): the encoder and the head are trained, BatchNorm in training mode (global
  batch statistics over the mesh). The classifier reads projection layer `ft_proj_selector - 1`;
  the projection layers below it keep their pretrained weights (official quirk, §9.2) unless
  `finetune.train_projection`, but their BatchNorm runs in training mode either way.

Peak learning rate, weight decay, warm-up and total steps live in the state (`hparams`) as arrays, so
one compiled step serves every point of a hyper-parameter sweep and the retraining that follows. The
schedule is the recipe's: linear warm-up, then cosine decay to 0 (`optim.learning_rate_schedule`),
evaluated at the step count before the update.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metric_writers
from etils import epath
from flax import struct, traverse_util

from fnc_jax import console, loop, optim, parallel
from fnc_jax.data import pipeline

PROTOCOLS = ("linear_eval", "finetune")  # what a classifier run trains: the head, or encoder + head


class ClassifierState(struct.PyTreeNode):
    step: jax.Array
    params: Any  # the whole network; only `Protocol.trainable` prefixes change
    batch_stats: Any
    opt_state: Any  # over the trainable sub-tree
    hparams: dict[str, jax.Array]  # learning_rate (peak), weight_decay, warmup_steps, total_steps


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Static settings of the classifier step (hashable: part of the jit cache key)."""

    kind: str
    trainable: tuple[tuple[str, ...], ...]  # parameter path prefixes that are trained
    bn_train: bool  # BatchNorm in training mode (batch statistics, moving averages updated)
    optimizer: str
    momentum: float
    trust_coefficient: float


def trainable_prefixes(kind: str, *, ft_proj_selector: int, proj_layers: int, train_projection: bool):
    """Parameter path prefixes trained by `kind` ('linear_eval': the head; 'finetune': encoder + head)."""
    if kind == "linear_eval":
        return (("head",),)
    if kind != "finetune":
        raise ValueError(f"kind={kind!r} is invalid: allowed values are {', '.join(PROTOCOLS)}.")
    prefixes = [("encoder",), ("head",)]
    if train_projection and ft_proj_selector != 0:
        below = ft_proj_selector if ft_proj_selector > 0 else proj_layers + 1 + ft_proj_selector
        for i in range(below):
            prefixes += [("projection_head", f"dense_{i}"), ("projection_head", f"bn_{i}")]
    return tuple(prefixes)


def protocol_from_config(config: ml_collections.ConfigDict, kind: str) -> Protocol:
    train_projection = bool(config.finetune.train_projection) if "finetune" in config else False
    return Protocol(
        kind=kind,
        trainable=trainable_prefixes(
            kind,
            ft_proj_selector=config.model.ft_proj_selector,
            proj_layers=config.model.proj_layers,
            train_projection=train_projection,
        ),
        bn_train=kind == "finetune",
        optimizer=config.optim.name,
        momentum=float(config.optim.momentum),
        trust_coefficient=float(config.optim.trust_coefficient),
    )


def split_params(params: dict, prefixes: tuple[tuple[str, ...], ...]) -> tuple[dict, dict]:
    """(trainable, frozen) nested sub-trees of `params` by path prefix."""
    flat = traverse_util.flatten_dict(params)
    is_trainable = {k: any(k[: len(p)] == p for p in prefixes) for k in flat}
    trainable = traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_trainable[k]})
    frozen = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_trainable[k]})
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    return traverse_util.unflatten_dict(traverse_util.flatten_dict(frozen) | traverse_util.flatten_dict(trainable))


def learning_rate_at(step: jax.Array, hparams: dict[str, jax.Array]) -> jax.Array:
    """The recipe's schedule (`optim.warmup_cosine`) with the state's traced peak / warm-up / total."""
    return optim.warmup_cosine(
        step, peak=hparams["learning_rate"], warmup_steps=hparams["warmup_steps"], total_steps=hparams["total_steps"]
    )


def make_hparams(*, learning_rate: float, weight_decay: float, warmup_steps: int, total_steps: int) -> dict:
    values = dict(
        learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps, total_steps=total_steps
    )
    return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}


def hparams_from_config(
    config: ml_collections.ConfigDict, num_train: int, *, base_lr: float, weight_decay: float
) -> dict:
    """The state's hyper-parameters for a run on `num_train` examples: the peak LR scaled by
    `optim.lr_scaling` of the global batch, and the run's warm-up and total steps (`optim.step_counts`)."""
    warmup, total = optim.step_counts(config, num_train)
    return make_hparams(
        learning_rate=optim.peak_learning_rate(base_lr, config.batch_size, config.optim.lr_scaling),
        weight_decay=weight_decay,
        warmup_steps=warmup,
        total_steps=total,
    )


def make_optimizer(protocol: Protocol, hparams: dict, trainable: Any) -> optax.GradientTransformation:
    """`optim.create_optimizer` with the schedule and weight decay read from `hparams`."""
    return optim.create_optimizer(
        name=protocol.optimizer,
        schedule=lambda count: learning_rate_at(count, hparams),
        weight_decay=hparams["weight_decay"],
        momentum=protocol.momentum,
        trust_coefficient=protocol.trust_coefficient,
        params=trainable,
    )


@functools.cache
def _state_builder(protocol: Protocol, mesh: jax.sharding.Mesh):
    def build(variables, hparams):
        # Copies: the train step donates its state, and the caller may start several runs from `variables`.
        params = jax.tree.map(jnp.copy, variables["params"])
        trainable, _ = split_params(params, protocol.trainable)
        return ClassifierState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=jax.tree.map(jnp.copy, variables.get("batch_stats", {})),
            opt_state=make_optimizer(protocol, hparams, trainable).init(trainable),
            hparams=hparams,
        )

    return jax.jit(build, out_shardings=parallel.replicated(mesh))


def init_state(protocol: Protocol, variables: dict, hparams: dict, mesh: jax.sharding.Mesh) -> ClassifierState:
    """A fresh state (step 0, new optimiser slots) replicated over the mesh; `variables` stay valid."""
    return _state_builder(protocol, mesh)(variables, hparams)


def _topk_hits(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    top1 = jnp.argmax(logits, -1) == labels
    _, top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    return top1, jnp.any(top5 == labels[:, None], axis=-1)


def train_step(state: ClassifierState, batch: dict, *, model, protocol: Protocol):
    """One step on a global batch {'images': (B, H, W, 3), 'labels': (B,)}."""
    trainable, frozen = split_params(state.params, protocol.trainable)

    def loss_fn(trainable):
        variables = {"params": merge_params(trainable, frozen), "batch_stats": state.batch_stats}
        if protocol.bn_train:
            logits, new_vars = model.apply(variables, batch["images"], train=True, mutable=["batch_stats"])
            batch_stats = new_vars["batch_stats"]
        else:
            logits, batch_stats = model.apply(variables, batch["images"], train=False), state.batch_stats
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return loss, (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    tx = make_optimizer(protocol, state.hparams, trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    top1, top5 = _topk_hits(logits, batch["labels"])
    metrics = {
        "loss": loss,
        "top1": top1.mean(),
        "top5": top5.mean(),
        "learning_rate": learning_rate_at(state.step, state.hparams),
        "grad_norm": optax.global_norm(grads),
        "update_norm": optax.global_norm(updates),
    }
    metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    new_state = state.replace(
        step=state.step + 1, params=merge_params(trainable, frozen), batch_stats=batch_stats, opt_state=opt_state
    )
    # A non-finite step leaves the state untouched, so nothing non-finite is ever checkpointed.
    new_state = jax.tree.map(lambda new, old: jnp.where(metrics["finite"], new, old), new_state, state)
    return new_state, metrics


def eval_step(params, batch_stats, batch: dict, *, model) -> dict[str, jax.Array]:
    """Sums over the real (mask 1) rows of a padded eval batch: top1, top5, loss, count."""
    logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["images"], train=False)
    top1, top5 = _topk_hits(logits, batch["labels"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    mask = batch["mask"]
    return {
        "top1": jnp.sum(top1 * mask),
        "top5": jnp.sum(top5 * mask),
        "loss": jnp.sum(loss * mask),
        "count": jnp.sum(mask),
    }


@functools.cache
def compiled_train_step(model, protocol: Protocol, mesh: jax.sharding.Mesh):
    replicated = parallel.replicated(mesh)
    return jax.jit(
        functools.partial(train_step, model=model, protocol=protocol),
        donate_argnums=0,
        out_shardings=(replicated, replicated),
    )


@functools.cache
def compiled_eval_step(model, mesh: jax.sharding.Mesh):
    return jax.jit(functools.partial(eval_step, model=model), out_shardings=parallel.replicated(mesh))


def evaluate(
    model, state: ClassifierState, config: ml_collections.ConfigDict, split: str, mesh: jax.sharding.Mesh
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) and mean loss on `split`, padding excluded (§7)."""
    step = compiled_eval_step(model, mesh)
    batches = pipeline.eval_iterator(
        config,
        split=split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        batch_size=config.eval.batch_size,
    )
    totals = {"top1": 0.0, "top5": 0.0, "loss": 0.0, "count": 0.0}
    for host in batches:
        sums = jax.device_get(step(state.params, state.batch_stats, parallel.global_batch(host, mesh)))
        for k in totals:
            totals[k] += float(sums[k])
    count = max(totals["count"], 1.0)
    return {
        "split": split,
        "top1": totals["top1"] / count,
        "top5": totals["top5"] / count,
        "loss": totals["loss"] / count,
        "num_examples": int(totals["count"]),
    }


def _summary(metrics: dict[str, float]) -> str:
    return f"loss {metrics['loss']:.4f} | train top-1 {100 * metrics['top1']:.1f}% | lr {metrics['learning_rate']:.4g}"


def train(
    *,
    config: ml_collections.ConfigDict,
    model,
    protocol: Protocol,
    variables: dict,
    hparams: dict,
    workdir: epath.Path,
    train_split: str,
    eval_split: str,
    mesh: jax.sharding.Mesh,
) -> tuple[dict[str, Any], ClassifierState]:
    """Trains (or resumes, from `workdir/checkpoints`) with the shared loop and evaluates on `eval_split`.

    `variables` is the starting network (pretrained + fresh head); it only matters on a fresh start.
    Returns (results, final state); results hold the final evaluation, the last training window and
    the periodic evaluations (`eval.every_steps`); every logged window goes to `train_history.json`.
    """
    total_steps = int(hparams["total_steps"])
    state = init_state(protocol, variables, hparams, mesh)
    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
    result = loop.train(
        loop.LoopSettings.from_config(
            config, protocol.kind, total_steps, eval_every_steps=config.eval.every_steps, scalar_prefix="train/"
        ),
        workdir=workdir,
        state=state,
        step_fn=compiled_train_step(model, protocol, mesh),
        batches=lambda start: pipeline.supervised_iterator(
            config,
            split=train_split,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            start_step=start,
        ),
        mesh=mesh,
        writer=writer,
        summary=_summary,
        # The schedule and weight decay follow the current config (total_steps / epochs may change on resume).
        on_restore=lambda restored: restored.replace(hparams=state.hparams),
        evaluate=lambda s: evaluate(model, s, config, eval_split, mesh),
        advice="Lower the learning rate (config.optim.base_lr).",
    )
    state = result.state
    results: dict[str, Any] = {
        "steps": int(state.step),
        "total_steps": total_steps,
        "hparams": {k: float(v) for k, v in jax.device_get(state.hparams).items()},
        "final_train_metrics": result.last_metrics,
        "periodic_eval": result.periodic_eval,
        "history_file": str(workdir / loop.HISTORY_FILE),
        "preempted": result.preempted,
    }
    if not result.preempted:
        results["eval"] = evaluate(model, state, config, eval_split, mesh)
        writer.write_scalars(int(state.step), {f"eval/{k}": v for k, v in results["eval"].items() if k != "split"})
        console.say(
            f"{protocol.kind}: {results['eval']['split']} top-1 {100 * results['eval']['top1']:.2f}% | top-5 "
            f"{100 * results['eval']['top5']:.2f}% ({results['eval']['num_examples']} images)"
        )
    writer.close()
    return results, state
