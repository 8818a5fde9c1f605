"""FNC pretraining: the train state, the jitted step over the device mesh, and the training loop.

The step is a pure function `(state, batch) -> (state, metrics)`: device-side augmentation (blur,
optionally colour), one forward pass of all V views of the global batch through the online network
(BatchNorm statistics over all views of all devices), the EMA network's forward pass and the memory
queue update (memory mode), the FNC objective under `shard_map` (candidates all-gathered across
devices, gradients flowing back through the gather), the online linear probe on stop-gradient
features, the optimiser update and the EMA update. The step's randomness is `fold_in(rng, step)`,
and the input stream is a function of (seed, step), so a resumed run continues the same stream.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from etils import epath
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from fnc_jax import checkpoints, config_base, configuration, optim, parallel
from fnc_jax.data import augment_jax, pipeline, sources
from fnc_jax.models import ContrastiveModel
from fnc_jax.objectives import FNConfig, fnc_loss, fnc_memory_loss, l2_normalize, update_memory

EMA_MODULES = ("encoder", "projection_head")
FN_METRICS = ("mean_num_fn", "fn_precision", "fn_recall")

# Peak dense bf16 FLOP/s per device, for MFU in the progress line (device_kind substring → peak).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v6 lite": 918e12,
}


class NonFiniteError(FloatingPointError):
    """Raised when the loss or the gradient stops being finite."""


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # None without memory
    ema_batch_stats: Any
    memory: Any  # (M*N, d) queue, None without memory
    memory_labels: Any  # (M*N,) labels of the queue rows, -1 = empty
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the train step (hashable: part of the jit cache key)."""

    fn: FNConfig
    temperature: float
    hidden_norm: bool
    low_memory: bool
    num_views: int
    use_memory: bool
    ema_decay: float
    augment: augment_jax.ViewAugment
    probe: bool

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, fn: FNConfig, probe: bool, num_devices: int
    ) -> StepSettings:
        return cls(
            fn=fn,
            temperature=float(config.loss.temperature),
            hidden_norm=bool(config.loss.hidden_norm),
            low_memory=bool(config.loss.low_memory),
            num_views=configuration.num_views(config),
            use_memory=config.memory.multiplier > 0,
            ema_decay=float(config.ema.decay),
            augment=augment_jax.ViewAugment.from_config(config, num_devices),
            probe=probe,
        )


def build_model(config: ml_collections.ConfigDict, num_classes: int = 0) -> ContrastiveModel:
    """The pretraining network; `num_classes > 0` adds the online probe."""
    return ContrastiveModel(**configuration.network_kwargs(config), num_classes=num_classes)


def parameter_init_key(seed: int) -> jax.Array:
    """Key for parameter initialisation: RBG (XLA's RngBitGenerator) compiles a ResNet's ~100
    initialisers about 10x faster than threefry on CPU (minutes → seconds)."""
    return jax.random.key(seed, impl="rbg")


def init_state(
    config: ml_collections.ConfigDict,
    model: ContrastiveModel,
    ema_model: ContrastiveModel,
    tx: optax.GradientTransformation,
) -> TrainState:
    """Initial state (call under jit with replicated out_shardings)."""
    init_key, ema_key = jax.random.split(parameter_init_key(config.seed))
    step_key = jax.random.PRNGKey(config.seed)  # threefry: the step's augmentation draws
    size = config.data.image_size
    dummy = jnp.zeros((2, size, size, 3), jnp.float32)
    variables = model.init(init_key, dummy, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    ema_params = ema_batch_stats = memory = memory_labels = None
    if config.memory.multiplier:
        if config.ema.init == "copy":
            ema_params = {k: params[k] for k in EMA_MODULES}
            ema_batch_stats = {k: batch_stats[k] for k in EMA_MODULES}
        else:  # the official implementation's independent random initialisation (spec bug #1)
            ema_vars = ema_model.init(ema_key, dummy, train=False)
            ema_params, ema_batch_stats = ema_vars["params"], ema_vars["batch_stats"]
        rows = config.memory.multiplier * config.batch_size
        memory = jnp.zeros((rows, config.model.proj_out_dim), jnp.float32)
        memory_labels = -jnp.ones((rows,), jnp.int32)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=ema_params,
        ema_batch_stats=ema_batch_stats,
        memory=memory,
        memory_labels=memory_labels,
        rng=step_key,
    )


def _contrastive_loss(
    s: StepSettings,
    mesh: jax.sharding.Mesh,
    projection: jax.Array,
    labels: jax.Array,
    ema_projection: jax.Array | None,
    memory: jax.Array | None,
    memory_labels: jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The FNC objective per device under shard_map; (B, V, d) global inputs, global scalar outputs."""
    common = dict(temperature=s.temperature, hidden_norm=s.hidden_norm, fn=s.fn, low_memory=s.low_memory)
    axis = parallel.DATA_AXIS

    def local(z, y, *extra):
        z = jnp.swapaxes(z, 0, 1)  # (V, B_local, d): the objective's layout
        if s.use_memory:
            e, q, ql = extra
            loss, aux = fnc_memory_loss(
                z, jnp.swapaxes(e, 0, 1), q, axis_name=axis, labels=y, memory_labels=ql, **common
            )
        else:
            loss, aux = fnc_loss(z, axis_name=axis, labels=y, **common)
        return loss, {k: aux[k] for k in FN_METRICS}

    args = (projection, labels)
    specs = (P(axis), P(axis))
    if s.use_memory:
        args += (ema_projection, memory, memory_labels)
        specs += (P(axis), P(), P())
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()))(*args)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: ContrastiveModel,
    ema_model: ContrastiveModel,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    settings: StepSettings,
    mesh: jax.sharding.Mesh,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One pretraining step on a global batch {'images': (B, V, H, W, 3), 'labels': (B,)}."""
    s = settings
    key = jax.random.fold_in(state.rng, state.step)
    images = augment_jax.augment_views(batch, key, s.augment)
    labels = batch["labels"]
    b, v = images.shape[:2]
    flat = images.reshape(b * v, *images.shape[2:])

    ema_projection = memory = memory_labels = None
    ema_batch_stats = state.ema_batch_stats
    if s.use_memory:
        ema_out, ema_vars = ema_model.apply(
            {"params": state.ema_params, "batch_stats": state.ema_batch_stats}, flat, train=True, mutable=["batch_stats"]
        )
        ema_batch_stats = ema_vars["batch_stats"]
        ema_projection = jax.lax.stop_gradient(l2_normalize(ema_out["projection"].reshape(b, v, -1)))
        # The queue gets this step's EMA features first, in global view-major order (method.md §7).
        memory = update_memory(state.memory, jnp.swapaxes(ema_projection, 0, 1).reshape(v * b, -1))
        memory_labels = update_memory(state.memory_labels, jnp.tile(labels, v))

    def loss_fn(params):
        out, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, flat, train=True, mutable=["batch_stats"]
        )
        projection = out["projection"].reshape(b, v, -1)
        contrastive, fn_metrics = _contrastive_loss(s, mesh, projection, labels, ema_projection, memory, memory_labels)
        metrics = {"contrastive_loss": contrastive, **fn_metrics}
        total = contrastive
        if s.probe:
            # The probe sees stop-gradient features of the two main views: it never shapes the encoder.
            logits = out["probe_logits"].reshape(b, v, -1)[:, :2].astype(jnp.float32)
            targets = jnp.broadcast_to(labels[:, None], (b, 2))
            probe_loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            metrics.update(probe_loss=probe_loss, probe_accuracy=jnp.mean(jnp.argmax(logits, -1) == targets))
            total = total + probe_loss
        metrics["loss"] = total
        return total, (metrics, new_vars["batch_stats"])

    (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if s.use_memory:
        d = s.ema_decay
        ema_params = jax.tree.map(
            lambda e, p: d * e + (1.0 - d) * p, state.ema_params, {k: params[k] for k in EMA_MODULES}
        )
    metrics.update(
        learning_rate=schedule(state.step),
        grad_norm=optax.global_norm(grads),
        param_norm=optax.global_norm(params),
        update_norm=optax.global_norm(updates),
    )
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    metrics["finite"] = finite
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema_params,
        ema_batch_stats=ema_batch_stats,
        memory=memory,
        memory_labels=memory_labels,
    )
    # A non-finite step leaves the state untouched, so nothing non-finite can ever be checkpointed.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, metrics


class PreemptionWatcher:
    """SIGTERM → save at the next step boundary and exit; multi-host runs agree on the step."""

    def __init__(self):
        self.requested = False
        self.multiprocess = jax.process_count() > 1
        if not self.multiprocess:  # multi-process: JAX's coordination service handles SIGTERM
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting.")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


class Progress:
    """The readable progress line: step, loss, images/s per device, steps/s, ETA, TFLOP/s, MFU."""

    def __init__(self, *, total_steps: int, batch_size: int, flops_per_step: float | None):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.flops = flops_per_step
        self.devices = jax.device_count()
        kind = jax.devices()[0].device_kind
        self.peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
        self.mark_step, self.mark_time = None, None
        self.paused = 0.0  # seconds of checkpointing/evaluation inside the current window

    def start(self, step: int) -> None:
        self.mark_step, self.mark_time, self.paused = step, time.time(), 0.0

    def report(self, step: int, loss: float) -> dict[str, float]:
        elapsed = max(time.time() - self.mark_time - self.paused, 1e-9)
        steps_per_s = (step - self.mark_step) / elapsed
        stats = {
            "steps_per_sec": steps_per_s,
            "images_per_sec_per_device": steps_per_s * self.batch_size / self.devices,
        }
        eta = (self.total_steps - step) / max(steps_per_s, 1e-9)
        line = (
            f"step {step}/{self.total_steps} | contrastive loss {loss:.4f} | {stats['images_per_sec_per_device']:.1f} img/s/device"
            f" | {steps_per_s:.2f} steps/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )
        if self.flops:
            tflops = self.flops * steps_per_s / 1e12
            stats["tflops_per_device"] = tflops
            line += f" | {tflops:.3g} TFLOP/s/device"
            if self.peak:
                stats["mfu"] = tflops * 1e12 / self.peak
                line += f" | MFU {100 * stats['mfu']:.1f}%"
        print(line, flush=True)
        self.start(step)
        return stats


def schedule_for(config: ml_collections.ConfigDict, num_train: int) -> tuple[optax.Schedule, int, int]:
    """(schedule, warmup_steps, total_steps) from the epochs, or total_steps when > 0."""
    total = config.total_steps or optim.total_steps_from_epochs(config.epochs, num_train, config.batch_size)
    warmup = optim.warmup_steps_from_epochs(config.optim.warmup_epochs, num_train, config.batch_size)
    warmup = min(warmup, total - 1)  # a run shorter than its warm-up still ends with a decay step
    schedule = optim.learning_rate_schedule(
        base_lr=config.optim.base_lr,
        batch_size=config.batch_size,
        scaling=config.optim.lr_scaling,
        warmup_steps=warmup,
        total_steps=total,
    )
    return schedule, warmup, total


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """The pretraining step and what it is built from, for one config and mesh."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: ContrastiveModel
    ema_model: ContrastiveModel
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    settings: StepSettings
    step_fn: Any  # jitted (state, global batch) -> (state, metrics)
    num_classes: int  # of the online probe; 0 without it

    @property
    def num_views(self) -> int:
        return self.settings.num_views

    def initial_state(self) -> TrainState:
        """The initial state (parameters from `config.seed`), replicated over the mesh."""
        init = functools.partial(init_state, self.config, self.model, self.ema_model, self.tx)
        return jax.jit(init, out_shardings=parallel.replicated(self.mesh))()


def build_step(
    config: ml_collections.ConfigDict,
    fn: FNConfig,
    mesh: jax.sharding.Mesh,
    *,
    num_classes: int,
    num_train: int,
    donate_state: bool = True,
) -> StepProgram:
    """Schedule, networks, optimiser and the jitted train step of a validated `config`.

    `num_classes > 0` (a labelled split) adds the online probe when `model.online_probe`. With
    `donate_state` the step reuses the state's buffers: the state passed in is consumed.
    """
    schedule, _, _ = schedule_for(config, num_train)
    probe = bool(config.model.online_probe) and num_classes > 0
    model = build_model(config, num_classes if probe else 0)
    ema_model = build_model(config, 0)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)), train=False))
    tx = optim.create_optimizer(
        name=config.optim.name,
        schedule=schedule,
        weight_decay=config.optim.weight_decay,
        momentum=config.optim.momentum,
        trust_coefficient=config.optim.trust_coefficient,
        params=abstract["params"],
        probe_lr_multiplier=config.optim.probe_lr_multiplier,
    )
    settings = StepSettings.from_config(config, fn, probe, mesh.size)
    replicated = parallel.replicated(mesh)
    step_fn = jax.jit(
        functools.partial(
            train_step, model=model, ema_model=ema_model, tx=tx, schedule=schedule, settings=settings, mesh=mesh
        ),
        donate_argnums=0 if donate_state else (),
        out_shardings=(replicated, replicated),
    )
    return StepProgram(config, mesh, model, ema_model, tx, schedule, settings, step_fn, num_classes if probe else 0)


def _mean_metrics(window: list[dict[str, np.ndarray]]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in window])) for k in window[0] if k != "finite"}


def pretrain(config: ml_collections.ConfigDict, workdir: str, *, start_over: bool = False) -> dict[str, Any]:
    """Runs (or resumes) pretraining in `workdir`; returns the final results (also in results.json)."""
    process_index, process_count = jax.process_index(), jax.process_count()
    fn = configuration.validate_pretrain(config, num_devices=jax.device_count(), num_processes=process_count)
    info = sources.get_source_info(config.data)
    num_train = info.num_examples[config.data.train_split]
    if config.augment.crop_on_device:
        configuration.canvas_size(config, info.image_shape)  # fails now rather than in the input pipeline
    if num_train < config.batch_size:
        raise ValueError(
            f"config.batch_size={config.batch_size} is invalid: the training split has only {num_train} images "
            f"(allowed: batch_size <= {num_train})."
        )
    workdir_path = epath.Path(workdir)
    if process_index == 0:
        defaults = config_base.pretrain_config().to_dict()
        checkpoints.record_config(workdir_path, config.to_dict(), start_over=start_over, defaults=defaults)
    parallel.barrier("fnc_jax_config_recorded")  # moving an old run aside can take minutes

    _, warmup, total_steps = schedule_for(config, num_train)
    mesh = parallel.create_mesh()
    program = build_step(config, fn, mesh, num_classes=info.num_classes, num_train=num_train)
    state = program.initial_state()
    store = checkpoints.Checkpoints(workdir_path / "checkpoints", keep=config.keep_checkpoints)
    if store.latest_step() is not None:
        state = store.restore(state)
        logging.info("Resumed from step %d of %s", int(state.step), workdir)
    start_step = int(state.step)
    step_fn = program.step_fn
    batches = parallel.device_prefetch(
        pipeline.pretrain_iterator(
            config, process_index=process_index, process_count=process_count, start_step=start_step
        ),
        mesh,
    )
    writer = metric_writers.create_default_writer(str(workdir_path), just_logging=process_index > 0)
    history_path = workdir_path / "train_history.json"
    history: list[dict[str, float]] = []
    if process_index == 0 and start_step > 0 and history_path.exists():
        # A resumed run keeps the history up to its checkpoint (steps after it are trained again).
        history = [h for h in json.loads(history_path.read_text())["history"] if h["step"] <= start_step]
    # A finished run started again (e.g. with new eval settings) reports its last logged window again.
    last_metrics: dict[str, float] = {k: v for k, v in history[-1].items() if k != "step"} if history else {}
    if start_step < total_steps:
        first = next(batches)
        t0 = time.time()
        compiled = step_fn.lower(state, first).compile()
        logging.info("Compiled the train step in %.1f s", time.time() - t0)
        flops = (compiled.cost_analysis() or {}).get("flops")
        progress = Progress(total_steps=total_steps, batch_size=config.batch_size, flops_per_step=flops)
        watcher = PreemptionWatcher()
        # Compile times differ between processes (e.g. JAX's persistent compilation cache is written by
        # process 0 only, so on a restart only process 0 hits it): enter the first step together.
        parallel.barrier("fnc_jax_first_step")
        window: list[dict[str, jax.Array]] = []
        progress.start(start_step)
        batch = first
        for step in range(start_step, total_steps):
            state, metrics = compiled(state, batch)
            window.append(metrics)
            done = step + 1
            save = done % config.checkpoint_every_steps == 0 or done == total_steps
            stop = watcher.should_stop(done)
            if done % config.log_every_steps == 0 or save or stop or done == total_steps:
                host = jax.device_get(window)
                window = []
                bad = [m for m in host if not m["finite"]]
                if bad:
                    store.wait()
                    raise NonFiniteError(
                        f"Non-finite loss or gradient at or before step {done} (loss {bad[0]['loss']}, grad norm "
                        f"{bad[0]['grad_norm']}); the state was not updated by that step and the last complete "
                        f"checkpoint (step {store.latest_step()}) is kept in {workdir}."
                    )
                last_metrics = _mean_metrics(host)
                speed = progress.report(done, last_metrics["contrastive_loss"])
                writer.write_scalars(done, {**last_metrics, **speed})
                history.append({"step": done, **last_metrics})
            if save or stop:
                t = time.time()
                store.save(done, state)
                progress.paused += time.time() - t
            if stop:
                logging.warning("Stopped for preemption at step %d; the run resumes from here.", done)
                break
            if done < total_steps:
                batch = next(batches)
    store.wait()
    writer.flush()
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "steps": int(state.step),
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "final_train_metrics": last_metrics,
        "preempted": int(state.step) < total_steps,
    }
    if config.eval.final_report and int(state.step) == total_steps:
        from fnc_jax.evaluation import representation  # noqa: PLC0415 (only needed at the end)

        results["quality"] = representation.quality_report(config, program.model, state, mesh, info)
        results["quality"]["fn_precision_last_window"] = last_metrics.get("fn_precision")
        results["quality"]["fn_recall_last_window"] = last_metrics.get("fn_recall")
        representation.print_report(results["quality"])
        writer.write_scalars(int(state.step), representation.flat_scalars(results["quality"]))
    if process_index == 0:
        checkpoints.write_json_atomic(workdir_path / "results.json", results)
        checkpoints.write_json_atomic(history_path, {"history": history})
    store.close()
    writer.close()
    return results
