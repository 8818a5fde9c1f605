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
import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from etils import epath
from flax import struct, traverse_util

from fnc_jax import checkpoints, optim, parallel
from fnc_jax.data import pipeline

KINDS = ("linear_eval", "finetune")
HISTORY_FILE = "train_history.json"


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
        raise ValueError(f"kind={kind!r} is invalid: allowed values are {', '.join(KINDS)}.")
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
    """`optim.learning_rate_schedule` with traced peak / warm-up / total (same formula)."""
    step = jnp.asarray(step, jnp.float32)
    peak, warmup, total = hparams["learning_rate"], hparams["warmup_steps"], hparams["total_steps"]
    warm = peak * step / jnp.maximum(warmup, 1.0)
    decay = jnp.maximum(total - warmup, 1.0)
    cosine = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(step - warmup, decay) / decay))
    return jnp.where(step < warmup, warm, cosine)


def make_hparams(*, learning_rate: float, weight_decay: float, warmup_steps: int, total_steps: int) -> dict:
    values = dict(
        learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps, total_steps=total_steps
    )
    return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}


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
    return {"top1": jnp.sum(top1 * mask), "top5": jnp.sum(top5 * mask), "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}


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
        config, split=split, process_index=jax.process_index(), process_count=jax.process_count(),
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


def num_steps(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
    """(warmup_steps, total_steps) from the epochs (official rules) or `total_steps` when > 0."""
    total = config.total_steps or int(optim.total_steps_from_epochs(config.epochs, num_train, config.batch_size))
    warmup = min(optim.warmup_steps_from_epochs(config.optim.warmup_epochs, num_train, config.batch_size), total - 1)
    return warmup, total


def peak_learning_rate(config: ml_collections.ConfigDict, base_lr: float) -> float:
    """base·√B (`sqrt`), base·B/256 (`linear`) or base (`none`), as `optim.learning_rate_schedule`."""
    scaling, batch = config.optim.lr_scaling, config.batch_size
    return base_lr * (np.sqrt(batch) if scaling == "sqrt" else batch / 256.0 if scaling == "linear" else 1.0)


class Progress:
    """The progress line: step, loss, train top-1, LR, images/s per device, steps/s, ETA."""

    def __init__(self, what: str, *, total_steps: int, batch_size: int):
        self.what, self.total_steps, self.batch_size = what, total_steps, batch_size
        self.devices = jax.device_count()
        self.mark_step, self.mark_time, self.paused = 0, time.time(), 0.0

    def start(self, step: int) -> None:
        self.mark_step, self.mark_time, self.paused = step, time.time(), 0.0

    def report(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        elapsed = max(time.time() - self.mark_time - self.paused, 1e-9)
        steps_per_s = (step - self.mark_step) / elapsed
        stats = {"steps_per_sec": steps_per_s, "images_per_sec_per_device": steps_per_s * self.batch_size / self.devices}
        eta = (self.total_steps - step) / max(steps_per_s, 1e-9)
        line = (
            f"{self.what} step {step}/{self.total_steps} | loss {metrics['loss']:.4f} | train top-1 "
            f"{100 * metrics['top1']:.1f}% | lr {metrics['learning_rate']:.4g} | "
            f"{stats['images_per_sec_per_device']:.1f} img/s/device | {steps_per_s:.2f} steps/s | "
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )
        logging.info(line)
        if jax.process_index() == 0:
            print(line, flush=True)
        self.start(step)
        return stats


def _mean(window: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in window])) for k in window[0] if k != "finite"}


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
    """Trains (or resumes, from `workdir/checkpoints`) and evaluates on `eval_split`.

    `variables` is the starting network (pretrained + fresh head); it only matters on a fresh start.
    Returns (results, final state); results hold the final evaluation, the last training window and
    the periodic evaluations (`eval.every_steps`); every logged window goes to `train_history.json`.
    """
    from fnc_jax.train import NonFiniteError, PreemptionWatcher  # noqa: PLC0415

    process_index = jax.process_index()
    total_steps = int(hparams["total_steps"])
    state = init_state(protocol, variables, hparams, mesh)
    store = checkpoints.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    if store.latest_step() is not None:
        # The schedule and weight decay follow the current config (total_steps / epochs may change on resume).
        state = store.restore(state).replace(hparams=state.hparams)
        logging.info("Resumed %s from step %d in %s", protocol.kind, int(state.step), workdir)
    start_step = int(state.step)
    writer = metric_writers.create_default_writer(str(workdir), just_logging=process_index > 0)
    step_fn = compiled_train_step(model, protocol, mesh)
    # The logged training windows: kept up to the checkpoint on resume, written next to it.
    history_path = workdir / HISTORY_FILE
    history: list[dict] = []
    if start_step and history_path.exists():
        history = [h for h in json.loads(history_path.read_text())["history"] if h["step"] <= start_step]
    periodic: list[dict] = [h["eval"] for h in history if "eval" in h]
    last: dict[str, float] = {k: v for k, v in history[-1].items() if k not in ("step", "eval")} if history else {}

    def write_history():
        if process_index == 0:
            checkpoints.write_json_atomic(history_path, {"history": history})

    if start_step < total_steps:
        batches = parallel.device_prefetch(
            pipeline.supervised_iterator(
                config, split=train_split, process_index=process_index, process_count=jax.process_count(),
                start_step=start_step,
            ),
            mesh,
        )
        progress = Progress(protocol.kind, total_steps=total_steps, batch_size=config.batch_size)
        watcher = PreemptionWatcher()
        window: list = []
        progress.start(start_step)
        for step in range(start_step, total_steps):
            state, metrics = step_fn(state, next(batches))
            window.append(metrics)
            done = step + 1
            save = done % config.checkpoint_every_steps == 0 or done == total_steps
            stop = watcher.should_stop(done)
            periodic_eval = config.eval.every_steps and done % config.eval.every_steps == 0 and done < total_steps
            if done % config.log_every_steps == 0 or save or stop or periodic_eval or done == total_steps:
                host = jax.device_get(window)
                window = []
                bad = [m for m in host if not m["finite"]]
                if bad:
                    store.wait()
                    raise NonFiniteError(
                        f"Non-finite loss or gradient at or before step {done} of {protocol.kind} (loss "
                        f"{bad[0]['loss']}); the last complete checkpoint (step {store.latest_step()}) is kept in "
                        f"{workdir}. Lower the learning rate (config.optim.base_lr)."
                    )
                last = _mean(host)
                speed = progress.report(done, last)
                writer.write_scalars(done, {f"train/{k}": v for k, v in last.items()} | speed)
                history.append({"step": done, **last})
            if periodic_eval:
                t = time.time()
                scores = evaluate(model, state, config, eval_split, mesh)
                writer.write_scalars(done, {f"eval/{k}": v for k, v in scores.items() if k != "split"})
                history[-1]["eval"] = {"step": done, **scores}
                periodic.append(history[-1]["eval"])
                progress.paused += time.time() - t
            if save or stop:
                t = time.time()
                store.save(done, state)
                write_history()
                progress.paused += time.time() - t
            if stop:
                logging.warning("Stopped for preemption at step %d; the run resumes from here.", done)
                break
    store.wait()
    results: dict[str, Any] = {
        "steps": int(state.step),
        "total_steps": total_steps,
        "hparams": {k: float(v) for k, v in jax.device_get(state.hparams).items()},
        "final_train_metrics": last,
        "periodic_eval": periodic,
        "history_file": str(history_path),
        "preempted": int(state.step) < total_steps,
    }
    if not results["preempted"]:
        results["eval"] = evaluate(model, state, config, eval_split, mesh)
        writer.write_scalars(int(state.step), {f"eval/{k}": v for k, v in results["eval"].items() if k != "split"})
        line = (
            f"{protocol.kind}: {results['eval']['split']} top-1 {100 * results['eval']['top1']:.2f}% | top-5 "
            f"{100 * results['eval']['top5']:.2f}% ({results['eval']['num_examples']} images)"
        )
        logging.info(line)
        if process_index == 0:
            print(line, flush=True)
    writer.flush()
    writer.close()
    store.close()
    return results, state
