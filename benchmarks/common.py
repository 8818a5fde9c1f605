"""Shared helpers of the step, input-pipeline, compile-time and GPU benchmarks.

Import order matters: `set_device_count` edits XLA_FLAGS and must run before JAX is imported, so this
module imports JAX (and fnc_jax) lazily, inside the functions that need it.

The train step is built exactly as `fnc_jax.pretrain.run` builds it (validation, schedule, models,
optimiser with parameter masks, `StepSettings`, `jax.jit(train_step, donate_argnums=0)` with replicated
outputs); only the data is synthetic (uniform [0, 1) views, random labels), because a benchmark of the
step must not wait on the input pipeline (which has its own benchmark).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_TRAIN_EXAMPLES = 1_281_167


_T0 = time.time()
try:
    _LOAD0 = os.getloadavg()[0]  # the machine's load when the benchmark started
except OSError:
    _LOAD0 = None


def log(*args: Any) -> None:
    """Progress messages go to stderr (stdout carries only the benchmark's JSON object), with elapsed seconds."""
    print(f"[{time.time() - _T0:7.1f}s]", *args, file=sys.stderr, flush=True)


def set_device_count(count: int, *, platform_name: str | None = "cpu") -> None:
    """Simulated CPU device count (replacing any previous value); call before JAX is imported.

    `platform_name=None` leaves JAX_PLATFORMS alone (the GPU benchmark picks the accelerator if present).
    """
    if "jax" in sys.modules:
        raise RuntimeError("set_device_count must run before jax is imported.")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    if platform_name:
        os.environ.setdefault("JAX_PLATFORMS", platform_name)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("FNC_JAX_BENCH_CACHE") or os.path.join(base, "fnc_jax_benchmarks", "xla")


def add_cache_flags(parser) -> None:
    parser.add_argument(
        "--compile-cache",
        default=default_cache_dir(),
        help="JAX persistent compilation cache directory (compiles dominate these benchmarks on a CPU; "
        "env FNC_JAX_BENCH_CACHE)",
    )
    parser.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh")


def enable_compile_cache(args) -> str | None:
    """Turns on JAX's persistent compilation cache (after importing jax); returns the directory or None.

    Only compile times change: a cache hit loads the same executable that a fresh compile would produce.
    """
    if getattr(args, "no_compile_cache", False) or not getattr(args, "compile_cache", None):
        return None
    import jax

    os.makedirs(args.compile_cache, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return args.compile_cache


def machine() -> dict[str, Any]:
    """Where and when the numbers were taken."""
    info: dict[str, Any] = {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        info["load_average_1min"] = os.getloadavg()[0]
        info["load_average_1min_at_start"] = _LOAD0
    except OSError:
        pass
    model_name = _cpu_model_name()
    if model_name:
        info["cpu_model"] = model_name
    info["allocator"] = allocator()
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules:
        import jax

        devices = jax.devices()
        info.update(
            jax_version=jax.__version__,
            jaxlib_version=getattr(sys.modules.get("jaxlib"), "__version__", None),
            backend=jax.default_backend(),
            device_kind=devices[0].device_kind,
            num_devices_in_process=len(devices),
        )
    return info


# Where Debian / Ubuntu (libtcmalloc-minimal4, libgoogle-perftools4) put tcmalloc.
_TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc.so.4",
)


def allocator() -> str:
    """The malloc this process runs on: "tcmalloc" or "jemalloc" when one is loaded (LD_PRELOAD), else
    "glibc". It matters on CPU: XLA:CPU allocates each call's temporaries afresh, and glibc hands blocks
    over 32 MiB back to the OS on free, so every call page-faults and zeroes them again."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps), "glibc")


def tcmalloc_library() -> str | None:
    """A tcmalloc shared library on this machine (to LD_PRELOAD into a subprocess), or None."""
    return next((path for path in _TCMALLOC_CANDIDATES if os.path.exists(path)), None)


def matmul_rate(size: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """The machine's float32 matmul rate now (numpy, all cores): the speed calibration every benchmark records.

    These VMs drift by up to 2x with nothing visible, so a figure is only comparable with another taken at a
    known rate; benchmarks call this before and after their measurements and report both. Best of `repeats`
    `size` x `size` products (2 * size**3 FLOPs each).
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up (thread pool, caches)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return {
        "matmul_gflops_per_s": round(2 * size**3 / best / 1e9, 1),
        "matmul_size": size,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# A rate sample's numpy product (48 MiB of operands) evicts a timed function's working set from the caches:
# the first calls after it are slower (1.5x for a 25 ms FNC loss call, 4% at 430 ms), so a timing paired with
# a sample warms up first.
WARM_CALLS = 2
TIMED_CALLS = 3


def warm_median(run: Callable[[], float]) -> float:
    """Median of TIMED_CALLS calls of `run` (which returns its own time) after WARM_CALLS untimed ones."""
    for _ in range(WARM_CALLS):
        run()
    return statistics.median(run() for _ in range(TIMED_CALLS))


def speed_calibration(before: dict[str, Any]) -> dict[str, Any]:
    """The JSON record of the machine's speed: `before` (a `matmul_rate()` taken at the start) and one now."""
    return {"matmul_before": before, "matmul_after": matmul_rate()}


def _cpu_model_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def emit(result: dict[str, Any], output: str | None = None) -> None:
    """Prints the one JSON object on stdout (and writes it to `output` if given)."""
    text = json.dumps(result, indent=2, sort_keys=False, default=_json_default)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


# ----------------------------------------------------------------------------------------------
# Configs.


def small_config(
    *,
    depth: int = 18,
    width: float = 0.25,
    image_size: int = 32,
    batch: int = 64,
    views: int = 4,
    memory_multiplier: int = 0,
    fn_mode: str = "attraction",
    dtype: str = "float32",
    proj_out_dim: int = 128,
):
    """The base (official) config with the shapes of a benchmark; everything else stays official."""
    from fnc_jax.config_base import pretrain_config

    c = pretrain_config()
    c.batch_size = batch
    c.dtype = dtype
    c.data.image_size = image_size
    c.views.support_size = views - 2
    c.model.depth = depth
    c.model.width_multiplier = width
    c.model.proj_out_dim = proj_out_dim
    c.fn.mode = fn_mode
    c.memory.multiplier = memory_multiplier
    if image_size <= 32:  # RandAugment is off at CIFAR sizes (configs/cifar10.py); irrelevant to the step
        c.augment.use_randaugment = False
    return c


# ----------------------------------------------------------------------------------------------
# The train step, built as `pretrain.run` builds it.


def build_step(config, mesh, *, num_classes: int = 10, num_train: int = IMAGENET_TRAIN_EXAMPLES):
    """The validated config's `step.StepProgram`, exactly as `pretrain.run` builds it."""
    from fnc_jax import configuration, step

    fn = configuration.validate_pretrain(config, num_devices=mesh.size)
    return step.build_step(config, fn, mesh, num_classes=num_classes, num_train=num_train)


def abstract_state(bundle):
    """ShapeDtypeStructs of the state with replicated shardings: lowering without allocating anything."""
    import functools

    import jax

    from fnc_jax import parallel, step

    init = functools.partial(step.init_state, bundle.config, bundle.model, bundle.ema_model, bundle.tx)
    shapes = jax.eval_shape(init)
    sharding = parallel.replicated(bundle.mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def batch_shapes(config) -> dict[str, tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of each entry of a global batch on the config's data path (`layout.BATCH_LAYOUTS`):
    views, or with `augment.crop_on_device` canvases of side `augment.canvas_size` (0: the view size)."""
    import numpy as np

    from fnc_jax.data import layout

    b, size, views = config.batch_size, config.data.image_size, 2 + config.views.support_size
    path = layout.data_path(config)
    dims = {"images": (b, views, size, size, 3)}
    if path == layout.DEVICE_CROP:
        canvas = config.augment.canvas_size or size
        dims = {"images": (b, canvas, canvas, 3), "crops": (b, views, 5)}
    shapes = {key: (dims[key], np.dtype(dtype)) for key, (dtype, _) in layout.BATCH_LAYOUTS[path].items()}
    return {**shapes, "labels": ((b,), np.dtype(np.int32))}


def abstract_batch(config, mesh):
    import jax

    from fnc_jax import parallel

    sharding = parallel.batch_sharded(mesh)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in batch_shapes(config).items()}


def random_batch(config, mesh, *, num_classes: int, seed: int = 0):
    """A synthetic global batch on the devices, sharded over the sample axis like the real input: uniform
    views (float32 in [0, 1), or uint8), or canvases and crops (`layout.random_canvases`)."""
    import jax
    import numpy as np

    from fnc_jax import parallel
    from fnc_jax.data import layout

    rng = np.random.default_rng(seed)
    shapes = batch_shapes(config)
    images_shape = shapes["images"][0]
    path = layout.data_path(config)
    if path == layout.DEVICE_CROP:
        canvases, crops = layout.random_canvases(images_shape[0], shapes["crops"][0][1], images_shape[1], seed)
        host = {"images": canvases, "crops": crops}
    elif path == layout.DEVICE_COLOUR:
        host = {"images": rng.integers(0, 256, images_shape, dtype=np.uint8)}
    else:
        host = {"images": rng.random(images_shape, dtype=np.float32)}
    host["labels"] = rng.integers(0, max(num_classes, 1), shapes["labels"][0]).astype(np.int32)
    return jax.device_put(host, parallel.batch_sharded(mesh))


# ----------------------------------------------------------------------------------------------
# Compile statistics and timing.


def compile_stats(compiled) -> dict[str, Any]:
    """`cost_analysis()` FLOPs / bytes and `memory_analysis()` sizes of a compiled executable (per device)."""
    out: dict[str, Any] = {}
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        if cost and "flops" in cost:
            out["flops"] = float(cost["flops"])
        if cost and "bytes accessed" in cost:
            out["bytes_accessed"] = float(cost["bytes accessed"])
    except Exception as e:  # not every backend implements it
        out["cost_analysis_error"] = f"{type(e).__name__}: {e}"
    try:
        m = compiled.memory_analysis()
        mem = {
            "temp_bytes": int(m.temp_size_in_bytes),
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
            "generated_code_bytes": int(m.generated_code_size_in_bytes),
        }
        mem["peak_estimate_bytes"] = (
            mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
        )
        out["memory"] = mem
    except Exception as e:
        out["memory_analysis_error"] = f"{type(e).__name__}: {e}"
    return out


def block(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    min_time: float = 0.0,
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall times of each zero-argument callable, run round-robin so that load changes hit all alike.

    Each callable must return what to block on. `warmup` rounds are run first and discarded; each
    timed sample repeats the call until `min_time` seconds have passed and reports the mean per call.
    If `cpu_times` is given it receives this process's CPU seconds (all threads) per call, a measure
    that other processes competing for the cores inflate much less than wall time.
    """
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
            while True:
                block(fn())
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            times[name].append(elapsed / calls)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append((time.process_time() - cpu_start) / calls)
    return times


def summarize(samples: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "times_s": [round(t, 6) for t in samples],
    }
