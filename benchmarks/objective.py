"""Benchmark of the FNC objective (`fnc_jax.objectives`): time, per-device memory and FLOPs of loss + gradient.

Usage (from the repository root):

    python -m benchmarks.objective [--quick] [--matmul-bound-only | --breakdown] [--devices N] [--output FILE]

Prints ONE JSON object to stdout (progress goes to stderr). Sections:

- `matmul_bound`: per N x V shape (256x10, 512x10, 1024x10; one device, in a process without simulated
  devices, which slow a one-device computation by about 20%), the official default's loss +
  gradient for both `low_memory` values against its matmul-bound time: `bound_passes` (4 for the default,
  3 for the fast path) times one pass's FLOPs (2*V*B*C*d) at the machine's float32 matmul rate
  (`benchmarks.common.matmul_rate()`, sampled before every round of calls in the same run, each round's
  time, the median of 3 calls after 2 untimed ones because the sample's numpy product evicts the caches,
  paired with the sample before it); `over_bound` is the median of the paired ratios (`over_bound_best`
  the smallest), next to the achieved GFLOP/s and the compiled peak temporary memory.
  `--matmul-bound-only` runs only this section.

- `breakdown` (`--breakdown`, which runs only this section): where one call's time goes, for the default
  path and the fast path at N x V = 1024x10 (one device, official default; `--quick`: 128x10). After the
  timed calls (paired with the matmul rate as above), a few calls run under `jax.profiler.trace` into a
  temporary directory; the XLA:CPU op events of the trace (perfetto JSON) are summed per call and put in
  categories by the ops the compiled HLO says each contains: `dot`, `exp_reduce`, `topk`, `copy_fill`,
  `other` (rules in the JSON, with the top ops of every category and their HLO ops, so the sorting can be
  checked). Next to them: the traced ops' total against the traced wall time, the dots' achieved GFLOP/s
  (their HLO FLOPs over their traced time) against the matmul rate, and the call against its pass bound.

- `timing`: wall time of the jitted `jax.value_and_grad` of the loss on this machine's CPU (compile and a
  warm-up call excluded, median of several repeats, `block_until_ready`), for FNC attraction (the official
  default `FNConfig()`), FNC elimination and the plain multi-view baseline (`mode='none'`), in-batch
  (`fnc_loss`) and memory (`fnc_memory_loss`) variants, `low_memory` True and False, on 1 device and
  sharded over `--devices` simulated CPU devices with `jax.shard_map`. `ratios` holds FNC / baseline and
  low_memory True / False.
- `memory`: per-device sizes of the compiled executable (`memory_analysis()`: temp, argument, output
  bytes) at the official scale (N = 4096, V = 10, d = 128, memory multiplier M = 16) split over 1, 8, 32
  and 128 devices; compile only, nothing is run. Next to the measured bytes are the theoretical sizes of
  one view's similarity block (B x C float32, what `low_memory=True` should scale with: B*V*N in-batch)
  and of the stack of all views' blocks (V x B x C, what `low_memory=False` stores: B*V*V*N in-batch).
- FLOPs: `cost_analysis()['flops']` of every compiled executable, next to an analytic count of the
  similarity matmuls (XLA counts a while loop's body once, so the `low_memory=True` (lax.scan) numbers
  from `cost_analysis` are lower bounds; the analytic count is the one to compare).

Simulated devices: `--xla_force_host_platform_device_count` is set in XLA_FLAGS before JAX is imported
(to max(--devices, largest in-process memory point)); device counts above that are compiled in a
subprocess of this module with its own XLA_FLAGS (`--memory-worker`). Lowering with a
`jax.sharding.AbstractMesh` works (`jit(f).trace(x).lower(lowering_platforms=('cpu',))`) but compiling
needs a concrete device assignment, so `memory_analysis()` is not available that way.

Safety: every timed configuration is compiled first and skipped (with the reason in the JSON) when its
compiled per-device bytes times the device count exceed `--max-run-bytes` (default 4 GiB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import allocator, set_device_count, tcmalloc_library
from benchmarks.common import machine as common_machine

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXIS = "data"

# Official scale (the official ImageNet configuration, docs/training_recipe.md; its cost: docs/method.md §12).
OFFICIAL = {"global_batch": 4096, "views": 10, "dim": 128, "memory_multiplier": 16}
F32 = 4

MODE_CONFIGS = {
    "attraction": {},  # the official default FNConfig()
    "elimination": {"mode": "elimination"},
    "none": {"mode": "none"},
}
# DCL / HCL (in-batch only) at the recommended tau_plus = 0.1, beta = 1.0, without and with elimination of
# the official selection: mode name -> (objective, FNConfig mode).
DEBIASED_MODES = {
    "dcl": ("dcl", "none"),
    "dcl_elimination": ("dcl", "elimination"),
    "hcl": ("hcl", "none"),
    "hcl_elimination": ("hcl", "elimination"),
}
TAU_PLUS, BETA = 0.1, 1.0
# (N, V) shapes of the matmul-bound comparison (issue 15), one device.
BOUND_SHAPES = [(256, 10), (512, 10), (1024, 10)]


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Theory.


def num_columns(variant: str, views: int, global_batch: int, memory_multiplier: int) -> int:
    """C: candidate columns per anchor row (V*N in-batch, M*N with the memory)."""
    return views * global_batch if variant == "in_batch" else memory_multiplier * global_batch


def matmul_passes(variant: str, mode: str, low_memory: bool) -> dict[str, int]:
    """Similarity-block matmul passes ((V*B) x C x d each) of loss + gradient as `fnc_jax.objectives` does them.

    FN scoring 1 (none in mode 'none', and none for FNC attraction in-batch, the official default, whose
    scores are taken from the logits' own blocks), logits 1, backward: d(anchors) 1 and, in-batch only,
    d(candidates) 1 (memory rows carry no gradient); low_memory=True recomputes the blocks once more.
    """
    reused = mode == "attraction" and variant == "in_batch"
    passes = {
        "fn_scores": 0 if _fn_mode(mode) == "none" or reused else 1,
        "logits_forward": 1,
        "logits_recomputed_in_backward": 1 if low_memory else 0,
        "grad_anchors": 1,
        "grad_candidates": 1 if variant == "in_batch" else 0,
    }
    passes["total"] = sum(passes.values())
    return passes


def analytic_flops(variant, mode, low_memory, views, local_batch, columns, dim) -> dict[str, Any]:
    """The passes and FLOPs of `matmul_passes`; in-batch FNC on one device (the candidates are the anchors'
    rows) computes `matmul_share` of each pass of the loss's denominator (its symmetric path)."""
    from fnc_jax.objectives.denominator import symmetric_share

    per_pass = 2 * views * local_batch * columns * dim
    passes = matmul_passes(variant, mode, low_memory)
    one_device = variant == "in_batch" and local_batch * views == columns and mode not in DEBIASED_MODES
    share = symmetric_share(views, local_batch) if one_device else 1.0
    flops = per_pass * (passes["fn_scores"] + share * (passes["total"] - passes["fn_scores"]))
    return {"matmul_passes": passes, "flops_per_pass": per_pass, "matmul_share": share, "matmul_flops": flops}


# ----------------------------------------------------------------------------------------------
# Building the jitted loss + gradient (imports jax lazily: XLA_FLAGS must be set first).


def _fn_mode(mode: str) -> str:
    """The FNConfig mode of a benchmark mode (a DCL / HCL mode names its own)."""
    return DEBIASED_MODES[mode][1] if mode in DEBIASED_MODES else mode


def _fn_config(mode: str):
    from fnc_jax.objectives import FNConfig

    return FNConfig(**MODE_CONFIGS[_fn_mode(mode)])


def _describe(mode: str) -> Any:
    if mode in DEBIASED_MODES:
        objective, fn_mode = DEBIASED_MODES[mode]
        beta = f", beta={BETA}" if objective == "hcl" else ""
        return f"{objective}_loss(tau_plus={TAU_PLUS}{beta}, fn=FNConfig(**{MODE_CONFIGS[fn_mode]}))"
    return MODE_CONFIGS[mode] or "FNConfig() (official default: attraction, max, all_views, top-10 and cos > 0.7)"


def build(
    variant: str,
    mode: str,
    low_memory: bool,
    devices: int,
    views: int,
    global_batch: int,
    dim: int,
    memory_multiplier: int,
):
    """Returns (jitted value_and_grad, argument ShapeDtypeStructs with shardings, mesh or None)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from fnc_jax.objectives import dcl_loss, fnc_loss, fnc_memory_loss, hcl_loss

    fn = _fn_config(mode)
    axis_name = AXIS if devices > 1 else None
    objective = DEBIASED_MODES.get(mode, ("fnc",))[0]
    if objective != "fnc" and variant != "in_batch":
        raise ValueError(f"{mode}: DCL and HCL have no memory variant")
    if objective == "dcl":

        def loss(x):
            return dcl_loss(x, tau_plus=TAU_PLUS, fn=fn, axis_name=axis_name, low_memory=low_memory)[0]

        shapes = [(views, global_batch, dim)]
        specs = [P(None, AXIS)]
    elif objective == "hcl":

        def loss(x):
            return hcl_loss(x, tau_plus=TAU_PLUS, beta=BETA, fn=fn, axis_name=axis_name, low_memory=low_memory)[0]

        shapes = [(views, global_batch, dim)]
        specs = [P(None, AXIS)]
    elif variant == "in_batch":

        def loss(x):
            return fnc_loss(x, fn=fn, axis_name=axis_name, low_memory=low_memory)[0]

        shapes = [(views, global_batch, dim)]
        specs = [P(None, AXIS)]
    else:

        def loss(x, ema, memory):
            return fnc_memory_loss(x, ema, memory, fn=fn, axis_name=axis_name, low_memory=low_memory)[0]

        shapes = [(views, global_batch, dim), (views, global_batch, dim), (memory_multiplier * global_batch, dim)]
        specs = [P(None, AXIS), P(None, AXIS), P()]  # the memory queue is replicated on every device

    mesh = None
    if devices > 1:
        if len(jax.devices()) < devices:
            raise RuntimeError(f"need {devices} devices, have {len(jax.devices())}")
        mesh = Mesh(np.array(jax.devices()[:devices]), (AXIS,))
        loss = jax.shard_map(loss, mesh=mesh, in_specs=tuple(specs), out_specs=P())
        args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, p)) for s, p in zip(shapes, specs)]
    else:
        args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.jit(jax.value_and_grad(loss)), args, mesh


def compile_stats(compiled) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        m = compiled.memory_analysis()
        out["temp_bytes"] = int(m.temp_size_in_bytes)
        out["argument_bytes"] = int(m.argument_size_in_bytes)
        out["output_bytes"] = int(m.output_size_in_bytes)
        out["alias_bytes"] = int(m.alias_size_in_bytes)
        out["total_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    except Exception as e:  # not every backend implements it
        out["memory_analysis_error"] = f"{type(e).__name__}: {e}"
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        if cost and "flops" in cost:
            out["cost_analysis_flops"] = float(cost["flops"])
        if cost and "bytes accessed" in cost:
            out["cost_analysis_bytes_accessed"] = float(cost["bytes accessed"])
    except Exception as e:
        out["cost_analysis_error"] = f"{type(e).__name__}: {e}"
    return out


def make_inputs(variant: str, views: int, global_batch: int, dim: int, memory_multiplier: int, seed: int = 0):
    """Clustered embeddings (100 clusters, same-cluster cosine ~0.7), so the FN selection is not empty."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    clusters = 100
    centers = unit(rng.normal(size=(clusters, dim)))
    labels = rng.integers(0, clusters, global_batch)
    emb = centers[labels][None] + 0.65 * unit(rng.normal(size=(views, global_batch, dim)))
    emb = emb.astype(np.float32)
    if variant == "in_batch":
        return [emb]
    ema = unit(emb + 0.05 * rng.normal(size=emb.shape)).astype(np.float32)
    rows = memory_multiplier * global_batch
    old = unit(centers[rng.integers(0, clusters, rows)] + 0.65 * unit(rng.normal(size=(rows, dim))))
    memory = np.concatenate([ema.reshape(views * global_batch, dim), old[: rows - views * global_batch]])
    return [emb, ema, memory.astype(np.float32)]


# ----------------------------------------------------------------------------------------------
# Timing.


def prepare_point(
    variant, mode, low_memory, devices, views, global_batch, dim, memory_multiplier, max_run_bytes, compiled_out=None
):
    """Compiles one configuration; returns (entry, runner or None when skipped). `compiled_out` (a list), if
    given, receives the compiled executable (`--breakdown` reads its HLO)."""
    import jax

    entry: dict[str, Any] = {
        "variant": variant,
        "mode": mode,
        "fn_config": _describe(mode),
        "low_memory": low_memory,
        "devices": devices,
        "global_batch_N": global_batch,
        "local_batch_B": global_batch // devices,
        "views_V": views,
        "dim_d": dim,
        "memory_multiplier_M": memory_multiplier if variant == "memory" else None,
        "columns_C": num_columns(variant, views, global_batch, memory_multiplier),
    }
    fn, specs, _ = build(variant, mode, low_memory, devices, views, global_batch, dim, memory_multiplier)
    t0 = time.perf_counter()
    compiled = fn.lower(*specs).compile()
    entry["compile_s"] = time.perf_counter() - t0
    if compiled_out is not None:
        compiled_out.append(compiled)
    stats = compile_stats(compiled)
    entry["compiled_per_device"] = stats
    entry.update(analytic_flops(variant, mode, low_memory, views, global_batch // devices, entry["columns_C"], dim))
    need = stats.get("total_bytes", 0) * devices
    entry["run_bytes_all_devices"] = need
    if need > max_run_bytes:
        entry["skipped"] = f"compiled size {need / 2**30:.2f} GiB over all devices exceeds --max-run-bytes"
        log(f"  skip {variant}/{mode}/low_memory={low_memory}/R={devices}/N={global_batch}: {entry['skipped']}")
        return entry, None
    args = [
        jax.device_put(a, s.sharding) if getattr(s, "sharding", None) is not None else jax.device_put(a)
        for a, s in zip(make_inputs(variant, views, global_batch, dim, memory_multiplier), specs)
    ]

    def run() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        return time.perf_counter() - t0

    run()  # warm-up (excluded)
    return entry, run


def time_group(configs, views, dim, memory_multiplier, repeats, max_run_bytes) -> list[dict[str, Any]]:
    """Times configurations side by side: all are compiled and warmed up first, then the repeats are
    interleaved (one call of each configuration per round), so that load from other processes on the
    shared CPU falls on all of them alike and the ratios stay meaningful."""
    prepared = [
        prepare_point(variant, mode, low, r, views, n, dim, memory_multiplier, max_run_bytes)
        for variant, mode, low, r, n in configs
    ]
    times: list[list[float]] = [[] for _ in prepared]
    for _ in range(repeats):
        for i, (_, run) in enumerate(prepared):
            if run is not None:
                times[i].append(run())
    entries = []
    for (entry, run), ts in zip(prepared, times):
        if run is not None:
            entry["times_s"] = ts
            entry["median_s"] = statistics.median(ts)
            entry["min_s"] = min(ts)
            entry["analytic_matmul_gflops_per_s_all_devices"] = (
                entry["matmul_flops"] * entry["devices"] / entry["median_s"] / 1e9
            )
            log(
                f"  {entry['variant']:8s} {entry['mode']:11s} low_memory={entry['low_memory']!s:5s} "
                f"R={entry['devices']:3d} N={entry['global_batch_N']:5d}: median {entry['median_s'] * 1e3:9.2f} ms "
                f"(compile {entry['compile_s']:.1f} s)"
            )
        entries.append(entry)
    return entries


def timing_ratios(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FNC / baseline (same variant, shape, devices, low_memory) and low_memory True / False (same mode)."""
    done = {
        (e["variant"], e["mode"], e["low_memory"], e["devices"], e["global_batch_N"]): e["median_s"]
        for e in entries
        if "median_s" in e
    }
    ratios = []
    for (variant, mode, low, devices, n), t in sorted(done.items(), key=str):
        base = done.get((variant, "none", low, devices, n))
        common = {"variant": variant, "devices": devices, "global_batch_N": n}
        if mode != "none" and base:
            ratios.append(
                {
                    **common,
                    "kind": "fnc_over_baseline",
                    "mode": mode,
                    "low_memory": low,
                    "ratio": t / base,
                    "numerator_s": t,
                    "denominator_s": base,
                    "meaning": f"time({mode}) / time(mode='none'), loss + gradient",
                }
            )
        other = done.get((variant, mode, False, devices, n))
        if low and other:
            ratios.append(
                {
                    **common,
                    "kind": "low_memory_true_over_false",
                    "mode": mode,
                    "ratio": t / other,
                    "numerator_s": t,
                    "denominator_s": other,
                    "meaning": "time(low_memory=True) / time(low_memory=False), loss + gradient",
                }
            )
    return ratios


# ----------------------------------------------------------------------------------------------
# Against the matmul-bound limit.

# Matmul passes over the (V*B) x C similarities that loss + gradient cannot do without: the default
# (low_memory=True) recomputes the blocks in the backward (scores+logits, recompute, d(anchors),
# d(candidates)); the fast path stores them (scores+logits, d(anchors), d(candidates)).
BOUND_PASSES = {True: 4, False: 3}


def _bound_row(entry: dict[str, Any], global_batch: int, views: int) -> dict[str, Any]:
    """The shape, path and bound of one prepared point: the common head of a matmul-bound / breakdown row."""
    return {
        "global_batch_N": global_batch,
        "views_V": views,
        "low_memory": entry["low_memory"],
        "bound_passes": BOUND_PASSES[entry["low_memory"]],
        "flops_per_pass": entry["flops_per_pass"],
        "matmul_share": entry["matmul_share"],
        "matmul_flops": entry["matmul_flops"],
        "temp_mib": entry["compiled_per_device"].get("temp_bytes", float("nan")) / 2**20,
    }


def _paired_calls(prepared, repeats: int, rates: list[dict[str, Any]]) -> tuple[list[list[float]], ...]:
    """Per prepared (entry, run, ...): `repeats` call times (s), their ratios to the bound and to the call's
    own matmul FLOPs (`matmul_flops`) at the matmul rate sampled just before each round (appended to
    `rates`). A round's time of a configuration is the median of `TIMED_CALLS` calls after `WARM_CALLS`
    untimed ones (`warm_median`)."""
    from benchmarks.common import matmul_rate, warm_median

    times: list[list[float]] = [[] for _ in prepared]
    ratios: list[list[float]] = [[] for _ in prepared]
    own: list[list[float]] = [[] for _ in prepared]
    for _ in range(repeats):
        rates.append(matmul_rate(repeats=1))
        rate = rates[-1]["matmul_gflops_per_s"] * 1e9
        for i, (entry, run, *_) in enumerate(prepared):
            if run is not None:
                times[i].append(warm_median(run))
                ratios[i].append(times[i][-1] / (BOUND_PASSES[entry["low_memory"]] * entry["flops_per_pass"] / rate))
                own[i].append(times[i][-1] / (entry["matmul_flops"] / rate))
    return times, ratios, own


def matmul_bound(shapes, dim: int, repeats: int, max_run_bytes: float) -> dict[str, Any]:
    """Per (N, V) shape on one device, FNC's official default loss + gradient for both low_memory values:
    time over the matmul-bound time (passes * flops_per_pass / the machine's matmul rate), achieved GFLOP/s
    and the compiled peak temporary bytes.

    The matmul rate is sampled before every round of calls (`benchmarks.common.matmul_rate`, one product),
    and each call is compared with the rate just before it: on a shared machine the rate drifts by 2x
    within a run, so paired ratios (their median and their best) are what stays comparable (`_paired_calls`).
    """
    from benchmarks.common import matmul_rate

    rates: list[dict[str, Any]] = [matmul_rate()]
    rows = []
    for global_batch, views in shapes:
        prepared = [
            prepare_point("in_batch", "attraction", low, 1, views, global_batch, dim, 0, max_run_bytes)
            for low in (True, False)
        ]
        times, ratios, own = _paired_calls(prepared, repeats, rates)
        for (entry, run), ts, rs, os_ in zip(prepared, times, ratios, own):
            passes = BOUND_PASSES[entry["low_memory"]]
            row = {**_bound_row(entry, global_batch, views), "compile_s": entry["compile_s"]}
            if run is None:
                row["skipped"] = entry["skipped"]
            else:
                row.update(
                    times_ms=[t * 1e3 for t in ts],
                    median_ms=statistics.median(ts) * 1e3,
                    over_bound_per_call=rs,
                    over_bound=statistics.median(rs),
                    over_bound_best=min(rs),
                    over_own_matmuls=statistics.median(os_),
                    achieved_gflops_per_s=passes * entry["flops_per_pass"] / min(ts) / 1e9,
                )
                log(
                    f"  N={global_batch} V={views} low_memory={entry['low_memory']!s:5s}: median "
                    f"{row['median_ms']:8.1f} ms = {row['over_bound']:.2f}x its {passes}-pass bound (best "
                    f"{row['over_bound_best']:.2f}x, {row['achieved_gflops_per_s']:.0f} GFLOP/s; "
                    f"{row['over_own_matmuls']:.2f}x its own matmuls, share {row['matmul_share']:.3f}), temp "
                    f"{row['temp_mib']:.1f} MiB"
                )
            rows.append(row)
    rates.append(matmul_rate())
    log(f"matmul rates: {[r['matmul_gflops_per_s'] for r in rates]} GFLOP/s")
    return {
        "meaning": "over_bound = median over calls of time / (bound_passes * flops_per_pass / the matmul rate "
        "sampled just before the call); over_bound_best the smallest; achieved_gflops_per_s counts the bound's "
        "passes in the fastest call; over_own_matmuls = the same against the call's own matmul_flops (the "
        "symmetric path computes matmul_share of each pass); one device, FNConfig() (official default)",
        "matmul_rate": rates,
        "allocator": allocator(),  # the measuring process's malloc (benchmarks.common.allocator)
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# Where the time of one call goes (--breakdown): the XLA:CPU ops of a profiler trace, by category.

# (N, V) of the breakdown (one device, official default FNConfig()); --quick uses a small N.
BREAKDOWN_SHAPE = (1024, 10)
BREAKDOWN_CATEGORIES = ("dot", "exp_reduce", "topk", "copy_fill", "other")
# Ops that only move, fill or reinterpret data: a fusion made of nothing else is `copy_fill`.
_DATA_MOVEMENT = {
    "parameter",
    "constant",
    "broadcast",
    "iota",
    "copy",
    "bitcast",
    "reshape",
    "transpose",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "concatenate",
    "pad",
    "tuple",
    "get-tuple-element",
}
# Ops that contain other ops' thunks (their trace events nest the leaves'): not counted themselves.
_CONTAINERS = {"while", "conditional", "call"}
_EXP_OPS = {"exponential", "exponential-minus-one", "log", "log-plus-one"}
_REDUCE_OPS = {"reduce", "reduce-window"}
_BREAKDOWN_RULES = {
    "dot": "a dot or convolution, or a fusion containing one (XLA:CPU's __ynn_fusion custom fusions wrap the "
    "matmuls; one containing a dot is a dot)",
    "topk": "custom-call TopK, or an op/fusion containing topk or sort",
    "exp_reduce": "a fusion/op containing exponential or log (`with_exp_ms`), or else a reduce (row sums, max "
    "aggregations: `reduce_only_ms`)",
    "copy_fill": "an op/fusion made only of data movement ("
    + ", ".join(sorted(_DATA_MOVEMENT))
    + "), or a fusion whose root is one of these and whose arithmetic ops produce at most 1/8 of the elements "
    "it writes (a dynamic-update-slice writes its update): e.g. the zero-fill of a buffer by a broadcast of a "
    "scalar computed from x",
    "other": "the rest (element-wise select / add / maximum ... fusions), and trace ops absent from the HLO",
    "skipped": "while / conditional / call thunks (they contain the leaves' events); the first matching rule "
    "wins, in the order dot, topk, exp_reduce, copy_fill, other",
}

_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s+\((.*)\)\s*->\s*.*\{\s*$")
_PARAM_RE = re.compile(r"([\w.\-]+):\s*(\w+\[[\d,]*\])")


def _dims(shape: str) -> list[int] | None:
    m = re.match(r"^\(?\w+\[([\d,]*)\]", shape.strip())
    if not m:
        return None
    return [int(x) for x in m.group(1).split(",") if x]


def _elements(dims: list[int] | None) -> int:
    """Elements of an array shape (1 for a scalar; 0 when unknown)."""
    return 0 if dims is None else math.prod(dims)


def parse_hlo(text: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The module name and, per instruction name of an (optimized) HLO module's text: opcode, the opcodes
    inside it (a fusion's called computations, transitively), its dot FLOPs, custom-call target, metadata
    op_name, the opcode of a fusion's root, the elements it writes (a dynamic-update-slice root: its update)
    and the largest array its arithmetic (non data-movement) ops produce."""
    module = re.match(r"HloModule\s+([\w.\-]+)", text)
    comps: dict[str, list[str]] = {}  # computation -> its instruction names
    instrs: dict[str, dict[str, Any]] = {}
    shapes: dict[str, list[int] | None] = {}
    roots: dict[str, str] = {}  # computation -> its ROOT instruction
    current = None
    for line in text.splitlines():
        c = _COMP_RE.match(line)
        if c:
            current = c.group(1)
            comps[current] = []
            for name, shape in _PARAM_RE.findall(c.group(2)):
                shapes[name] = _dims(shape)
            continue
        m = _INSTR_RE.match(line)
        if not m or current is None:
            continue
        name, shape, opcode, rest = m.groups()
        shapes[name] = _dims(shape)
        comps[current].append(name)
        if line.lstrip().startswith("ROOT"):
            roots[current] = name
        operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
        calls = re.findall(
            r"(?:calls|to_apply|body|condition|called_computations)=\{?([^,}\s]+(?:,\s*%[^,}\s]+)*)", rest
        )
        called = [x.strip().lstrip("%") for group in calls for x in group.split(",")]
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        op_name = re.search(r'op_name="([^"]+)"', rest)
        flops = 0
        if opcode == "dot":
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
            lhs, out = shapes.get(operands[0]) if operands else None, _dims(shape)
            if lhs is not None and out is not None and contracting:
                k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
                flops = 2 * math.prod(out) * k
        instrs[name] = {
            "opcode": opcode,
            "called": called,
            "target": target.group(1) if target else None,
            "op_name": op_name.group(1) if op_name else None,
            "dot_flops": flops,
            "operands": operands,
            "elements": _elements(shapes[name]),
        }

    def inner(name: str, seen: set[str]) -> tuple[set[str], int]:
        ops, flops = {instrs[name]["opcode"]}, instrs[name]["dot_flops"]
        if instrs[name]["opcode"] in _CONTAINERS:
            return ops, flops  # its body runs as separate thunks with their own events
        for comp in instrs[name]["called"]:
            if comp in seen:
                continue
            seen.add(comp)
            for sub in comps.get(comp, []):
                o, f = inner(sub, seen)
                ops |= o
                flops += f
        return ops, flops

    def arithmetic_elements(name: str, seen: set[str]) -> int:
        info, most = instrs[name], 0
        if info["opcode"] not in _DATA_MOVEMENT | {"fusion"}:
            most = info["elements"]
        for comp in info["called"]:
            if comp not in seen and info["opcode"] not in _CONTAINERS:
                seen.add(comp)
                most = max([most] + [arithmetic_elements(sub, seen) for sub in comps.get(comp, [])])
        return most

    for name, info in instrs.items():
        info["ops"], info["dot_flops"] = inner(name, set())
        root = instrs.get(roots.get(info["called"][0], "")) if info["opcode"] == "fusion" and info["called"] else None
        root = root or info
        info["root"] = root["opcode"]
        written = root["elements"]
        if root["opcode"] == "dynamic-update-slice" and len(root["operands"]) > 1:
            written = _elements(shapes.get(root["operands"][1]))
        info["written_elements"] = written
        info["arithmetic_elements"] = arithmetic_elements(name, set())
    return (module.group(1) if module else ""), instrs


def classify_op(info: dict[str, Any] | None) -> str | None:
    """The breakdown category of one HLO instruction (None: a container, not counted)."""
    if info is None:
        return "other"
    ops = info["ops"]
    if info["opcode"] in _CONTAINERS:
        return None
    if ops & {"dot", "convolution"}:
        return "dot"
    if (info["target"] or "").lower() == "topk" or ops & {"topk", "sort"}:
        return "topk"
    if ops & (_EXP_OPS | _REDUCE_OPS):
        return "exp_reduce"
    if ops - {"fusion"} <= _DATA_MOVEMENT:
        return "copy_fill"
    if info["root"] in _DATA_MOVEMENT and info["arithmetic_elements"] * 8 <= info["written_elements"]:
        return "copy_fill"  # e.g. a zero-fill: a broadcast of a scalar computed from one element of x
    return "other"


def read_trace_events(trace_dir: str) -> list[dict[str, Any]]:
    """The complete ('X') events of the profiler's Chrome-format trace under `trace_dir` (the perfetto JSON
    that create_perfetto_trace=True writes, else the *.trace.json.gz next to the xplane)."""
    import glob
    import gzip

    found = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    found = found or glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not found:
        raise RuntimeError(f"no trace JSON under {trace_dir}")
    with gzip.open(sorted(found)[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X"]


def op_breakdown(events, module: str, instrs: dict[str, dict[str, Any]], top: int = 5) -> dict[str, Any]:
    """Per category, the summed duration (ms per call) of the module's op events (args.hlo_op), divided by
    the number of executions (distinct args.run_id) traced."""
    runs: set[str] = set()
    per_op: dict[str, list[float]] = {}  # name -> [total us, executions]
    for e in events:
        a = e.get("args") or {}
        if a.get("hlo_module") != module or "hlo_op" not in a:
            continue
        runs.add(a.get("run_id"))
        acc = per_op.setdefault(a["hlo_op"], [0.0, 0])
        acc[0] += float(e.get("dur", 0.0))
        acc[1] += 1
    calls = max(len(runs), 1)
    cats = {c: 0.0 for c in BREAKDOWN_CATEGORIES}
    tops: dict[str, list[dict[str, Any]]] = {c: [] for c in BREAKDOWN_CATEGORIES}
    with_exp = dot_flops = 0.0
    skipped = 0.0
    for name, (us, n) in per_op.items():
        info = instrs.get(name)
        cat = classify_op(info)
        ms = us / 1e3 / calls
        if cat is None:
            skipped += ms
            continue
        cats[cat] += ms
        if cat == "exp_reduce" and info["ops"] & _EXP_OPS:
            with_exp += ms
        if cat == "dot":
            dot_flops += info["dot_flops"] * n / calls
        trivial = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "fusion"}
        tops[cat].append(
            {
                "name": name,
                "ms": ms,
                "executions_per_call": n / calls,
                "ops": sorted(info["ops"] - trivial) if info else ["(not in the HLO)"],
                "op_name": info["op_name"] if info else None,
                "root": info["root"] if info else None,
                "written_elements": info["written_elements"] if info else None,
                "arithmetic_elements": info["arithmetic_elements"] if info else None,
            }
        )
    total = sum(cats.values())
    return {
        "traced_executions": len(runs),
        "categories_ms": cats,
        "categories_fraction": {c: (v / total if total else 0.0) for c, v in cats.items()},
        "exp_reduce_split_ms": {"with_exp_ms": with_exp, "reduce_only_ms": cats["exp_reduce"] - with_exp},
        "ops_total_ms": total,
        "containers_ms_not_counted": skipped,
        "distinct_ops": {c: len(v) for c, v in tops.items()},
        "top_ops": {c: sorted(v, key=lambda x: -x["ms"])[:top] for c, v in tops.items()},
        "dot_flops_per_call": dot_flops,
    }


def breakdown(shape, dim: int, repeats: int, traced_calls: int, max_run_bytes: float) -> dict[str, Any]:
    """One (N, V) shape on one device, FNC's official default loss + gradient for both low_memory values:
    untimed warm-up, `repeats` timed calls (each paired with the matmul rate sampled before its round, as in
    `matmul_bound`), then `traced_calls` calls under `jax.profiler.trace` into a temporary directory; the
    trace's XLA:CPU op events are summed per category (`_BREAKDOWN_RULES`) from the compiled HLO."""
    import tempfile

    import jax

    from benchmarks.common import matmul_rate

    global_batch, views = shape
    load = {"start": os.getloadavg()} if hasattr(os, "getloadavg") else {}
    rates: list[dict[str, Any]] = [matmul_rate()]
    prepared = []
    for low in (True, False):
        compiled: list[Any] = []
        entry, run = prepare_point(
            "in_batch", "attraction", low, 1, views, global_batch, dim, 0, max_run_bytes, compiled_out=compiled
        )
        prepared.append((entry, run, parse_hlo(compiled[0].as_text())))
    times, over, own = _paired_calls(prepared, repeats, rates)
    rows = []
    for (entry, run, (module, instrs)), ts, rs, os_ in zip(prepared, times, over, own):
        passes = BOUND_PASSES[entry["low_memory"]]
        row = {**_bound_row(entry, global_batch, views), "path": "default" if entry["low_memory"] else "fast"}
        if run is None:
            row["skipped"] = entry["skipped"]
            rows.append(row)
            continue
        with tempfile.TemporaryDirectory(prefix="fnc_breakdown_") as tmp:
            run()
            traced = []
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                for _ in range(traced_calls):
                    traced.append(run())
            events = read_trace_events(tmp)
        ops = op_breakdown(events, module, instrs)
        rate = statistics.median(r["matmul_gflops_per_s"] for r in rates) * 1e9
        traced_wall = statistics.mean(traced) * 1e3
        dot_ms = ops["categories_ms"]["dot"]
        dot_gflops = ops["dot_flops_per_call"] / (dot_ms / 1e3) / 1e9 if dot_ms > 0 else 0.0
        row.update(
            wall_ms=statistics.median(ts) * 1e3,
            wall_ms_per_call=[t * 1e3 for t in ts],
            over_bound=statistics.median(rs),
            over_bound_best=min(rs),
            over_own_matmuls=statistics.median(os_),
            traced_wall_ms=traced_wall,
            traced_wall_ms_per_call=[t * 1e3 for t in traced],
            **ops,
            ops_total_over_traced_wall=ops["ops_total_ms"] / traced_wall,
            matmul_rate_median_gflops_per_s=rate / 1e9,
            bound_ms=passes * entry["flops_per_pass"] / rate * 1e3,
            dot_analytic_flops_per_call=entry["matmul_flops"],
            dot_gflops_per_s=dot_gflops,
            dot_over_matmul_rate=dot_gflops * 1e9 / rate,
            dot_ms_over_their_bound=rate / (dot_gflops * 1e9) if dot_gflops else float("nan"),
            traced_wall_over_bound=traced_wall / (passes * entry["flops_per_pass"] / rate * 1e3),
        )
        cats = "  ".join(f"{c} {v:.1f}" for c, v in ops["categories_ms"].items())
        log(
            f"  N={global_batch} V={views} low_memory={entry['low_memory']!s:5s}: wall {row['wall_ms']:.1f} ms "
            f"({row['over_bound']:.2f}x its {passes}-pass bound); traced {traced_wall:.1f} ms, ops "
            f"{ops['ops_total_ms']:.1f} ms: {cats}; dots {dot_gflops:.0f} GFLOP/s = "
            f"{row['dot_over_matmul_rate']:.2f} of the matmul rate"
        )
        rows.append(row)
    rates.append(matmul_rate())
    log(f"matmul rates: {[r['matmul_gflops_per_s'] for r in rates]} GFLOP/s")
    if load:
        load["end"] = os.getloadavg()
    return {
        "load_average_1_5_15min": load,
        "meaning": "Per path, ms per call of the XLA:CPU ops of a jax.profiler trace (perfetto JSON, events with "
        "args.hlo_op of the module, summed and divided by the traced executions), by category; the ops run one "
        "after another, so ops_total_ms should be close to traced_wall_ms (the profiler adds some overhead to "
        "the traced calls; wall_ms is untraced). dot_gflops_per_s: the dots' FLOPs (from the compiled HLO's dot "
        "shapes, times their executions) over their traced time; dot_over_matmul_rate: that over the median "
        "numpy matmul rate sampled in this run; over_bound: untraced call / (bound_passes * flops_per_pass / "
        "the rate sampled just before it), median over calls, as in matmul_bound.",
        "rules": _BREAKDOWN_RULES,
        "matmul_rate": rates,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# Memory (compile only).


def memory_point(variant, mode, low_memory, devices, views, global_batch, dim, memory_multiplier) -> dict[str, Any]:
    local = global_batch // devices
    columns = num_columns(variant, views, global_batch, memory_multiplier)
    fn, specs, _ = build(variant, mode, low_memory, devices, views, global_batch, dim, memory_multiplier)
    t0 = time.perf_counter()
    compiled = fn.lower(*specs).compile()
    compile_s = time.perf_counter() - t0
    stats = compile_stats(compiled)
    block = local * columns * F32
    entry = {
        "variant": variant,
        "mode": mode,
        "low_memory": low_memory,
        "devices": devices,
        "global_batch_N": global_batch,
        "local_batch_B": local,
        "views_V": views,
        "dim_d": dim,
        "memory_multiplier_M": memory_multiplier if variant == "memory" else None,
        "columns_C": columns,
        "compile_s": compile_s,
        "measured_per_device": stats,
        "theory_per_device": {
            "view_block_bytes": block,
            "view_block_formula": "B*C*4 = " + ("B*V*N*4" if variant == "in_batch" else "B*M*N*4"),
            "all_views_stack_bytes": views * block,
            "all_views_stack_formula": "V*B*C*4 = " + ("B*V*V*N*4" if variant == "in_batch" else "B*V*M*N*4"),
            "gathered_features_bytes": views * global_batch * dim * F32,
            "gathered_features_formula": "V*N*d*4 (all-gathered candidates; their gradient has the same size)",
            "memory_queue_bytes": memory_multiplier * global_batch * dim * F32 if variant == "memory" else 0,
        },
        **analytic_flops(variant, mode, low_memory, views, local, columns, dim),
    }
    if "temp_bytes" in stats:
        entry["temp_over_view_block"] = stats["temp_bytes"] / block
        entry["temp_over_all_views_stack"] = stats["temp_bytes"] / (views * block)
    log(
        f"  memory {variant:8s} {mode:11s} low_memory={low_memory!s:5s} R={devices:3d}: "
        f"temp {stats.get('temp_bytes', float('nan')) / 2**20:10.1f} MiB "
        f"(= {entry.get('temp_over_view_block', float('nan')):6.2f} view blocks), compile {compile_s:.1f} s"
    )
    return entry


def memory_points(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        memory_point(
            p["variant"],
            p["mode"],
            p["low_memory"],
            spec["devices"],
            spec["views"],
            spec["global_batch"],
            spec["dim"],
            spec["memory_multiplier"],
        )
        for p in spec["points"]
    ]


def memory_points_subprocess(spec: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    # The worker replaces the device count in XLA_FLAGS itself.
    return subprocess_json(["--memory-worker", json.dumps(spec)], timeout)


def subprocess_json(flags: list[str], timeout: float = 1800, preload: str | None = None) -> Any:
    """The JSON this benchmark prints with `flags`, from a process of its own (its own device count; with
    `preload`, that library LD_PRELOADed: another malloc)."""
    cmd = [sys.executable, "-m", "benchmarks.objective", *flags]
    env = dict(os.environ) | ({"LD_PRELOAD": preload} if preload else {})
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.objective {flags[0]} failed (rc {proc.returncode})")
    return json.loads(proc.stdout)


def memory_scaling(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, low_memory): measured temp bytes vs devices, and how it tracks the theoretical block."""
    groups: dict[tuple, list] = {}
    for e in entries:
        if "temp_bytes" in e["measured_per_device"]:
            groups.setdefault((e["variant"], e["mode"], e["low_memory"]), []).append(e)
    out = []
    for (variant, mode, low), es in sorted(groups.items(), key=str):
        es = sorted(es, key=lambda e: e["devices"])
        out.append(
            {
                "variant": variant,
                "mode": mode,
                "low_memory": low,
                "devices": [e["devices"] for e in es],
                "temp_mib": [e["measured_per_device"]["temp_bytes"] / 2**20 for e in es],
                "view_block_mib": [e["theory_per_device"]["view_block_bytes"] / 2**20 for e in es],
                "all_views_stack_mib": [e["theory_per_device"]["all_views_stack_bytes"] / 2**20 for e in es],
                "temp_over_view_block": [e["temp_over_view_block"] for e in es],
            }
        )
    # Side by side: low_memory=False / low_memory=True temp bytes at equal variant, mode, devices.
    by_key = {
        (e["variant"], e["mode"], e["low_memory"], e["devices"]): e
        for e in entries
        if "temp_bytes" in e["measured_per_device"]
    }
    for (variant, mode, low, devices), e in sorted(by_key.items(), key=str):
        other = by_key.get((variant, mode, False, devices))
        if low and other:
            out.append(
                {
                    "variant": variant,
                    "mode": mode,
                    "devices": devices,
                    "kind": "temp_low_memory_false_over_true",
                    "ratio": other["measured_per_device"]["temp_bytes"] / e["measured_per_device"]["temp_bytes"],
                    "theory_ratio_V": e["views_V"],
                }
            )
    return out


# ----------------------------------------------------------------------------------------------
# Plans.


def plans(quick: bool, devices: int) -> dict[str, Any]:
    views, dim, m = 10, 128, 16
    if quick:
        # Few compiles (they dominate at these sizes): every mode (low_memory=True) and attraction with
        # low_memory=False in-batch on one device; FNC vs baseline for the memory variant and sharded.
        timing = [("in_batch", mode, True, 1, 64) for mode in MODE_CONFIGS] + [("in_batch", "attraction", False, 1, 64)]
        timing += [("memory", mode, True, 1, 64) for mode in ("attraction", "none")]
        timing += [("in_batch", mode, True, devices, 64) for mode in ("attraction", "none")]
        timing += [("in_batch", mode, True, 1, 64) for mode in DEBIASED_MODES]
        timing += [("in_batch", "hcl_elimination", True, devices, 64)]
        memory = {
            8 if devices >= 8 else devices: [
                {"variant": "in_batch", "mode": "attraction", "low_memory": lo} for lo in (True, False)
            ]
        }
        return {
            "views": views,
            "dim": dim,
            "memory_multiplier": m,
            "timing": timing,
            "repeats": 3,
            "memory": memory,
            "bound_shapes": [(64, 10)],
            "breakdown_shape": (128, 10),
        }
    timing = []
    for n in (256, 1024):
        for variant in ("in_batch", "memory"):
            for mode in MODE_CONFIGS if variant == "memory" else {**MODE_CONFIGS, **DEBIASED_MODES}:
                for low in (True, False):
                    timing.append((variant, mode, low, 1, n))
    for variant in ("in_batch", "memory"):
        for mode in MODE_CONFIGS if variant == "memory" else {**MODE_CONFIGS, **DEBIASED_MODES}:
            for low in (True, False):
                timing.append((variant, mode, low, devices, 1024))
    points = [
        {"variant": v, "mode": "attraction", "low_memory": lo} for v in ("in_batch", "memory") for lo in (True, False)
    ]
    points += [{"variant": v, "mode": "none", "low_memory": True} for v in ("in_batch", "memory")]
    points += [{"variant": "in_batch", "mode": mode, "low_memory": True} for mode in DEBIASED_MODES]
    memory = {r: points for r in (1, 8, 32, 128)}
    return {
        "views": views,
        "dim": dim,
        "memory_multiplier": m,
        "timing": timing,
        "repeats": 5,
        "memory": memory,
        "bound_shapes": BOUND_SHAPES,
        "breakdown_shape": BREAKDOWN_SHAPE,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one official-scale compile (< 1 min)")
    parser.add_argument(
        "--devices",
        type=int,
        default=int(os.environ.get("FNC_BENCH_DEVICES", 8)),
        help="simulated devices of the sharded timing (env FNC_BENCH_DEVICES, default 8)",
    )
    parser.add_argument(
        "--max-run-bytes",
        type=float,
        default=4 * 2**30,
        help="skip timing a configuration whose compiled bytes over all devices exceed this",
    )
    parser.add_argument(
        "--matmul-bound-only",
        action="store_true",
        help="only the comparison with the matmul-bound time (N x V = 256x10, 512x10, 1024x10, one device)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="only where one call's time goes: profiler trace of the default and fast paths at N x V = 1024x10 "
        "(one device; --quick: 128x10), ms per op category, the dots' GFLOP/s against the matmul rate",
    )
    parser.add_argument("--output", help="also write the JSON to this file")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)  # internal: JSON spec, one device count
    args = parser.parse_args(argv)

    if args.memory_worker:
        spec = json.loads(args.memory_worker)
        set_device_count(spec["devices"])
        print(json.dumps(memory_points(spec)))
        return 0

    plan = plans(args.quick, args.devices)
    in_process = max([args.devices] + [r for r in plan["memory"] if r <= max(args.devices, 8)])
    # The one-device sections run without simulated devices: forcing 8 host devices makes XLA:CPU run a
    # one-device computation about 20% slower (the calls compete with the other devices' thread pools).
    set_device_count(1 if args.matmul_bound_only or args.breakdown else in_process)
    start = time.perf_counter()
    import jax

    result: dict[str, Any] = {
        "benchmark": "fnc_jax.objectives loss + gradient (jax.value_and_grad w.r.t. the online embeddings)",
        "quick": args.quick,
        "machine": common_machine(),
        "units": {"time": "seconds", "memory": "bytes (per device) unless the key says MiB", "flops": "FLOP"},
        "notes": [
            "Times: median of `repeats` calls after compile and one warm-up call, block_until_ready; the repeats of "
            "configurations of one (variant, devices, N) group are interleaved; "
            "simulated devices share this machine's CPU cores, so sharded times measure overhead, not speed-up.",
            "memory_analysis() of an SPMD executable is per device (argument bytes = the local shard).",
            "cost_analysis() counts a while loop's body once: low_memory=True (lax.scan over views) FLOPs are "
            "lower bounds; use matmul_flops (analytic) to compare.",
            "Inputs are clustered (same-cluster cosine ~0.7) so that the FN selection is not empty.",
            "AbstractMesh lowering works with lowering_platforms=('cpu',), but compile() needs a device "
            "assignment, hence one subprocess per device count above the in-process count.",
        ],
        "official_scale": OFFICIAL,
    }

    views, dim, mm = plan["views"], plan["dim"], plan["memory_multiplier"]
    if args.breakdown:
        shape = plan["breakdown_shape"]
        log(f"breakdown of one call at N x V = {shape[0]}x{shape[1]} (profiler trace)")
        result["breakdown"] = breakdown(shape, dim, plan["repeats"], 2 if args.quick else 3, args.max_run_bytes)
        return _finish(result, start, args.output)
    if args.matmul_bound_only:
        log("against the matmul-bound time")
        result["matmul_bound"] = matmul_bound(plan["bound_shapes"], dim, plan["repeats"], args.max_run_bytes)
        return _finish(result, start, args.output)
    log("against the matmul-bound time (a subprocess with one device)")
    bound_flags = ["--matmul-bound-only"] + ["--quick"] * args.quick
    result["matmul_bound"] = subprocess_json(bound_flags)["matmul_bound"]
    tcmalloc = tcmalloc_library()
    if tcmalloc and result["matmul_bound"]["allocator"] != "tcmalloc":  # side by side: the same on tcmalloc
        log(f"against the matmul-bound time, on tcmalloc ({tcmalloc})")
        result["matmul_bound_tcmalloc"] = subprocess_json(bound_flags, preload=tcmalloc)["matmul_bound"]
    log(f"timing ({len(plan['timing'])} configurations, {plan['repeats']} interleaved repeats)")
    groups: dict[tuple, list] = {}
    for config in plan["timing"]:  # side by side per (variant, devices, N)
        groups.setdefault((config[0], config[3], config[4]), []).append(config)
    timing = []
    for configs in groups.values():
        timing += time_group(configs, views, dim, mm, plan["repeats"], args.max_run_bytes)
    result["timing"] = {"repeats": plan["repeats"], "entries": timing, "ratios": timing_ratios(timing)}

    log("memory at the official scale (compile only)")
    memory: list[dict[str, Any]] = []
    for r, points in sorted(plan["memory"].items()):
        spec = {
            "devices": r,
            "views": OFFICIAL["views"],
            "global_batch": OFFICIAL["global_batch"],
            "dim": OFFICIAL["dim"],
            "memory_multiplier": OFFICIAL["memory_multiplier"],
            "points": points,
        }
        if r <= jax.device_count():
            memory += memory_points(spec)
        else:
            memory += memory_points_subprocess(spec, timeout=900)
    result["memory"] = {"entries": memory, "scaling": memory_scaling(memory)}
    return _finish(result, start, args.output)


def _finish(result: dict[str, Any], start: float, output: str | None) -> int:
    result["elapsed_s"] = time.perf_counter() - start
    text = json.dumps(result, indent=1)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
