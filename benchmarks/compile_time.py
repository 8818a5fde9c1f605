"""Compile time of the official ImageNet train step (configs/imagenet.py) on simulated devices, with the
compiled step's `cost_analysis()` FLOPs and `memory_analysis()` sizes. Nothing is run.

Usage (from the repository root):

    python -m benchmarks.compile_time [--devices 8] [--global-batch 64] [--dtype float32] [--quick] [--output FILE]

Prints ONE JSON object to stdout (progress goes to stderr).

The step is `configs/imagenet.py` exactly (ResNet-50, 224 px, V = 2 + 8 views, memory queue 16 x the global
batch fed by the EMA encoder, FN attraction, LARS, online probe over 1000 classes) on a mesh of `--devices`
simulated CPU devices, except for the global batch: `--global-batch` (default 64, i.e. 8 images = 80 views
per device instead of 512 images = 5120 views) keeps the per-device structure (the same program per device,
the same collectives, the queue still 16 x the global batch) while keeping `memory_analysis` readable on a
CPU. XLA's compile time barely depends on the batch; FLOPs and activation memory scale with it (both are
also given scaled to the official per-device batch of 512). The state and batch are abstract
(`jax.ShapeDtypeStruct` with shardings), so nothing is allocated; the persistent compilation cache is off.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from benchmarks import common

OFFICIAL_LOCAL_BATCH = 512


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default: the config's")
    p.add_argument("--config", default="configs/imagenet.py")
    p.add_argument("--quick", action="store_true", help="ResNet-18 at 64 px instead (for tests)")
    p.add_argument("--output", help="also write the JSON here")
    return p.parse_args(argv)


def load_config(path: str):
    import importlib.util
    import os

    full = path if os.path.isabs(path) else os.path.join(common.REPO_ROOT, path)
    spec = importlib.util.spec_from_file_location("bench_config", full)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    common.set_device_count(args.devices)
    calibration = common.matmul_rate()
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles
    from fnc_jax import configuration, parallel

    config = load_config(args.config)
    config.batch_size = args.global_batch
    if args.dtype:
        config.dtype = args.dtype
    if args.quick:
        config.model.depth, config.data.image_size = 18, 64
    mesh = parallel.create_mesh(jax.devices()[: args.devices])
    views = configuration.num_views(config)
    local_batch = args.global_batch // args.devices
    common.log(
        f"building the step: ResNet-{config.model.depth} {config.data.image_size}px, global batch "
        f"{args.global_batch} on {args.devices} devices, V={views}, memory x{config.memory.multiplier}"
    )
    t = time.perf_counter()
    bundle = common.build_step(config, mesh, num_classes=1000, num_train=common.IMAGENET_TRAIN_EXAMPLES)
    state = common.abstract_state(bundle)
    batch = common.abstract_batch(config, mesh)
    setup_s = time.perf_counter() - t

    common.log("lowering")
    t = time.perf_counter()
    lowered = bundle.step_fn.lower(state, batch)
    lower_s = time.perf_counter() - t
    common.log(f"lowered in {lower_s:.1f}s; compiling")
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    common.log(f"compiled in {compile_s:.1f}s")
    stats = common.compile_stats(compiled)
    hlo_text = compiled.as_text() or ""
    scale = OFFICIAL_LOCAL_BATCH / local_batch
    flops = stats.get("flops")
    mem = stats.get("memory", {})
    result: dict[str, Any] = {
        "benchmark": "compile_time",
        "quick": args.quick,
        "machine": common.machine(),
        "command": "python -m benchmarks.compile_time " + " ".join(sys.argv[1:] if argv is None else argv),
        "units": {"time": "seconds", "flops": "FLOPs per device per step", "memory": "bytes per device"},
        "shapes": {
            "config": args.config,
            "depth": config.model.depth,
            "image_size": config.data.image_size,
            "views": views,
            "devices": args.devices,
            "global_batch": args.global_batch,
            "local_batch": local_batch,
            "official_local_batch": OFFICIAL_LOCAL_BATCH,
            "memory_rows": config.memory.multiplier * args.global_batch,
            "dtype": config.dtype,
            "fn_mode": config.fn.mode,
            "optimizer": config.optim.name,
        },
        "timing": {
            "setup_s": setup_s,
            "lower_s": lower_s,
            "compile_s": compile_s,
            "lower_plus_compile_s": lower_s + compile_s,
            "compilation_cache": "disabled",
        },
        "cost_analysis": {
            "flops_per_device": flops,
            "bytes_accessed_per_device": stats.get("bytes_accessed"),
            "flops_per_view": flops / (local_batch * views) if flops else None,
            "flops_per_device_scaled_to_official_batch": flops * scale if flops else None,
            "note": "cost_analysis of the SPMD-partitioned (per-device) program; a while loop's body (the "
            "rematerialised view-by-view loss scan) is counted once, so the loss is under-counted (<1%).",
        },
        "memory_analysis": {
            **mem,
            "note": "per device at this batch: arguments = state (params, optimiser, EMA, queue) + batch; "
            "temp = activations and workspace (scale ~linearly with the per-device batch); alias = donated state",
            "temp_bytes_scaled_to_official_batch": mem.get("temp_bytes", 0) * scale if mem else None,
        },
        "hlo": {"optimized_hlo_chars": len(hlo_text), "optimized_hlo_lines": hlo_text.count("\n")},
        "speed_calibration": common.speed_calibration(calibration),
    }
    if "memory_analysis_error" in stats:
        result["memory_analysis"]["error"] = stats["memory_analysis_error"]
    return result


if __name__ == "__main__":
    res = main()
    out = sys.argv[sys.argv.index("--output") + 1] if "--output" in sys.argv else None
    common.emit(res, out)
