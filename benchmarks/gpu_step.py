"""Single-accelerator throughput of the official FNC step: ResNet-50, 224 px, V = 10, memory 16x, bf16.

Usage (from the repository root):

    python -m benchmarks.gpu_step [--batches 256,192,128,96,64,32] [--steps 20] [--time-budget 420]
                                  [--dtype bfloat16] [--quick] [--output FILE]

Prints ONE JSON object to stdout (progress goes to stderr). Meant for one NVIDIA GPU (it also runs on a TPU
chip), within 8 minutes including compiles and warm-up:

1. Finds the largest per-device batch (images; each gives V views) that fits: it compiles the smallest
   candidate first, reads its `memory_analysis()`, extrapolates the per-image activation memory linearly to
   pick the largest candidate predicted to fit in the device's memory (`memory_stats()['bytes_limit']`),
   then compiles and runs that one, stepping down the list on a predicted or real out-of-memory error.
2. Times `--steps` steps after 2 warm-up steps (synthetic views already on the device: the step alone,
   not the input pipeline; with `--augment-on-device`, canvases and crops that the step cuts and
   augments), and prints images/s, views/s, the step's FLOPs from XLA's `cost_analysis()`, the achieved
   TFLOP/s and the MFU against the chip's dense bf16 peak (`fnc_jax.loop.PEAK_FLOPS`).

On a machine without an accelerator (platform detected by JAX) it runs a tiny model instead (ResNet-18 at
1/8 width, 32 px, V = 4, memory 8x) with the same code path, so a CPU test keeps the script working.

The step is `train.train_step` built from `configs/imagenet.py` as `train.pretrain` builds it, with
`config.dtype` (default bfloat16: convolutions and matmuls in bf16; parameters, optimiser state, BatchNorm
statistics and the loss in float32). `cost_analysis` counts a while loop's body once, so the step's
rematerialised view-by-view loss scan is under-counted (about 0.3% of the step FLOPs at the official shapes).

3. Prices `augment.crop_on_device` on the same device: `augment_jax.crop_resize_views` cutting the chosen
   batch's views from 512 px canvases (tiny: 48 px), in ms per view and as a share of the step; and the
   device colour ops (`augment.on_device`) without and with RandAugment(2, 7) on the same views.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

from benchmarks import common

GPU_BATCHES = (256, 192, 128, 96, 64, 32, 16)
CPU_BATCHES = (16, 8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", help="comma-separated per-device batch candidates (images)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 accelerator, 3 CPU)")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds after which no new batch is tried")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--config", default="configs/imagenet.py")
    p.add_argument("--quick", action="store_true", help="fewer steps (the CPU path is tiny anyway)")
    p.add_argument("--force-tiny", action="store_true", help="the tiny model even on an accelerator")
    p.add_argument(
        "--augment-on-device",
        action="store_true",
        help="the official recipe at full speed: augment.on_device and crop_on_device (512 px canvases, tiny: "
        "48), so the step also cuts the views and runs colour, RandAugment, grayscale and blur",
    )
    p.add_argument(
        "--assume-bytes-limit",
        type=int,
        help="pretend the device has this much memory (tests the batch search on a CPU, which reports no limit)",
    )
    p.add_argument("--output", help="also write the JSON here")
    common.add_cache_flags(p)
    return p.parse_args(argv)


def time_crop_resize(batch: int, views: int, size: int, canvas: int, repeats: int) -> dict[str, Any]:
    """Device time of `augment_jax.crop_resize_views` for `batch` canvases of side `canvas` with `views`
    crops each (`layout.random_canvases`), as `augment.crop_on_device` adds it to the step."""
    import jax

    from fnc_jax.data import augment_jax, layout

    canvases, crops = jax.device_put(layout.random_canvases(batch, views, canvas))
    cut = jax.jit(augment_jax.crop_resize_views, static_argnums=2)
    compiled = cut.lower(canvases, crops, size).compile()
    jax.block_until_ready(compiled(canvases, crops))
    t = time.perf_counter()
    for _ in range(repeats):
        out = compiled(canvases, crops)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - t) / repeats
    cost = compiled.cost_analysis() or {}
    return {
        "canvas": canvas,
        "s_per_step": seconds,
        "ms_per_view": seconds * 1e3 / (batch * views),
        "bytes_accessed_per_view": float(cost.get("bytes accessed", 0.0)) / (batch * views),
    }


def time_device_colour(batch: int, views: int, size: int, repeats: int) -> dict[str, Any]:
    """Device time per view of the colour part of `augment.on_device` (`pretrain_device_augment` without
    blur) on one tensor of `batch * views` random views, without and with RandAugment."""
    import jax
    import numpy as np

    from fnc_jax.data import augment_jax

    images = jax.device_put(np.random.default_rng(0).random((batch * views, size, size, 3), dtype=np.float32))
    key = jax.random.PRNGKey(0)
    keys = jax.block_until_ready([jax.random.fold_in(key, i) for i in range(repeats)])  # made before the timer
    out: dict[str, Any] = {}
    for name, randaugment in (("colour_jitter_grayscale", False), ("colour_jitter_randaugment_grayscale", True)):

        def colour(x, k, randaugment=randaugment):
            return augment_jax.pretrain_device_augment(x, k, color_on_device=True, randaugment=randaugment, blur=False)

        compiled = jax.jit(colour).lower(images, key).compile()
        jax.block_until_ready(compiled(images, key))
        t = time.perf_counter()
        for k in keys:
            result = compiled(images, k)
        jax.block_until_ready(result)
        seconds = (time.perf_counter() - t) / repeats
        out[name] = {"s_per_step": seconds, "ms_per_view": seconds * 1e3 / (batch * views)}
    out["randaugment_ms_per_view"] = (
        out["colour_jitter_randaugment_grayscale"]["ms_per_view"] - out["colour_jitter_grayscale"]["ms_per_view"]
    )
    return out


def is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    # Let the batch search use (almost) all of the accelerator's memory (JAX preallocates 75% otherwise).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t_start = time.time()
    calibration = common.matmul_rate()
    import jax
    import jax.numpy as jnp

    from benchmarks.compile_time import load_config
    from fnc_jax import loop, parallel
    from fnc_jax.data import layout

    cache_dir = common.enable_compile_cache(args)
    device = jax.devices()[0]
    platform = device.platform
    tiny = args.force_tiny or platform == "cpu"
    config = load_config(args.config)
    config.dtype = args.dtype
    if tiny:
        config.model.depth, config.model.width_multiplier = 18, 0.125
        config.data.image_size, config.views.support_size, config.memory.multiplier = 32, 2, 8
        config.augment.use_randaugment = args.augment_on_device  # at 32 px only the device path runs it here
    if args.augment_on_device:
        config.augment.on_device = config.augment.crop_on_device = True
        config.augment.canvas_size = 48 if tiny else 512
    candidates = (
        tuple(int(b) for b in args.batches.split(",")) if args.batches else (CPU_BATCHES if tiny else GPU_BATCHES)
    )
    candidates = tuple(sorted(set(candidates), reverse=True))
    steps = args.steps or (3 if tiny else (10 if args.quick else 20))
    mesh = parallel.create_mesh([device])
    views = 2 + config.views.support_size
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = args.assume_bytes_limit or (stats or {}).get("bytes_limit")
    kind = device.device_kind
    peak = next((v for k, v in loop.PEAK_FLOPS.items() if k in kind), None)
    common.log(
        f"{kind} ({platform}), memory limit {limit}, peak {peak}; ResNet-{config.model.depth} "
        f"{config.data.image_size}px V={views} {config.dtype}; candidates {candidates}"
    )

    def build(batch: int):
        c = config.copy_and_resolve_references()
        c.batch_size = batch
        bundle = common.build_step(c, mesh, num_classes=1000)
        t = time.perf_counter()
        lowered = bundle.step_fn.lower(common.abstract_state(bundle), common.abstract_batch(c, mesh))
        compiled = lowered.compile()
        seconds = time.perf_counter() - t
        try:  # platform-independent count on the unoptimised program (a cross-check of the compiled one)
            lowered_flops = float((lowered.cost_analysis() or {}).get("flops", 0.0)) or None
        except Exception:  # noqa: BLE001
            lowered_flops = None
        return c, bundle, compiled, seconds, lowered_flops

    def batch_bytes(batch: int) -> int:
        return batch * views * config.data.image_size**2 * 3 * 4 + batch * 4

    def predicted_bytes(mem: dict[str, int]) -> int:
        return mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]

    attempts: list[dict[str, Any]] = []
    compiled_cache: dict[int, tuple] = {}

    # 1. Probe the smallest candidate to extrapolate the memory per image.
    order = list(candidates)
    if limit and len(candidates) > 1:
        smallest = candidates[-1]
        common.log(f"probe compile at batch {smallest}")
        compiled_cache[smallest] = build(smallest)
        mem = common.compile_stats(compiled_cache[smallest][2]).get("memory")
        if mem:
            # Fixed: the state (params, optimiser, EMA; the queue grows by 16 x 128 floats per image only).
            fixed = mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] - batch_bytes(smallest)
            per_image = (mem["temp_bytes"] + batch_bytes(smallest)) / smallest
            fits = [b for b in candidates if fixed + per_image * b <= 0.9 * limit]
            start = fits[0] if fits else smallest
            order = [b for b in candidates if b <= start]
            common.log(f"memory at {smallest}: {mem}; predicted largest fitting candidate {start}")
            attempts.append(
                {
                    "batch": smallest,
                    "probe": True,
                    "memory": mem,
                    "bytes_limit": limit,
                    "predicted_largest_fitting": start,
                }
            )

    chosen = None
    longest_compile = max((c[3] for c in compiled_cache.values()), default=0.0)
    for batch in order:
        remaining = args.time_budget - (time.time() - t_start)
        if (
            batch not in compiled_cache
            and remaining < 1.2 * longest_compile + 30
            and any(b in compiled_cache for b in order)
        ):
            common.log(f"batch {batch}: no time left in the budget for another compile; trying a compiled one")
            attempts.append({"batch": batch, "result": "skipped_time_budget"})
            continue
        entry: dict[str, Any] = {"batch": batch}
        attempts.append(entry)
        state = data = metrics = None
        try:
            if batch not in compiled_cache:
                common.log(f"compiling batch {batch}")
                compiled_cache[batch] = build(batch)
                longest_compile = max(longest_compile, compiled_cache[batch][3])
            cfg, bundle, compiled, compile_s, lowered_flops = compiled_cache[batch]
            entry["compile_s"] = round(compile_s, 1)
            cstats = common.compile_stats(compiled)
            entry["memory"] = cstats.get("memory")
            if limit and entry["memory"] and predicted_bytes(entry["memory"]) > limit:
                entry["result"] = "predicted_oom"
                common.log(f"batch {batch}: predicted {predicted_bytes(entry['memory'])} bytes > limit {limit}")
                continue
            state = bundle.initial_state()
            data = common.random_batch(cfg, mesh, num_classes=1000)
            t = time.perf_counter()
            for _ in range(2):  # warm-up (autotuning, allocation)
                state, metrics = compiled(state, data)
            jax.block_until_ready(metrics)
            entry["warmup_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, data)
            metrics = jax.device_get(metrics)
            step_s = (time.perf_counter() - t) / steps
            entry["result"] = "ok"
            flops = cstats.get("flops") or lowered_flops
            leaves = jax.tree.leaves(state.params)
            chosen = {
                "per_device_batch": batch,
                "views_per_step": batch * views,
                "timed_steps": steps,
                "step_s": step_s,
                "images_per_s": batch / step_s,
                "views_per_s": batch * views / step_s,
                "flops_per_step": flops,
                "flops_per_step_compiled_cost_analysis": cstats.get("flops"),
                "flops_per_step_lowered_cost_analysis": lowered_flops,
                "achieved_tflops_per_s": flops / step_s / 1e12 if flops else None,
                "peak_tflops_per_s": peak / 1e12 if peak else None,
                "mfu": flops / step_s / peak if flops and peak else None,
                "loss": float(metrics["loss"]),
                "loss_finite": bool(jnp.isfinite(metrics["loss"])),
                "loss_dtype": str(metrics["loss"].dtype),
                "params_dtypes": sorted({str(x.dtype) for x in leaves}),
                "memory": entry["memory"],
            }
            del state, data
            canvas = 48 if tiny else 512
            chosen["crop_on_device"] = time_crop_resize(batch, views, cfg.data.image_size, canvas, steps)
            chosen["crop_on_device"]["share_of_step"] = chosen["crop_on_device"]["s_per_step"] / step_s
            colour = time_device_colour(batch, views, cfg.data.image_size, steps)
            for part in ("colour_jitter_grayscale", "colour_jitter_randaugment_grayscale"):
                colour[part]["share_of_step"] = colour[part]["s_per_step"] / step_s
            chosen["device_colour"] = colour
            break
        except Exception as err:  # noqa: BLE001 (an OOM surfaces as several error types)
            if not is_oom(err):
                raise
            entry["result"] = "oom"
            entry["error"] = str(err).splitlines()[0][:300]
            common.log(f"batch {batch}: out of memory")
            compiled_cache.pop(batch, None)
            state = data = metrics = None  # noqa: F841 (drops this attempt's buffers before the next one)
            del err
            gc.collect()

    result: dict[str, Any] = {
        "benchmark": "gpu_step",
        "quick": args.quick,
        "tiny_model": tiny,
        "machine": common.machine(),
        "command": "python -m benchmarks.gpu_step " + " ".join(sys.argv[1:] if argv is None else argv),
        "compile_cache_dir": cache_dir,
        "units": {
            "throughput": "images/s and views/s on one device",
            "flops": "FLOPs per step (cost_analysis)",
            "mfu": "achieved FLOP/s / peak dense bf16 FLOP/s of the chip (loop.PEAK_FLOPS)",
        },
        "device": {"kind": kind, "platform": platform, "bytes_limit": limit},
        "shapes": {
            "depth": config.model.depth,
            "width_multiplier": config.model.width_multiplier,
            "image_size": config.data.image_size,
            "views": views,
            "memory_multiplier": config.memory.multiplier,
            "dtype": config.dtype,
            "fn_mode": config.fn.mode,
            "data_path": layout.data_path(config),
            "randaugment_on_device": bool(config.augment.use_randaugment and config.augment.on_device),
            "candidates": list(candidates),
        },
        "attempts": attempts,
        "result": chosen,
        "speed_calibration": common.speed_calibration(calibration),
        "wall_s": round(time.time() - t_start, 1),
    }
    return result


if __name__ == "__main__":
    res = main()
    out = sys.argv[sys.argv.index("--output") + 1] if "--output" in sys.argv else None
    common.emit(res, out)
