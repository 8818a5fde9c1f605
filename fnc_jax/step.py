"""The pretraining step: its state, its static settings, its parts, and the one builder of the jitted step.

The step is a pure function `(state, batch) -> (state, metrics)` made of named parts, each callable on
its own (the benchmark times exactly these):

1. `augment`: the views of the batch on the device (`augment_jax.augment_views`, by the data path
   `settings.augment.path`: blur, and with `augment.on_device` colour and RandAugment, with
   `augment.crop_on_device` the crops too);
2. `ema_targets` (memory mode): the EMA network's forward pass of all views and the queue update;
3. `objective`, differentiated w.r.t. the online parameters: `encode` (one forward pass of all V views
   of the global batch, BatchNorm statistics over all views of all devices), `contrastive_loss` (the
   objective under `shard_map`, candidates all-gathered, gradients flowing back through the gather) and
   `probe_loss` (the online linear probe on stop-gradient features);
4. `apply_gradients`: the optimiser update and the EMA parameter update;
5. `keep_if_finite`: a non-finite step leaves the state untouched.

The step's randomness is `fold_in(rng, step)`, and the input stream is a function of (seed, step), so
a resumed run continues the same stream.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import PartitionSpec as P

from fnc_jax import configuration, optim, parallel
from fnc_jax.data import augment_jax
from fnc_jax.models import ContrastiveModel, factory
from fnc_jax.objectives import (
    FNConfig,
    FNSchedule,
    dcl_loss,
    fnc_loss,
    fnc_memory_loss,
    hcl_loss,
    l2_normalize,
    update_memory,
)

EMA_MODULES = ("encoder", "projection_head")
FN_METRICS = ("mean_num_fn", "fn_precision", "fn_recall")
SCHEDULE_METRICS = ("fn_topk", "fn_threshold")  # the selection in force, with a false-negative schedule


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

    loss: str  # the objective, `objectives.OBJECTIVES`
    fn: FNConfig
    fn_schedule: FNSchedule | None  # None: the fixed selection from step 0
    temperature: float
    tau_plus: float  # dcl, hcl
    beta: float  # hcl
    hidden_norm: bool
    low_memory: bool
    num_views: int
    use_memory: bool
    ema_decay: float
    augment: augment_jax.ViewAugment
    probe: bool

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, fn: FNConfig, probe: bool, num_devices: int, total_steps: int
    ) -> StepSettings:
        return cls(
            loss=config.loss.name,
            fn=fn,
            fn_schedule=configuration.fn_schedule(config, total_steps),
            temperature=float(config.loss.temperature),
            tau_plus=float(config.loss.tau_plus),
            beta=float(config.loss.beta),
            hidden_norm=bool(config.loss.hidden_norm),
            low_memory=bool(config.loss.low_memory),
            num_views=configuration.num_views(config),
            use_memory=config.memory.multiplier > 0,
            ema_decay=float(config.ema.decay),
            augment=augment_jax.ViewAugment.from_config(config, num_devices),
            probe=probe,
        )


def init_state(
    config: ml_collections.ConfigDict,
    model: ContrastiveModel,
    ema_model: ContrastiveModel,
    tx: optax.GradientTransformation,
) -> TrainState:
    """Initial state (call under jit with replicated out_shardings)."""
    init_key, ema_key = jax.random.split(factory.init_key(config.seed))
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
        else:  # the official implementation's independent random initialisation (recipe §9.1, bug 1)
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


# ----------------------------------------------------------------------------------------------
# The parts of the step.


def augment(batch: dict[str, jax.Array], key: jax.Array, settings: StepSettings) -> jax.Array:
    """(B, V, H, W, 3) float32 views of a global batch, augmented on the device as `settings.augment` says."""
    return augment_jax.augment_views(batch, key, settings.augment)


def encode(model: ContrastiveModel, params: Any, batch_stats: Any, images: jax.Array) -> tuple[dict, Any]:
    """Training-mode forward pass of all views `(B, V, H, W, 3)`: (outputs over B*V rows, new BN statistics)."""
    flat = images.reshape(-1, *images.shape[2:])
    out, new_vars = model.apply(
        {"params": params, "batch_stats": batch_stats}, flat, train=True, mutable=["batch_stats"]
    )
    return out, new_vars["batch_stats"]


class Targets(struct.PyTreeNode):
    """What memory mode's loss compares the online projections with (all None in-batch)."""

    ema_projection: Any  # (B, V, d) l2-normalised, stop-gradient
    memory: Any  # the queue with this step's EMA features first
    memory_labels: Any
    ema_batch_stats: Any


def ema_targets(
    ema_model: ContrastiveModel, state: TrainState, images: jax.Array, labels: jax.Array, settings: StepSettings
) -> Targets:
    """Memory mode: the EMA network's projections of all views and the updated queue (method §7)."""
    if not settings.use_memory:
        return Targets(None, state.memory, state.memory_labels, state.ema_batch_stats)
    b, v = images.shape[:2]
    out, ema_batch_stats = encode(ema_model, state.ema_params, state.ema_batch_stats, images)
    ema_projection = jax.lax.stop_gradient(l2_normalize(out["projection"].reshape(b, v, -1)))
    # The queue gets this step's EMA features first, in global view-major order.
    memory = update_memory(state.memory, jnp.swapaxes(ema_projection, 0, 1).reshape(v * b, -1))
    memory_labels = update_memory(state.memory_labels, jnp.tile(labels, v))
    return Targets(ema_projection, memory, memory_labels, ema_batch_stats)


def contrastive_loss(
    settings: StepSettings,
    mesh: jax.sharding.Mesh,
    projection: jax.Array,
    labels: jax.Array,
    targets: Targets,
    step: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective (`settings.loss`) per device under shard_map; (B, V, d) global inputs, global scalar outputs.

    `step` (traced) is where the false-negative schedule, if any, is evaluated."""
    s = settings
    common = dict(
        temperature=s.temperature, hidden_norm=s.hidden_norm, fn=s.fn, low_memory=s.low_memory, schedule=s.fn_schedule
    )
    axis = parallel.DATA_AXIS
    names = FN_METRICS + (SCHEDULE_METRICS if s.fn_schedule is not None else ())

    def local(z, y, step, *extra):
        kwargs = dict(common, step=step)
        z = jnp.swapaxes(z, 0, 1)  # (V, B_local, d): the objective's layout
        if s.use_memory:
            e, q, ql = extra
            loss, aux = fnc_memory_loss(
                z, jnp.swapaxes(e, 0, 1), q, axis_name=axis, labels=y, memory_labels=ql, **kwargs
            )
        elif s.loss == "dcl":
            loss, aux = dcl_loss(z, tau_plus=s.tau_plus, axis_name=axis, labels=y, **kwargs)
        elif s.loss == "hcl":
            loss, aux = hcl_loss(z, tau_plus=s.tau_plus, beta=s.beta, axis_name=axis, labels=y, **kwargs)
        else:
            loss, aux = fnc_loss(z, axis_name=axis, labels=y, **kwargs)
        return loss, {k: aux[k] for k in names}

    args = (projection, labels, step)
    specs = (P(axis), P(axis), P())
    if s.use_memory:
        args += (targets.ema_projection, targets.memory, targets.memory_labels)
        specs += (P(axis), P(), P())
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()))(*args)


def probe_loss(out: dict[str, jax.Array], labels: jax.Array, num_views: int) -> dict[str, jax.Array]:
    """Cross-entropy and accuracy of the online probe on the two main views (stop-gradient features:
    the probe never shapes the encoder)."""
    b = labels.shape[0]
    logits = out["probe_logits"].reshape(b, num_views, -1)[:, :2].astype(jnp.float32)
    targets = jnp.broadcast_to(labels[:, None], (b, 2))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return {"probe_loss": loss, "probe_accuracy": jnp.mean(jnp.argmax(logits, -1) == targets)}


def objective(
    params: Any,
    batch_stats: Any,
    images: jax.Array,
    labels: jax.Array,
    targets: Targets,
    step: jax.Array,
    *,
    model: ContrastiveModel,
    settings: StepSettings,
    mesh: jax.sharding.Mesh,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
    """The training loss of the online parameters: (total, (metrics, new BN statistics))."""
    out, new_batch_stats = encode(model, params, batch_stats, images)
    projection = out["projection"].reshape(*images.shape[:2], -1)
    contrastive, fn_metrics = contrastive_loss(settings, mesh, projection, labels, targets, step)
    metrics = {"contrastive_loss": contrastive, **fn_metrics}
    total = contrastive
    if settings.probe:
        metrics.update(probe_loss(out, labels, settings.num_views))
        total = total + metrics["probe_loss"]
    metrics["loss"] = total
    return total, (metrics, new_batch_stats)


def apply_gradients(
    state: TrainState, grads: Any, *, tx: optax.GradientTransformation, settings: StepSettings
) -> tuple[Any, Any, Any, Any]:
    """The optimiser update, then the EMA update of the momentum network: (params, opt_state, ema_params, updates)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if settings.use_memory:
        d = settings.ema_decay
        ema_params = jax.tree.map(
            lambda e, p: d * e + (1.0 - d) * p, state.ema_params, {k: params[k] for k in EMA_MODULES}
        )
    return params, opt_state, ema_params, updates


def keep_if_finite(finite: jax.Array, new: TrainState, old: TrainState) -> TrainState:
    """`new` when the step was finite, else `old`: nothing non-finite can ever be checkpointed."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


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
    """One pretraining step on a global batch {'images': ..., 'labels': (B,)} (see the module docstring)."""
    images = augment(batch, jax.random.fold_in(state.rng, state.step), settings)
    labels = batch["labels"]
    targets = ema_targets(ema_model, state, images, labels, settings)
    loss_fn = functools.partial(objective, model=model, settings=settings, mesh=mesh)
    (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, images, labels, targets, state.step
    )
    params, opt_state, ema_params, updates = apply_gradients(state, grads, tx=tx, settings=settings)
    metrics.update(
        learning_rate=schedule(state.step),
        grad_norm=optax.global_norm(grads),
        param_norm=optax.global_norm(params),
        update_norm=optax.global_norm(updates),
    )
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema_params,
        ema_batch_stats=targets.ema_batch_stats,
        memory=targets.memory,
        memory_labels=targets.memory_labels,
    )
    return keep_if_finite(metrics["finite"], new_state, state), metrics


# ----------------------------------------------------------------------------------------------
# The builder.


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
    init_fn: Any  # jitted () -> the initial state, replicated over the mesh
    num_classes: int  # of the online probe; 0 without it

    @property
    def num_views(self) -> int:
        return self.settings.num_views

    def initial_state(self) -> TrainState:
        """The initial state (parameters from `config.seed`), replicated over the mesh."""
        return self.init_fn()


def build_step(
    config: ml_collections.ConfigDict,
    fn: FNConfig,
    mesh: jax.sharding.Mesh,
    *,
    num_classes: int,
    num_train: int,
    schedule: optax.Schedule | None = None,
    donate_state: bool = True,
) -> StepProgram:
    """Schedule, networks, optimiser and the jitted train step of a validated `config`.

    `num_classes > 0` (a labelled split) adds the online probe when `model.online_probe`. `schedule`
    replaces the config's LR schedule (tests use a constant one). With `donate_state` the step reuses
    the state's buffers: the state passed in is consumed.
    """
    _, total_steps = optim.step_counts(config, num_train)
    if schedule is None:
        schedule, _, _ = optim.schedule_from_config(config, num_train)
    probe = bool(config.model.online_probe) and num_classes > 0
    model = factory.contrastive_model(config, num_classes if probe else 0)
    ema_model = factory.contrastive_model(config, 0)
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
    settings = StepSettings.from_config(config, fn, probe, mesh.size, total_steps)
    replicated = parallel.replicated(mesh)
    step_fn = jax.jit(
        functools.partial(
            train_step, model=model, ema_model=ema_model, tx=tx, schedule=schedule, settings=settings, mesh=mesh
        ),
        donate_argnums=0 if donate_state else (),
        out_shardings=(replicated, replicated),
    )
    init_fn = jax.jit(functools.partial(init_state, config, model, ema_model, tx), out_shardings=replicated)
    return StepProgram(
        config, mesh, model, ema_model, tx, schedule, settings, step_fn, init_fn, num_classes if probe else 0
    )
