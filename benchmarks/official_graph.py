"""Side by side: fnc_jax's loss + gradient against the official TF1 graph (google-research/fnc), on this CPU.

Usage (from the repository root):

    python -m benchmarks.official_graph --official-dir DIR [--shapes 256x10,512x10,1024x10] [--repeats 7]
        [--output FILE]

DIR is a checkout of https://github.com/google-research/fnc: its `objective.py` (`add_contrastive_loss`)
is imported from DIR at run time and never copied into this repository. Without such a file the script
stops with a one-line error (exit 2) before anything runs.

Prints ONE JSON object to stdout (progress goes to stderr). What is compared, per N x V shape (d = 128):
the official default FNC loss (multi-view attraction, `hidden_norm=True`, temperature 0.1, absl FLAGS
`support_size = V - 2`, `fn_topk = 10`, `fn_threshold = 0.7`) and its gradient with respect to the
projections, against `fnc_jax.objectives.fnc_loss` with `FNConfig()` (the official default) through
`jax.jit(jax.value_and_grad(...))` for `low_memory=True` ("default", 4 matmul passes) and
`low_memory=False` ("fast", 3 passes). Inputs: `benchmarks.objective.make_inputs("in_batch", V, N, d, 16)`
(clustered, so that the false-negative selection is not empty), (V, N, d); the official placeholder gets
`x.reshape(V*N, d)` (view-major rows: `tf.split` into V chunks gives the views).

How: every measurement runs in a fresh subprocess of this module (`--worker`, internal), so TensorFlow and
JAX never share a process or thread pools; per shape the order is official, ours, official, ours (two
rounds). The official worker builds the graph in `tensorflow.compat.v1` graph mode (a float32 placeholder
(V*N, d), `loss = objective.add_contrastive_loss(h, hidden_norm=True, temperature=0.1)`,
`grad = tf.gradients(loss, h)[0]`) and times `sess.run([loss, grad])`; the ours worker compiles both
paths ahead (one CPU device, no simulated devices: those slow a one-device call by about 20%) and times
the call with `block_until_ready`. Protocol of both: two warm-up calls, then `--repeats` rounds of: one
matmul-rate sample (`benchmarks.common.matmul_rate(repeats=1)`), then the median of 3 calls after 2 untimed
ones (`benchmarks.common.warm_median`: the sample's product evicts the caches; in the ours worker the two
paths take turns within a round).

Fields of each entry of `shapes`:

- `global_batch_N`, `views_V`, `dim_d`: the shape.
- `official`: `median_ms` (median over the rounds of each round's median call time), `best_ms` (fastest
  call of all rounds), `round_median_ms`, `times_ms` (per round), `loss` (first round), `tensorflow`.
- `ours`: the same per path (`default`: low_memory=True, `fast`: low_memory=False), plus `compile_s`.
- `official_over_ours`: per path, official `median_ms` / ours `median_ms` (above 1: fnc_jax is faster).
- `loss_abs_diff`: per path, |official loss - ours| (float32, same inputs).
- `grad_max_abs_diff`: per path, max |official gradient (reshaped to (V, N, d)) - ours|; `grad_max_abs`
  is the official gradient's largest entry, for scale.
- `matmul_rates_gflops_per_s`: every rate sample of the shape, per side (`official`, `ours`), and
  `matmul_rate_median_gflops_per_s` (over both sides): these VMs drift, so times are only comparable at a
  known rate.
- `bound_4pass_ms`: 4 * 2*(V*N)**2*d FLOPs (four passes over the (V*N) x (V*N) similarity matrix: the
  default path's forward and recompute, two gradient products) at the median matmul rate;
  `official_over_bound` and `ours_over_bound` (per path): each side's `median_ms` over it;
  `official_over_bound_paired` / `ours_over_bound_paired`: the median over calls of each call's time over
  the bound at the rate sampled just before it (robust to the machine's drift within a run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.common import REPO_ROOT, emit, log, machine, set_device_count

DEFAULT_SHAPES = "256x10,512x10,1024x10"
DIM = 128
MEMORY_MULTIPLIER = 16  # make_inputs' argument; unused by the in-batch inputs
TEMPERATURE = 0.1
FN_TOPK = 10
FN_THRESHOLD = 0.7
ROUNDS = 2
PATHS = {"default": True, "fast": False}  # path name -> low_memory
BOUND_PASSES = 4
OFFICIAL_URL = "https://github.com/google-research/fnc"


def official_objective(official_dir: str) -> str | None:
    """Path of DIR's objective.py when it defines add_contrastive_loss, else None."""
    path = os.path.join(official_dir, "objective.py")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return path if re.search(r"^\s*def\s+add_contrastive_loss\s*\(", text, re.M) else None


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'256x10,512x10' -> [(256, 10), (512, 10)] as (N, V)."""
    shapes = []
    for item in text.split(","):
        n, v = item.strip().lower().split("x")
        shapes.append((int(n), int(v)))
    return shapes


def inputs(views: int, global_batch: int):
    import numpy as np

    from benchmarks.objective import make_inputs

    return np.asarray(make_inputs("in_batch", views, global_batch, DIM, MEMORY_MULTIPLIER)[0])  # (V, N, d)


# ----------------------------------------------------------------------------------------------
# Workers (one fresh process each).


def _timed_rounds(runs: dict[str, Any], repeats: int) -> tuple[dict[str, list[float]], list[float], dict[str, Any]]:
    """Two warm-up calls of each run, then `repeats` rounds of: a matmul-rate sample, then per run the median
    of `TIMED_CALLS` calls after `WARM_CALLS` untimed ones (`benchmarks.common.warm_median`). Returns (times
    in s per run, rate samples in GFLOP/s, last output per run)."""
    from benchmarks.common import matmul_rate, warm_median

    outs = {}
    for name, run in runs.items():
        outs[name] = run()
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    rates = []

    def timed(name: str) -> float:
        start = time.perf_counter()
        outs[name] = runs[name]()
        return time.perf_counter() - start

    for _ in range(repeats):
        rates.append(matmul_rate(repeats=1)["matmul_gflops_per_s"])
        for name in runs:
            times[name].append(warm_median(lambda name=name: timed(name)))
    return times, rates, outs


def official_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import importlib

    import numpy as np

    views, batch = spec["views"], spec["global_batch"]
    sys.path.insert(0, os.path.abspath(spec["official_dir"]))
    objective = importlib.import_module("objective")
    from absl import flags

    for name, define, value in (
        ("support_size", flags.DEFINE_integer, views - 2),
        ("fn_topk", flags.DEFINE_integer, FN_TOPK),
        ("fn_threshold", flags.DEFINE_float, FN_THRESHOLD),
    ):
        if name not in flags.FLAGS:
            define(name, value, "set by benchmarks.official_graph")
    flags.FLAGS(["x"])
    flags.FLAGS.support_size, flags.FLAGS.fn_topk, flags.FLAGS.fn_threshold = views - 2, FN_TOPK, FN_THRESHOLD

    import tensorflow.compat.v1 as tf

    tf.disable_eager_execution()
    x = inputs(views, batch)
    h = tf.placeholder(tf.float32, [views * batch, DIM])
    loss = objective.add_contrastive_loss(h, hidden_norm=True, temperature=TEMPERATURE)
    grad = tf.gradients(loss, h)[0]
    sess = tf.Session()
    feed = {h: x.reshape(views * batch, DIM)}
    times, rates, outs = _timed_rounds({"official": lambda: sess.run([loss, grad], feed)}, spec["repeats"])
    value, g = outs["official"]
    if spec.get("grad_out"):
        np.save(spec["grad_out"], np.asarray(g, np.float32).reshape(views, batch, DIM))
    return {"times_s": times, "rates": rates, "loss": {"official": float(value)}, "version": tf.__version__}


def ours_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    import numpy as np

    from fnc_jax.objectives import fnc_loss

    views, batch = spec["views"], spec["global_batch"]
    xj = jax.device_put(inputs(views, batch))
    runs, compile_s = {}, {}
    for path, low in PATHS.items():
        start = time.perf_counter()
        f = jax.jit(jax.value_and_grad(lambda e, low=low: fnc_loss(e, low_memory=low)[0])).lower(xj).compile()
        compile_s[path] = time.perf_counter() - start
        runs[path] = lambda f=f: jax.block_until_ready(f(xj))
    times, rates, outs = _timed_rounds(runs, spec["repeats"])
    if spec.get("grad_out"):
        np.savez(spec["grad_out"], **{path: np.asarray(outs[path][1]) for path in PATHS})
    return {
        "times_s": times,
        "rates": rates,
        "loss": {path: float(outs[path][0]) for path in PATHS},
        "compile_s": compile_s,
        "version": jax.__version__,
        "devices": jax.device_count(),
    }


def run_worker(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    out = spec["result_out"]
    cmd = [sys.executable, "-m", "benchmarks.official_graph", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise RuntimeError(f"{spec['side']} worker failed (rc {proc.returncode}) at N={spec['global_batch']}")
    with open(out) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# Per shape.


def _side_summary(round_times: list[list[float]]) -> dict[str, Any]:
    medians = [statistics.median(ts) * 1e3 for ts in round_times]
    return {
        "median_ms": statistics.median(medians),
        "best_ms": min(min(ts) for ts in round_times) * 1e3,
        "round_median_ms": medians,
        "times_ms": [[t * 1e3 for t in ts] for ts in round_times],
    }


def compare_shape(official_dir: str, global_batch: int, views: int, repeats: int, tmp: str) -> dict[str, Any]:
    import numpy as np

    base = {"official_dir": official_dir, "global_batch": global_batch, "views": views, "repeats": repeats}
    results: dict[str, list[dict[str, Any]]] = {"official": [], "ours": []}
    grads = {"official": os.path.join(tmp, f"official_{global_batch}x{views}.npy")}
    grads["ours"] = os.path.join(tmp, f"ours_{global_batch}x{views}.npz")
    for r in range(ROUNDS):
        for side in ("official", "ours"):
            spec = {**base, "side": side, "result_out": os.path.join(tmp, f"{side}_{global_batch}x{views}_{r}.json")}
            if r == 0:
                spec["grad_out"] = grads[side]
            res = run_worker(spec)
            results[side].append(res)
            ms = {k: f"{statistics.median(v) * 1e3:.1f}" for k, v in res["times_s"].items()}
            log(f"  N={global_batch} V={views} round {r + 1} {side}: median ms {ms}")

    official = {
        **_side_summary([res["times_s"]["official"] for res in results["official"]]),
        "loss": results["official"][0]["loss"]["official"],
        "tensorflow": results["official"][0]["version"],
    }
    ours = {
        path: {
            **_side_summary([res["times_s"][path] for res in results["ours"]]),
            "loss": results["ours"][0]["loss"][path],
            "compile_s": [res["compile_s"][path] for res in results["ours"]],
        }
        for path in PATHS
    }
    g_official = np.load(grads["official"])
    with np.load(grads["ours"]) as g_ours_all:
        g_ours = {path: g_ours_all[path] for path in PATHS}
    rates = {side: [x for res in results[side] for x in res["rates"]] for side in results}
    rate = statistics.median(rates["official"] + rates["ours"])
    bound_flops = BOUND_PASSES * 2 * (views * global_batch) ** 2 * DIM
    bound_ms = bound_flops / (rate * 1e9) * 1e3

    def paired(side: str, name: str) -> float:
        """Median over calls of time / the bound at the rate sampled just before the call (drift-proof)."""
        return statistics.median(
            t / (bound_flops / (r * 1e9)) for res in results[side] for t, r in zip(res["times_s"][name], res["rates"])
        )

    entry = {
        "global_batch_N": global_batch,
        "views_V": views,
        "dim_d": DIM,
        "official": official,
        "ours": ours,
        "jax": results["ours"][0]["version"],
        "jax_devices_in_worker": results["ours"][0]["devices"],
        "official_over_ours": {path: official["median_ms"] / ours[path]["median_ms"] for path in PATHS},
        "loss_abs_diff": {path: abs(official["loss"] - ours[path]["loss"]) for path in PATHS},
        "grad_max_abs_diff": {path: float(np.max(np.abs(g_official - g_ours[path]))) for path in PATHS},
        "grad_max_abs": float(np.max(np.abs(g_official))),
        "matmul_rates_gflops_per_s": rates,
        "matmul_rate_median_gflops_per_s": rate,
        "bound_4pass_ms": bound_ms,
        "official_over_bound": official["median_ms"] / bound_ms,
        "ours_over_bound": {path: ours[path]["median_ms"] / bound_ms for path in PATHS},
        "official_over_bound_paired": paired("official", "official"),
        "ours_over_bound_paired": {path: paired("ours", path) for path in PATHS},
    }
    log(
        f"N={global_batch} V={views}: official {official['median_ms']:.1f} ms (best {official['best_ms']:.1f}), "
        + ", ".join(
            f"ours {p} {ours[p]['median_ms']:.1f} ms (best {ours[p]['best_ms']:.1f}; official/ours "
            f"{entry['official_over_ours'][p]:.2f}x, |dloss| {entry['loss_abs_diff'][p]:.2e}, "
            f"max|dgrad| {entry['grad_max_abs_diff'][p]:.2e})"
            for p in PATHS
        )
        + f"; 4-pass bound {bound_ms:.1f} ms at {rate:.0f} GFLOP/s"
    )
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-dir", help=f"a checkout of {OFFICIAL_URL} (its objective.py is imported)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"N x V shapes, comma-separated ({DEFAULT_SHAPES})")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per worker (default 7)")
    parser.add_argument("--output", help="also write the JSON to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON spec of one measurement
    args = parser.parse_args(argv)

    if args.worker:
        set_device_count(1)  # one CPU device: simulated ones slow a one-device call by about 20%
        spec = json.loads(args.worker)
        result = (official_worker if spec["side"] == "official" else ours_worker)(spec)
        with open(spec["result_out"], "w") as f:
            json.dump(result, f)
        return 0

    path = official_objective(args.official_dir) if args.official_dir else None
    if path is None:
        print(
            f"error: --official-dir {args.official_dir!r} has no objective.py defining add_contrastive_loss "
            f"(pass a checkout of {OFFICIAL_URL})",
            file=sys.stderr,
        )
        return 2
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError:
        print(f"error: --shapes {args.shapes!r} is not a comma-separated list of NxV", file=sys.stderr)
        return 2
    official_dir = os.path.abspath(args.official_dir)

    start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "official TF1 graph (google-research/fnc add_contrastive_loss) vs fnc_jax fnc_loss: "
        "loss + gradient w.r.t. the projections, one CPU process each",
        "official_dir": official_dir,
        "official_objective": path,
        "settings": {
            "dim_d": DIM,
            "temperature": TEMPERATURE,
            "hidden_norm": True,
            "fn_topk": FN_TOPK,
            "fn_threshold": FN_THRESHOLD,
            "support_size": "V - 2",
            "ours": "fnc_loss(e, low_memory=...) with FNConfig() (official default); default: low_memory=True, "
            "fast: low_memory=False",
            "repeats": args.repeats,
            "rounds": ROUNDS,
            "order_per_shape": ["official", "ours"] * ROUNDS,
        },
        "machine": machine(),
        "meaning": {
            "median_ms": "median over the rounds of each round's median call time",
            "best_ms": "fastest call of all rounds",
            "official_over_ours": "official median_ms / ours median_ms per path (above 1: fnc_jax is faster)",
            "loss_abs_diff": "|official loss - ours| per path",
            "grad_max_abs_diff": "max |official grad reshaped to (V, N, d) - ours grad| per path",
            "bound_4pass_ms": "4 * 2*(V*N)**2*d FLOPs at matmul_rate_median_gflops_per_s",
            "official_over_bound / ours_over_bound": "median_ms / bound_4pass_ms",
        },
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="official_graph_") as tmp:
        for global_batch, views in shapes:
            log(f"shape N={global_batch} V={views} (d={DIM}): official, ours x {ROUNDS} rounds")
            rows.append(compare_shape(official_dir, global_batch, views, args.repeats, tmp))
    result["shapes"] = rows
    result["elapsed_s"] = time.perf_counter() - start
    emit(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
