"""Benchmark of the full pretraining step: throughput of four objectives side by side, each part's share,
and the cost of FN identification + the FNC loss relative to a ResNet-50 224 px step.

Usage (from the repository root):

    python -m benchmarks.step [--quick] [--devices 8] [--depth 18] [--width 0.25] [--image-size 32]
                              [--batch 32] [--views 6] [--memory-multiplier 16] [--repeats 5] [--output FILE]

Prints ONE JSON object to stdout (progress goes to stderr).

`variants`: images/s and views/s of `fnc_jax.step.train_step` (jitted exactly as `pretrain.run` jits it,
synthetic data already on the devices, compile and warm-up excluded, median of `--repeats` samples taken
round-robin over the variants so that the machine's load hits all of them alike) for

  (a) `fnc_memory`: FNC attraction with the memory queue + EMA encoder (the official default path),
  (b) `fnc_in_batch`: FNC attraction, in-batch candidates,
  (c) `baseline_multiview`: the same V views, fn.mode='none', no memory (multi-crop SimCLR),
  (d) `simclr_2view`: V = 2, fn.mode='none', no memory,

with the same model and global batch, and with `--objectives dcl,hcl` one more variant per objective,
`<name>_in_batch` (`loss.name=<name>` at `--tau-plus` / `--beta`, fn.mode='none', in-batch candidates, the
same V views). `ratios` compares them with the baseline. `calibration` is the machine's matmul rate
(`common.matmul_rate`) measured before and after, so that absolute figures from different days compare.

`breakdown`: each part's share of the step, from the step's own parts (`fnc_jax.step`: `augment`,
`encode`, `ema_targets`, `contrastive_loss`, `apply_gradients`, `keep_if_finite`) and a few finer
sub-measurements, jitted on the step's own shapes and shardings and timed round-robin like the step
(see `method` in the JSON): device augmentation, encoder
forward + backward, projection head forward + backward, gradient all-reduce, EMA forward, cross-device
gather, FN identification, loss (+ its gradient), optimiser + state update. The parts are timed in
isolation, so XLA's fusion across part boundaries and the step's scheduling are not in them: `residual`
is step time minus the sum of the parts; `shares` are normalised by the sum of the parts (they sum to 1);
`share_of_step` divides by the measured step time.

`official_estimate`: FN identification + FNC loss as a percentage of a ResNet-50 224 px step at the
official per-device shapes (8 devices, global batch 4096 → B_local = 512, V = 10, d = 128, memory
16 × 4096 = 65,536 rows), all measured on this machine:
  1. the loss + gradient (`fnc_memory_loss`, FNC attraction and mode 'none') and `false_negative_mask`
     alone, timed at exactly the per-device shapes (512 anchors × 10 views against 65,536 rows);
  2. the FLOPs of the full R50 224 px train step per device view from `cost_analysis()` of the compiled
     step (compile only; a small per-device batch, scaled linearly to 512 × 10 views);
  3. the FLOP/s this machine achieves on the R50 step, measured by running the same step at a reduced
     resolution (`--official-probe-size`, default 96 px: every feature map is exactly (96/224)² of the
     224 px one, so the mix of layers is the same; below 65 px the last stage would be 2x2 or 1x1, where
     XLA:CPU's 3x3 convolutions fall off a performance cliff);
  → R50 step time ≈ FLOPs(224 px, B_local = 512) / achieved FLOP/s, and the percentage = measured loss
  time / that. The same ratio is also given in FLOPs (analytic matmul FLOPs of the loss over the R50
  FLOPs), which is what an accelerator whose convolutions and matmuls run at similar efficiency sees.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from benchmarks import common

VARIANTS = ("fnc_memory", "fnc_in_batch", "baseline_multiview", "simclr_2view")
OFFICIAL = {"devices": 8, "global_batch": 4096, "local_batch": 512, "views": 10, "dim": 128, "memory_multiplier": 16}
PARTS = (
    "device_augment",
    "encoder_forward_backward",
    "projection_head_forward_backward",
    "gradient_all_reduce",
    "ema_forward",
    "cross_device_gather",
    "fn_identification",
    "loss",
    "optimizer_and_state_update",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (< ~1 min idle): for the tests")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (data-parallel mesh)")
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--width", type=float, default=0.25, help="ResNet width multiplier")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="global batch in images")
    p.add_argument("--views", type=int, default=6, help="V = 2 + support views for variants a-c")
    p.add_argument("--memory-multiplier", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--objectives",
        default="",
        help="comma-separated objectives of fnc_jax.objectives.OBJECTIVES other than fnc (dcl, hcl), each added as "
        "a '<name>_in_batch' variant",
    )
    p.add_argument("--tau-plus", type=float, default=0.1, help="loss.tau_plus of the dcl/hcl variants")
    p.add_argument("--beta", type=float, default=1.0, help="loss.beta of the hcl variant")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--no-official", action="store_true", help="skip the R50 / official-shape estimate")
    p.add_argument("--official-probe-size", type=int, default=96, help="resolution of the measured R50 run")
    p.add_argument("--official-repeats", type=int, default=2)
    p.add_argument("--output", help="also write the JSON here")
    common.add_cache_flags(p)
    args = p.parse_args(argv)
    args.objectives = tuple(o for o in args.objectives.split(",") if o)
    if args.quick:
        args.width, args.batch, args.views, args.repeats = 0.125, 16, 4, 2
        args.official_repeats = 1
    return args


def variant_names(args) -> tuple[str, ...]:
    return VARIANTS + tuple(f"{o}_in_batch" for o in args.objectives)


def variant_config(args, name: str):
    views = 2 if name == "simclr_2view" else args.views
    config = common.small_config(
        depth=args.depth,
        width=args.width,
        image_size=args.image_size,
        batch=args.batch,
        views=views,
        memory_multiplier=args.memory_multiplier if name == "fnc_memory" else 0,
        fn_mode="attraction" if name.startswith("fnc") else "none",
        dtype=args.dtype,
    )
    objective = name.removesuffix("_in_batch")
    if objective in args.objectives:
        config.loss.name, config.loss.tau_plus, config.loss.beta = objective, args.tau_plus, args.beta
    return config


def compile_all(jobs: dict[str, tuple[Any, tuple]]) -> tuple[dict[str, Any], dict[str, float]]:
    """Lowers every (jitted fn, args) job and compiles them in a thread pool (XLA releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    lowered, seconds = {}, {}
    for name, (fn, fargs) in jobs.items():
        t = time.perf_counter()
        lowered[name] = fn.lower(*fargs)
        seconds[name] = time.perf_counter() - t

    def compile_one(name):
        t = time.perf_counter()
        out = lowered[name].compile()
        return name, out, time.perf_counter() - t

    compiled = {}
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        for name, out, dt in pool.map(compile_one, list(jobs)):
            compiled[name] = out
            seconds[name] += dt
    return compiled, seconds


# ----------------------------------------------------------------------------------------------
# Sub-functions of the step, on the step's own shapes and shardings.


def part_functions(bundle, state, batch) -> tuple[dict[str, tuple[Any, tuple]], dict[str, str]]:
    """Jitted sub-functions of `train_step` and their arguments; returns (jobs, description per job)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fnc_jax import objectives, parallel, step
    from fnc_jax.models import ProjectionHead, factory, resnet_feature_dim

    s, mesh, model, cfg = bundle.settings, bundle.mesh, bundle.model, bundle.config
    state = jax.tree.map(lambda x: x.copy(), state)  # own buffers: the timed steps donate theirs
    axis = parallel.DATA_AXIS
    b, v = cfg.batch_size, bundle.num_views
    n_dev = mesh.size
    local_b = b // n_dev
    d = cfg.model.proj_out_dim
    sharded, replicated = parallel.batch_sharded(mesh), parallel.replicated(mesh)
    key = jax.random.PRNGKey(1)
    images = batch["images"]
    labels = batch["labels"]
    rng = jax.random.PRNGKey(2)
    projection = jax.device_put(objectives.l2_normalize(jax.random.normal(rng, (b, v, d))), sharded)

    jobs: dict[str, tuple[Any, tuple]] = {}
    desc: dict[str, str] = {}

    if s.augment.blur or s.augment.color_on_device:
        jobs["device_augment"] = (jax.jit(lambda bt, k: step.augment(bt, k, s), out_shardings=sharded), (batch, key))
        desc["device_augment"] = "step.augment: the device-side view augmentation of the (B, V, H, W, 3) batch"

    def forward(params, batch_stats, x):
        return step.encode(model, params, batch_stats, x)[0]

    def forward_backward(params, batch_stats, x, cot):
        def surrogate(p):
            out = forward(p, batch_stats, x)
            value = jnp.vdot(out["projection"], cot)
            if "probe_logits" in out:
                value = value + jnp.mean(out["probe_logits"])
            return value

        return jax.value_and_grad(surrogate)(params)

    cot = jax.device_put(jnp.ones((b * v, d), jnp.float32) / (b * v), sharded)
    jobs["online_forward_backward"] = (
        jax.jit(forward_backward, out_shardings=replicated),
        (state.params, state.batch_stats, images, cot),
    )
    desc["online_forward_backward"] = (
        "value_and_grad of <projection, cotangent> (+ probe) w.r.t. the replicated params: encoder + head "
        "forward and backward incl. XLA's gradient all-reduce"
    )

    head = ProjectionHead(
        hidden_dim=cfg.model.proj_hidden_dim or resnet_feature_dim(cfg.model.depth, cfg.model.width_multiplier),
        num_layers=cfg.model.proj_layers,
        out_dim=d,
        dtype=factory.compute_dtype(cfg),
    )
    feats = jax.jit(lambda p, bs, x: forward(p, bs, x)["features"], out_shardings=sharded)(
        state.params, state.batch_stats, images
    )

    def head_forward_backward(hp, hbs, x, cot):
        def surrogate(p):
            (out, _), _ = head.apply({"params": p, "batch_stats": hbs}, x, train=True, mutable=["batch_stats"])
            return jnp.vdot(out.astype(jnp.float32), cot)

        return jax.value_and_grad(surrogate)(hp)

    jobs["projection_head_forward_backward"] = (
        jax.jit(head_forward_backward, out_shardings=replicated),
        (state.params["projection_head"], state.batch_stats["projection_head"], feats, cot),
    )
    desc["projection_head_forward_backward"] = "the online projection head alone, forward + backward on the features"

    # Gradient all-reduce: each device holds a params-shaped partial gradient; psum over the data axis.
    stacked = jax.tree.map(
        lambda p: jax.device_put(jnp.broadcast_to(p, (n_dev, *p.shape)), parallel.batch_sharded(mesh)), state.params
    )
    allreduce = jax.shard_map(
        lambda g: jax.tree.map(lambda x: jax.lax.psum(x[0], axis), g), mesh=mesh, in_specs=P(axis), out_specs=P()
    )
    jobs["gradient_all_reduce"] = (jax.jit(allreduce), (stacked,))
    desc["gradient_all_reduce"] = "psum of a params-shaped float32 tree over the data axis (shard_map)"

    if s.use_memory:
        jobs["ema_targets"] = (
            jax.jit(lambda st, x, y: step.ema_targets(bundle.ema_model, st, x, y, s), out_shardings=replicated),
            (state, images, labels),
        )
        desc["ema_targets"] = (
            "step.ema_targets: EMA encoder + head forward (train-mode BN), l2 normalisation, queue update"
        )

        def queue_update(memory, memory_labels, ema, y):
            memory = objectives.update_memory(memory, jnp.swapaxes(ema, 0, 1).reshape(v * b, -1))
            return memory, objectives.update_memory(memory_labels, jnp.tile(y, v))

        jobs["cross_device_gather"] = (
            jax.jit(queue_update, out_shardings=replicated),
            (state.memory, state.memory_labels, projection, labels),
        )
        desc["cross_device_gather"] = (
            "memory mode: all-gather of this step's EMA features (and labels) into the replicated queue "
            "(update_memory on global arrays, the end of step.ema_targets)"
        )
    else:
        views_in_loss = v if s.fn.support_as_positives else 2
        r = jax.device_put(jax.random.normal(rng, (views_in_loss, b, d)), replicated)

        def gather_fwd_bwd(z, r):
            def local(z, r):
                g = jax.lax.all_gather(z[:views_in_loss], axis, axis=1, tiled=True)  # (V, N, d)
                return jnp.vdot(g, r)[None]

            f = jax.shard_map(local, mesh=mesh, in_specs=(P(None, axis), P()), out_specs=P(axis))
            return jax.value_and_grad(lambda z: jnp.sum(f(z, r)))(z)

        z_views = jax.device_put(jnp.swapaxes(projection, 0, 1), NamedSharding(mesh, P(None, axis)))
        jobs["cross_device_gather"] = (jax.jit(gather_fwd_bwd), (z_views, r))
        desc["cross_device_gather"] = (
            "in-batch: all_gather of the (V, B_local, d) projections over the data axis and its transpose "
            "(reduce-scatter) in the backward pass, under shard_map as in the loss"
        )

    targets = step.Targets(None, None, None, None)
    if s.use_memory:
        memory = objectives.update_memory(state.memory, jnp.swapaxes(projection, 0, 1).reshape(v * b, -1))
        targets = step.Targets(projection, jax.device_put(memory, replicated), state.memory_labels, None)

    def loss_and_grad(p, y, targets, at_step):
        return jax.value_and_grad(lambda p: step.contrastive_loss(s, mesh, p, y, targets, at_step)[0])(p)

    jobs["loss_and_grad"] = (jax.jit(loss_and_grad), (projection, labels, targets, state.step))
    desc["loss_and_grad"] = (
        "value_and_grad of step.contrastive_loss w.r.t. the (B, V, d) projections: candidate gather (in-batch), "
        "FN identification, loss and backward"
    )

    if s.fn.mode != "none":
        fn = s.fn

        if s.use_memory:
            queries = jnp.swapaxes(projection, 0, 1)
            candidates = targets.memory
            blocks_n = b
        else:
            views_in_loss = v if fn.support_as_positives else 2
            queries = jnp.swapaxes(projection, 0, 1)
            candidates = jax.device_put(queries[:views_in_loss].reshape(views_in_loss * b, d), replicated)
            blocks_n = b
        queries = jax.device_put(queries, NamedSharding(mesh, P(None, axis)))

        def mask(q, c):
            def local(q, c):
                offset = jax.lax.axis_index(axis) * local_b
                return objectives.false_negative_mask(
                    q, c, fn=fn, num_samples=blocks_n, sample_offset=offset, low_memory=s.low_memory
                )

            return jax.shard_map(local, mesh=mesh, in_specs=(P(None, axis), P()), out_specs=P(axis))(q, c)

        jobs["fn_identification"] = (jax.jit(mask), (queries, candidates))
        desc["fn_identification"] = (
            "objectives.false_negative_mask alone under shard_map on the loss's per-device shapes (scores, "
            "aggregation over views, top-k and threshold), candidates already gathered"
        )

    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)

    def tail(state, grads):
        # The step after value_and_grad: step.apply_gradients, the norms, step.keep_if_finite.
        params, opt_state, ema_params, updates = step.apply_gradients(state, grads, tx=bundle.tx, settings=s)
        norms = (optax.global_norm(grads), optax.global_norm(params), optax.global_norm(updates))
        finite = jnp.isfinite(norms[0])
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
        return step.keep_if_finite(finite, new, state), norms

    jobs["optimizer_and_state_update"] = (jax.jit(tail, out_shardings=replicated), (state, grads))
    desc["optimizer_and_state_update"] = (
        "tx.update + apply_updates + EMA parameter update + global norms + the finite-check select over the state"
    )
    return jobs, desc


def share_key(part: str, variant: str, bundle) -> str:
    """Variants whose sub-function of this part has the same shapes and settings share one job."""
    v, memory = bundle.num_views, bundle.settings.use_memory
    if part in ("device_augment", "online_forward_backward", "projection_head_forward_backward"):
        return f"V{v}"
    if part == "gradient_all_reduce":
        return "all"
    if part == "optimizer_and_state_update":
        return "memory" if memory else "no_memory"
    if part == "cross_device_gather" and not memory:
        return f"in_batch_V{v}"
    return variant


def derive_shares(step_s: float, t: dict[str, float], use_memory: bool) -> dict[str, Any]:
    """Exclusive part times from the sub-function medians (see `method`)."""
    gather = t.get("cross_device_gather", 0.0)
    raw = {
        "device_augment": t.get("device_augment", 0.0),
        "encoder_forward_backward": t["online_forward_backward"]
        - t["projection_head_forward_backward"]
        - t["gradient_all_reduce"],
        "projection_head_forward_backward": t["projection_head_forward_backward"],
        "gradient_all_reduce": t["gradient_all_reduce"],
        # memory mode: ema_targets holds the EMA forward pass and the queue update (the gather).
        "ema_forward": t.get("ema_targets", 0.0) - (gather if use_memory else 0.0),
        "cross_device_gather": gather,
        "fn_identification": t.get("fn_identification", 0.0),
        # loss_and_grad contains the mask and, in-batch, the candidate gather (memory mode: no gather in the loss).
        "loss": t["loss_and_grad"] - t.get("fn_identification", 0.0) - (0.0 if use_memory else gather),
        "optimizer_and_state_update": t["optimizer_and_state_update"],
    }
    clamped = [k for k, x in raw.items() if x < 0]
    parts = {k: max(x, 0.0) for k, x in raw.items()}
    total = sum(parts.values())
    return {
        "part_seconds": parts,
        "clamped_to_zero": clamped,
        "sum_of_parts_s": total,
        "step_s": step_s,
        "residual_s": step_s - total,
        "shares": {k: x / total for k, x in parts.items()},
        "share_of_step": {k: x / step_s for k, x in parts.items()},
    }


# ----------------------------------------------------------------------------------------------
# Official-shape estimate.


def official_estimate(args, mesh1, reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """FN identification + FNC loss vs an R50 224 px step at the official per-device shapes."""
    import jax
    import numpy as np

    from fnc_jax.objectives import FNConfig, false_negative_mask, fnc_memory_loss

    o = dict(OFFICIAL)
    depth, size, probe_size, probe_batch = 50, 224, args.official_probe_size, 1
    local_b, views, d = o["local_batch"], o["views"], o["dim"]
    rows = o["memory_multiplier"] * o["global_batch"]
    width = 1.0
    if args.quick:  # same code path, stand-in sizes small enough for a test
        depth, width, local_b, rows = 18, 0.25, 64, 4096
    out: dict[str, Any] = {
        "official_per_device": {**o, "memory_rows": o["memory_multiplier"] * o["global_batch"]},
        "measured": {
            "loss_local_batch": local_b,
            "views": views,
            "dim": d,
            "memory_rows": rows,
            "resnet_depth": depth,
            "resnet_width": width,
            "image_size": size,
            "probe_image_size": probe_size,
            "probe_local_batch": probe_batch,
            "dtype": args.dtype,
        },
    }

    # 1. Loss + gradient, and the mask alone, at the per-device shapes. With axis_name=None and a queue of
    #    `rows` = 128 x B_local rows, every anchor row is scored against exactly the 65,536 columns one device
    #    sees in the official run: the same work as one device's share (no cross-device traffic in memory
    #    mode's loss; the EMA-feature gather is part of the step).
    rng = np.random.default_rng(0)

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    centers = unit(rng.normal(size=(100, d)))
    z = unit(centers[rng.integers(0, 100, (views, local_b))] + 0.7 * unit(rng.normal(size=(views, local_b, d))))
    ema = unit(z + 0.05 * rng.normal(size=z.shape))
    older = unit(centers[rng.integers(0, 100, rows)] + 0.7 * unit(rng.normal(size=(rows, d))))
    memory = np.concatenate([ema.reshape(-1, d), older[: rows - views * local_b]])
    dev = jax.devices()[0]
    z, ema, memory = (jax.device_put(x, dev) for x in (z, ema, memory))

    def loss_grad(mode):
        fn = FNConfig(mode=mode)
        return jax.jit(jax.value_and_grad(lambda x, e, m: fnc_memory_loss(x, e, m, fn=fn)[0]))

    mask = jax.jit(lambda e, m: false_negative_mask(e, m, fn=FNConfig(), num_samples=local_b))
    loss_jobs = {
        "fnc_attraction_loss_and_grad": (loss_grad("attraction"), (z, ema, memory)),
        "baseline_loss_and_grad": (loss_grad("none"), (z, ema, memory)),
        "fn_identification_alone": (mask, (ema, memory)),
    }
    common.log(f"official: compiling the loss at B_local={local_b}, V={views}, rows={rows}")
    compiled, _ = compile_all(loss_jobs)
    fns = {k: (lambda c=compiled[k], a=loss_jobs[k][1]: c(*a)) for k in loss_jobs}
    times = common.time_interleaved(fns, repeats=args.official_repeats, warmup=1)
    loss_t = {k: common.summarize(v) for k, v in times.items()}
    per_pass = 2 * views * local_b * rows * d
    passes = {"fnc_attraction_loss_and_grad": 4, "baseline_loss_and_grad": 3, "fn_identification_alone": 1}
    for k, e in loss_t.items():
        e["matmul_passes"] = passes[k]
        e["matmul_flops"] = per_pass * passes[k]
        e["achieved_flops_per_s"] = e["matmul_flops"] / e["median_s"]
    out["loss"] = {
        "entries": loss_t,
        "note": "fnc_memory_loss, axis_name=None, low_memory=True (the default), FNConfig() defaults, one device. "
        f"Matmul passes of {per_pass:.3e} FLOPs (2·V·B_local·rows·d): FN scores 1, logits 1, logits recomputed "
        "in the rematerialised backward 1, gradient w.r.t. the anchors 1 (the queue carries none); the "
        "baseline (mode='none') has no FN-score pass.",
    }

    # 2. FLOPs of the ResNet step at 224 px (compile only); 3. achieved FLOP/s of the same step run at probe_size.
    if reuse is not None:
        # --quick: the stand-in "ResNet step" is the benchmark's own fnc_memory step (already compiled and
        # timed), so the test exercises this derivation without two more compiles.
        views_per_step = reuse["views_per_step_per_device"]
        flops_per_view = probe_flops_per_view = reuse["flops_per_step_per_device"] / views_per_step
        probe = reuse["step"]
        achieved = reuse["flops_per_step_per_device"] * reuse["devices"] / probe["median_s"]
        seconds, stats = {}, {"step_224px_compile_only": {"memory": None}}
        depth, size, probe_size = reuse["depth"], reuse["image_size"], reuse["image_size"]
        out["measured"].update(
            resnet_depth=depth,
            resnet_width=reuse["width"],
            image_size=size,
            probe_image_size=size,
            probe_local_batch=reuse["local_batch"],
            resnet_step_source="the fnc_memory variant's step of this run (--quick)",
        )
    else:
        jobs, probe_inputs = {}, None
        for tag, px in (("step_224px_compile_only", size), ("step_probe_run", probe_size)):
            cfg = common.small_config(
                depth=depth,
                width=width,
                image_size=px,
                batch=probe_batch * mesh1.size,
                views=views,
                memory_multiplier=o["memory_multiplier"],
                dtype=args.dtype,
            )
            cfg.augment.use_randaugment = False  # host-side only: irrelevant to the step
            bundle = common.build_step(cfg, mesh1, num_classes=1000)
            if tag == "step_224px_compile_only":
                jobs[tag] = (bundle.step_fn, (common.abstract_state(bundle), common.abstract_batch(cfg, mesh1)))
            else:
                probe_inputs = {
                    "state": bundle.initial_state(),
                    "batch": common.random_batch(cfg, mesh1, num_classes=1000),
                }
                jobs[tag] = (bundle.step_fn, (probe_inputs["state"], probe_inputs["batch"]))
        common.log(f"official: compiling the ResNet-{depth} step at {size} px (FLOPs only) and {probe_size} px (run)")
        compiled, seconds = compile_all(jobs)
        stats = {k: common.compile_stats(c) for k, c in compiled.items()}
        views_per_step = probe_batch * views
        flops_per_view = stats["step_224px_compile_only"]["flops"] / views_per_step
        probe_flops_per_view = stats["step_probe_run"]["flops"] / views_per_step
        run = compiled["step_probe_run"]

        def probe_step():
            probe_inputs["state"], metrics = run(probe_inputs["state"], probe_inputs["batch"])
            return metrics

        probe = common.summarize(
            common.time_interleaved({"probe": probe_step}, repeats=max(2, args.official_repeats), warmup=1)["probe"]
        )
        achieved = stats["step_probe_run"]["flops"] / probe["median_s"]
    step_flops = flops_per_view * local_b * views  # one device's step at the (measured) per-device batch
    step_time = step_flops / achieved
    fnc, base, msk = (
        loss_t[k] for k in ("fnc_attraction_loss_and_grad", "baseline_loss_and_grad", "fn_identification_alone")
    )
    out["resnet_step"] = {
        "compile_s": {k: round(v, 2) for k, v in seconds.items()},
        "flops_per_view": flops_per_view,
        "probe_flops_per_view": probe_flops_per_view,
        "flops_ratio_over_probe": flops_per_view / probe_flops_per_view,
        "expected_ratio_if_all_layers_scale": (size / probe_size) ** 2,
        "step_flops_per_device": step_flops,
        "probe_step": probe,
        "achieved_flops_per_s": achieved,
        "estimated_step_s_per_device": step_time,
        "memory_analysis_small_batch": stats["step_224px_compile_only"].get("memory"),
    }
    out["percent_of_resnet_step"] = {
        "fn_identification_plus_fnc_loss_time": 100 * fnc["median_s"] / step_time,
        "fn_identification_alone_time": 100 * msk["median_s"] / step_time,
        "fnc_loss_minus_baseline_loss_time": 100 * (fnc["median_s"] - base["median_s"]) / step_time,
        "fn_identification_plus_fnc_loss_flops": 100 * fnc["matmul_flops"] / step_flops,
        "target_percent": 3.0,
    }
    out["derivation"] = (
        f"time% = t(value_and_grad of fnc_memory_loss at B_local={local_b}, V={views}, {rows} queue rows; measured "
        f"here) / t_step, where t_step = FLOPs of the ResNet-{depth} {size} px train step per device at "
        f"B_local={local_b} (cost_analysis() of the step compiled at B_local={probe_batch}, scaled linearly by "
        f"{local_b * views}/{views_per_step} views; compile only) / the FLOP/s this machine achieves on the same "
        f"step at {probe_size} px (its cost_analysis FLOPs over its measured median step time). flops% = the "
        "loss's analytic matmul FLOPs / the step FLOPs. The step holds the online forward+backward, the EMA "
        "forward, the blur, the loss, the optimiser; cost_analysis counts a while loop's body once, so the "
        "step's own scanned loss is under-counted in it (<1% of the step)."
    )
    return out


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    common.set_device_count(max(args.devices, 1))
    import jax

    cache_dir = common.enable_compile_cache(args)
    from fnc_jax.objectives import OBJECTIVES  # imports jax: after the device count is set

    extra = [o for o in OBJECTIVES if o != "fnc"]
    for name in args.objectives:
        if name not in extra:
            print(f"--objectives={name!r} is invalid: allowed are {', '.join(extra)}", file=sys.stderr)
            raise SystemExit(2)

    from fnc_jax import parallel

    t_start = time.time()
    mesh = parallel.create_mesh(jax.devices()[: args.devices])
    common.log(
        f"step benchmark on {args.devices} devices: depth {args.depth} x{args.width}, {args.image_size}px, "
        f"batch {args.batch}, V={args.views}, memory x{args.memory_multiplier}"
    )

    calibration_before = common.matmul_rate()
    names = variant_names(args)
    bundles, states, batches, configs = {}, {}, {}, {}
    for name in names:
        cfg = variant_config(args, name)
        configs[name] = cfg
        bundles[name] = common.build_step(cfg, mesh, num_classes=10)
        batches[name] = common.random_batch(cfg, mesh, num_classes=10, seed=0)
    # The state does not depend on V or fn.mode: one initialisation with the queue, one without (copied).
    states["fnc_memory"] = bundles["fnc_memory"].initial_state()
    no_memory = bundles["fnc_in_batch"].initial_state()
    for name in names[1:]:
        states[name] = jax.tree.map(lambda x: x.copy(), no_memory)

    common.log(f"compiling the {len(names)} train steps")
    step_jobs = {n: (bundles[n].step_fn, (states[n], batches[n])) for n in names}
    compiled, compile_s = compile_all(step_jobs)

    def stepper(name):
        def call():
            states[name], metrics = compiled[name](states[name], batches[name])
            return metrics

        return call

    common.log("timing the steps (round-robin)")
    cpu_times: dict[str, list[float]] = {}
    times = common.time_interleaved(
        {n: stepper(n) for n in names}, repeats=args.repeats, warmup=1 if args.quick else 2, cpu_times=cpu_times
    )
    variants: dict[str, Any] = {}
    for n in names:
        cfg = configs[n]
        v = 2 + cfg.views.support_size
        t = common.summarize(times[n])
        st = common.compile_stats(compiled[n])
        med = t["median_s"]
        cpu = common.summarize(cpu_times[n])["median_s"]
        variants[n] = {
            "objective": cfg.loss.name,
            "fn_mode": cfg.fn.mode,
            "memory_multiplier": cfg.memory.multiplier,
            "ema": cfg.memory.multiplier > 0,
            "views": v,
            "global_batch": cfg.batch_size,
            "local_batch": cfg.batch_size // args.devices,
            "step": t,
            "images_per_s": cfg.batch_size / med,
            "views_per_s": cfg.batch_size * v / med,
            "images_per_s_per_device": cfg.batch_size / med / args.devices,
            "step_cpu_s": cpu,
            "images_per_cpu_s": cfg.batch_size / cpu,
            "compile_s": round(compile_s[n], 2),
            "flops_per_step_per_device": st.get("flops"),
            "achieved_flops_per_s_all_devices": (st["flops"] * args.devices / med) if st.get("flops") else None,
            "last_loss": float(jax.device_get(stepper(n)()["loss"])),
        }
    base = variants["baseline_multiview"]["step"]["median_s"]
    simclr = variants["simclr_2view"]["step"]["median_s"]
    ratios = {
        "step_time_fnc_memory_over_baseline": variants["fnc_memory"]["step"]["median_s"] / base,
        "step_time_fnc_in_batch_over_baseline": variants["fnc_in_batch"]["step"]["median_s"] / base,
        "step_time_baseline_over_simclr": base / simclr,
        "step_time_fnc_memory_over_simclr": variants["fnc_memory"]["step"]["median_s"] / simclr,
        "views_per_s_fnc_in_batch_over_baseline": variants["fnc_in_batch"]["views_per_s"]
        / variants["baseline_multiview"]["views_per_s"],
        **{
            f"step_time_{o}_in_batch_over_baseline": variants[f"{o}_in_batch"]["step"]["median_s"] / base
            for o in args.objectives
        },
    }
    # The same ratios in process CPU time (all threads), less sensitive to other processes on the cores.
    cpu = {n: variants[n]["step_cpu_s"] for n in names}
    ratios_cpu = {
        "step_cpu_fnc_memory_over_baseline": cpu["fnc_memory"] / cpu["baseline_multiview"],
        "step_cpu_fnc_in_batch_over_baseline": cpu["fnc_in_batch"] / cpu["baseline_multiview"],
        "step_cpu_baseline_over_simclr": cpu["baseline_multiview"] / cpu["simclr_2view"],
        "step_cpu_fnc_memory_over_simclr": cpu["fnc_memory"] / cpu["simclr_2view"],
        **{
            f"step_cpu_{o}_in_batch_over_baseline": cpu[f"{o}_in_batch"] / cpu["baseline_multiview"]
            for o in args.objectives
        },
    }

    breakdown: dict[str, Any] = {}
    if not args.no_breakdown:
        # Parts with identical shapes and settings are compiled and timed once and shared by the variants.
        jobs, descriptions, owner = {}, {}, {}
        for n in names:
            vjobs, vdesc = part_functions(bundles[n], states[n], batches[n])
            for k, job in vjobs.items():
                job_name = f"{share_key(k, n, bundles[n])}/{k}"
                owner.setdefault(n, {})[k] = job_name
                if job_name not in jobs:
                    jobs[job_name] = job
                    descriptions[k] = vdesc[k]
        common.log(f"compiling {len(jobs)} sub-functions")
        part_compiled, part_compile_s = compile_all(jobs)
        fns = {name: (lambda c=part_compiled[name], a=jobs[name][1]: c(*a)) for name in jobs}
        # The steps are timed again in the same rounds, so part and step times share the machine's load.
        for n in names:
            fns[f"{n}/step"] = stepper(n)
        common.log(f"timing {len(fns)} functions (round-robin)")
        part_cpu: dict[str, list[float]] = {}
        part_times = common.time_interleaved(fns, repeats=args.repeats, warmup=1, min_time=0.0, cpu_times=part_cpu)
        medians = {k: common.summarize(v)["median_s"] for k, v in part_times.items()}
        cpu_medians = {k: common.summarize(v)["median_s"] for k, v in part_cpu.items()}
        for n in names:
            t = {k: medians[job] for k, job in owner[n].items()}
            entry = derive_shares(medians[f"{n}/step"], t, bundles[n].settings.use_memory)
            entry["sub_function_median_s"] = t
            tc = {k: cpu_medians[job] for k, job in owner[n].items()}
            by_cpu = derive_shares(cpu_medians[f"{n}/step"], tc, bundles[n].settings.use_memory)
            entry["cpu_time"] = {
                "shares": by_cpu["shares"],
                "share_of_step": by_cpu["share_of_step"],
                "step_cpu_s": by_cpu["step_s"],
                "sub_function_median_cpu_s": tc,
            }
            breakdown[n] = entry
        breakdown["descriptions"] = descriptions
        breakdown["compile_s"] = {k: round(v, 2) for k, v in part_compile_s.items()}
        breakdown["method"] = (
            "Each sub-function is jitted on the step's own shapes and shardings and timed round-robin with the "
            "steps (median of the repeats). Exclusive parts: encoder = online forward+backward - head "
            "forward+backward - gradient all-reduce; loss = loss_and_grad - FN identification - (in-batch) the "
            "candidate gather; EMA forward, gather, augmentation and optimiser as timed. Negative derived parts "
            "are clamped to 0 (listed). shares = part / sum of parts (sum to 1); share_of_step = part / the "
            "step time measured in the same rounds; residual = step - sum of parts (fusion across parts, "
            "the step's scheduling, metrics). cpu_time: the same derivation from process CPU seconds (all "
            "threads), which other processes sharing the cores inflate less than wall time."
        )

    result: dict[str, Any] = {
        "benchmark": "step",
        "quick": args.quick,
        "machine": common.machine(),
        "units": {"time": "seconds", "throughput": "images/s and views/s (whole machine)", "flops": "FLOPs"},
        "shapes": {
            "devices": args.devices,
            "depth": args.depth,
            "width_multiplier": args.width,
            "image_size": args.image_size,
            "global_batch": args.batch,
            "views": args.views,
            "memory_multiplier": args.memory_multiplier,
            "dtype": args.dtype,
            "proj_out_dim": 128,
            "objectives": ["fnc", *args.objectives],
            "tau_plus": args.tau_plus,
            "beta": args.beta,
        },
        "command": "python -m benchmarks.step " + " ".join(sys.argv[1:] if argv is None else argv),
        "compile_cache_dir": cache_dir,
        "variants": variants,
        "ratios": ratios,
        "ratios_cpu_time": ratios_cpu,
        "breakdown": breakdown or {"skipped": "--no-breakdown"},
    }
    if args.no_official:
        result["official_estimate"] = {"skipped": "--no-official"}
    else:
        reuse = None
        if args.quick:
            a = variants["fnc_memory"]
            reuse = {
                "flops_per_step_per_device": a["flops_per_step_per_device"],
                "step": a["step"],
                "views_per_step_per_device": a["local_batch"] * a["views"],
                "devices": args.devices,
                "depth": args.depth,
                "width": args.width,
                "image_size": args.image_size,
                "local_batch": a["local_batch"],
            }
        result["official_estimate"] = official_estimate(args, parallel.create_mesh(jax.devices()[:1]), reuse)
    result["calibration"] = {"before": calibration_before, "after": common.matmul_rate()}
    result["wall_s"] = round(time.time() - t_start, 1)
    return result


if __name__ == "__main__":
    res = main()
    out = None
    if "--output" in sys.argv:
        out = sys.argv[sys.argv.index("--output") + 1]
    common.emit(res, out)
