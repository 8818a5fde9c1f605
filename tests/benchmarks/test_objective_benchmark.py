"""Smoke test of the objective benchmark: `python -m benchmarks.objective --quick` runs and its JSON is sane."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MODES = {"attraction", "elimination", "none", "dcl", "dcl_elimination", "hcl", "hcl_elimination"}


@pytest.fixture(scope="module")
def quick_result():
    # The benchmark sets its own simulated device count in XLA_FLAGS (replacing conftest's).
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.objective", "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)  # stdout is exactly one JSON object (logs go to stderr)


@pytest.mark.slow
def test_quick_benchmark_json(quick_result):
    r = quick_result
    assert r["quick"] is True
    m = r["machine"]
    for key in ("processor", "cpu_count", "jax_version", "date_utc", "backend"):
        assert key in m
    assert m["cpu_count"] >= 1 and m["num_devices_in_process"] >= 8
    assert r["official_scale"] == {"global_batch": 4096, "views": 10, "dim": 128, "memory_multiplier": 16}
    assert set(r["units"]) >= {"time", "memory", "flops"}

    # Timing: every entry self-describing, positive times, all three modes and both low_memory values.
    entries = r["timing"]["entries"]
    assert entries
    for e in entries:
        for key in (
            "variant",
            "mode",
            "low_memory",
            "devices",
            "global_batch_N",
            "local_batch_B",
            "views_V",
            "dim_d",
            "columns_C",
            "matmul_flops",
            "compiled_per_device",
        ):
            assert key in e, key
        assert e["variant"] in ("in_batch", "memory") and e["mode"] in MODES
        assert e["local_batch_B"] * e["devices"] == e["global_batch_N"]
        assert "skipped" not in e  # the quick shapes are tiny
        assert len(e["times_s"]) == r["timing"]["repeats"] and all(t > 0 for t in e["times_s"])
        assert e["median_s"] > 0 and math.isfinite(e["median_s"])
        assert e["matmul_flops"] > 0
    assert {e["mode"] for e in entries} == MODES
    assert {e["low_memory"] for e in entries} == {True, False}
    assert {e["variant"] for e in entries} == {"in_batch", "memory"}
    assert {e["devices"] for e in entries} >= {1, 8}

    # Ratios: FNC / baseline for both FNC modes, low_memory True / False, all positive.
    ratios = r["timing"]["ratios"]
    kinds = {(x["kind"], x["mode"]) for x in ratios}
    assert ("fnc_over_baseline", "attraction") in kinds and ("fnc_over_baseline", "elimination") in kinds
    assert ("low_memory_true_over_false", "attraction") in kinds
    for x in ratios:
        assert x["ratio"] > 0 and math.isfinite(x["ratio"])
        assert math.isclose(x["ratio"], x["numerator_s"] / x["denominator_s"])
    assert any(x["kind"] == "fnc_over_baseline" and x["devices"] == 8 for x in ratios)


@pytest.mark.slow
def test_quick_benchmark_memory_at_official_scale(quick_result):
    entries = quick_result["memory"]["entries"]
    official = [e for e in entries if e["global_batch_N"] == 4096 and e["views_V"] == 10 and e["dim_d"] == 128]
    assert official
    by_low = {}
    for e in official:
        measured = e["measured_per_device"]
        for key in ("temp_bytes", "argument_bytes", "output_bytes"):
            assert measured[key] >= 0, key
        theory = e["theory_per_device"]
        assert theory["view_block_bytes"] == e["local_batch_B"] * e["columns_C"] * 4
        assert theory["all_views_stack_bytes"] == e["views_V"] * theory["view_block_bytes"]
        by_low[(e["variant"], e["mode"], e["devices"], e["low_memory"])] = measured["temp_bytes"]
    pairs = [(k[:3], v) for k, v in by_low.items() if k[3]]
    assert pairs
    for key, low_true in pairs:
        low_false = by_low[key + (False,)]
        assert 0 < low_true < low_false, (key, low_true, low_false)
    # The default (low_memory=True) holds a few view blocks (B*V*N), less than the stack of all V views'
    # blocks (B*V*V*N) that low_memory=False holds (several times over).
    for e in official:
        temp, stack = e["measured_per_device"]["temp_bytes"], e["theory_per_device"]["all_views_stack_bytes"]
        assert (temp < stack) if e["low_memory"] else (temp > stack)
    scaling = quick_result["memory"]["scaling"]
    assert any(s.get("kind") == "temp_low_memory_false_over_true" and s["ratio"] > 1 for s in scaling)


@pytest.mark.slow
def test_quick_benchmark_against_the_matmul_bound(quick_result):
    bound = quick_result["matmul_bound"]
    assert len(bound["matmul_rate"]) >= 3 and all(r["matmul_gflops_per_s"] > 0 for r in bound["matmul_rate"])
    rows = bound["rows"]
    assert {r["low_memory"] for r in rows} == {True, False}
    for r in rows:
        assert r["bound_passes"] == (4 if r["low_memory"] else 3)
        assert r["flops_per_pass"] == 2 * r["views_V"] * r["global_batch_N"] * r["views_V"] * r["global_batch_N"] * 128
        assert len(r["over_bound_per_call"]) == quick_result["timing"]["repeats"]
        assert 0 < r["over_bound_best"] <= r["over_bound"] and math.isfinite(r["over_bound"])
        assert r["achieved_gflops_per_s"] > 0 and r["temp_mib"] > 0


def test_breakdown_quick():
    """`--breakdown --quick`: both paths traced, categories sane, the traced ops add up to about the wall time."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.objective", "--breakdown", "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout)
    assert r["quick"] is True and "timing" not in r and "matmul_bound" not in r
    b = r["breakdown"]
    assert all(x["matmul_gflops_per_s"] > 0 for x in b["matmul_rate"])
    rows = b["rows"]
    assert {(x["path"], x["low_memory"], x["bound_passes"]) for x in rows} == {("default", True, 4), ("fast", False, 3)}
    for x in rows:
        cats = x["categories_ms"]
        assert set(cats) == {"dot", "exp_reduce", "topk", "copy_fill", "other"}
        assert all(v >= 0 and math.isfinite(v) for v in cats.values())
        assert cats["dot"] > 0 and cats["exp_reduce"] > 0 and cats["topk"] > 0
        assert math.isclose(sum(cats.values()), x["ops_total_ms"])
        assert x["traced_executions"] >= 1
        assert 0.5 < x["ops_total_ms"] / x["traced_wall_ms"] < 1.5, x
        # The dots' FLOPs from the HLO cover the analytic passes (plus the small positives' dot).
        assert 1.0 <= x["dot_flops_per_call"] / x["dot_analytic_flops_per_call"] < 1.2
        assert x["dot_gflops_per_s"] > 0 and x["dot_over_matmul_rate"] > 0
        assert x["over_bound"] > 0 and x["wall_ms"] > 0
        for cat, tops in x["top_ops"].items():
            assert len(tops) <= 5 and all(t["ms"] >= 0 for t in tops), cat
        assert x["top_ops"]["dot"] and all("dot" in t["ops"] for t in x["top_ops"]["dot"])
