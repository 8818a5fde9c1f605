"""Smoke tests of the step, input-pipeline and GPU-step benchmarks: `--quick` runs print one sane JSON object.

Each benchmark runs in a subprocess (it sets its own simulated device count before importing JAX). The
step and GPU-step runs are dominated by XLA:CPU compiles (minutes on 2 busy cores, cold); they use the
benchmarks' persistent compilation cache (~/.cache/fnc_jax_benchmarks, or $FNC_JAX_BENCH_CACHE), so
reruns take about a minute. All three are marked slow.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
STEP_VARIANTS = {"fnc_memory", "fnc_in_batch", "baseline_multiview", "simclr_2view"}
PARTS = {
    "device_augment",
    "encoder_forward_backward",
    "projection_head_forward_backward",
    "gradient_all_reduce",
    "ema_forward",
    "cross_device_gather",
    "fn_identification",
    "loss",
    "optimizer_and_state_update",
}


def run_benchmark(module: str, *args: str, timeout: int = 2400) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)  # stdout is exactly one JSON object (logs go to stderr)


def check_machine(m: dict) -> None:
    for key in ("processor", "cpu_count", "python", "date_utc"):
        assert key in m, key
    assert m["cpu_count"] >= 1


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_step_benchmark_quick():
    r = run_benchmark("step", "--objectives", "dcl,hcl")
    assert r["benchmark"] == "step" and r["quick"] is True
    check_machine(r["machine"])
    assert r["machine"]["jax_version"] and r["machine"]["num_devices_in_process"] >= r["shapes"]["devices"]
    assert set(r["variants"]) == STEP_VARIANTS | {"dcl_in_batch", "hcl_in_batch"}
    assert r["variants"]["hcl_in_batch"]["objective"] == "hcl" and r["variants"]["dcl_in_batch"]["fn_mode"] == "none"
    assert positive(r["ratios"]["step_time_dcl_in_batch_over_baseline"])
    for when in ("before", "after"):
        assert positive(r["calibration"][when]["matmul_gflops_per_s"])
    for name, v in r["variants"].items():
        assert positive(v["images_per_s"]) and positive(v["views_per_s"]), name
        assert v["views_per_s"] == pytest.approx(v["images_per_s"] * v["views"])
        assert positive(v["step"]["median_s"]) and math.isfinite(v["last_loss"])
        assert positive(v["flops_per_step_per_device"])
    assert r["variants"]["simclr_2view"]["views"] == 2
    assert r["variants"]["fnc_memory"]["ema"] and r["variants"]["fnc_memory"]["memory_multiplier"] > 0
    assert r["variants"]["baseline_multiview"]["fn_mode"] == "none"
    assert all(positive(x) for x in r["ratios"].values())

    b = r["breakdown"]
    assert "method" in b and b["descriptions"]
    for name in r["variants"]:
        e = b[name]
        assert set(e["shares"]) == PARTS
        assert sum(e["shares"].values()) == pytest.approx(1.0, abs=1e-6)
        assert all(0 <= x <= 1 for x in e["shares"].values())
        assert positive(e["step_s"]) and positive(e["sum_of_parts_s"])
        assert e["share_of_step"]["encoder_forward_backward"] > 0
    assert b["fnc_memory"]["part_seconds"]["ema_forward"] > 0
    for name in ("fnc_in_batch", "baseline_multiview", "simclr_2view"):
        assert b[name]["part_seconds"]["ema_forward"] == 0
    assert b["baseline_multiview"]["part_seconds"]["fn_identification"] == 0

    o = r["official_estimate"]
    assert o["official_per_device"]["local_batch"] == 512 and o["official_per_device"]["memory_rows"] == 65536
    for e in o["loss"]["entries"].values():
        assert positive(e["median_s"]) and positive(e["matmul_flops"])
    assert positive(o["resnet_step"]["estimated_step_s_per_device"])
    pct = o["percent_of_resnet_step"]
    assert positive(pct["fn_identification_plus_fnc_loss_time"]) and positive(
        pct["fn_identification_plus_fnc_loss_flops"]
    )
    assert pct["target_percent"] == 3.0 and "derivation" in o


@pytest.mark.slow
def test_input_pipeline_benchmark_quick():
    r = run_benchmark("input_pipeline")
    assert r["benchmark"] == "input_pipeline" and r["quick"] is True
    check_machine(r["machine"])
    assert r["dataset"]["images"] > 0 and r["dataset"]["mean_jpeg_kb"] > 0
    expected = {
        f"{px}/{v}"
        for px in ("224px", "32px")
        for v in (
            "pretrain_host_randaugment",
            "pretrain_host",
            "pretrain_on_device_colour",
            "pretrain_on_device_crop",
            "eval",
        )
    }
    assert set(r["pipelines"]) == expected
    for name, p in r["pipelines"].items():
        assert positive(p["views_per_s_per_core"]) and positive(p["views_per_s_wall"]), name
        assert len(p["cpus"]) == r["settings"]["cores_per_worker"]
        assert p["views_per_image"] == (1 if name.endswith("eval") else (10 if name.startswith("224") else 4))
    assert all(positive(x) for x in r["ratios"].values())
    d = r["device_side_on_this_cpu"]
    assert positive(d["colour_jitter_grayscale"]["ms_per_view_per_core"]) and positive(
        d["blur"]["ms_per_view_per_core"]
    )
    assert positive(d["crop_resize"]["ms_per_view_per_core"]) and positive(d["crop_resize"]["flops_per_view"])
    s = r["stages_224px"]
    assert all(positive(v["ms_per_image_per_core"]) for v in s["cumulative"].values())
    assert positive(s["stage_speedup_on_device_over_host"])


@pytest.mark.slow
def test_gpu_step_benchmark_quick_on_cpu():
    # A pretend 60 MB device: the probe compile at the smallest batch (8) predicts that 16 does not fit.
    r = run_benchmark("gpu_step", "--assume-bytes-limit", "60000000")
    assert r["benchmark"] == "gpu_step" and r["tiny_model"] is True  # no accelerator in the tests
    check_machine(r["machine"])
    res = r["result"]
    assert res is not None and res["per_device_batch"] in r["shapes"]["candidates"]
    assert positive(res["images_per_s"]) and positive(res["views_per_s"]) and positive(res["achieved_tflops_per_s"])
    assert res["views_per_s"] == pytest.approx(res["images_per_s"] * r["shapes"]["views"])
    assert res["loss_finite"] and res["loss_dtype"] == "float32" and res["params_dtypes"] == ["float32"]
    crop = res["crop_on_device"]
    assert crop["canvas"] == 48 and positive(crop["ms_per_view"]) and 0 < crop["share_of_step"]
    assert r["shapes"]["dtype"] == "bfloat16"
    assert res["mfu"] is None  # no peak is known for a CPU
    assert any(a.get("result") == "ok" for a in r["attempts"])
    probe = r["attempts"][0]
    assert probe["probe"] is True and probe["batch"] == 8 and probe["predicted_largest_fitting"] == 8
    assert res["per_device_batch"] == 8
