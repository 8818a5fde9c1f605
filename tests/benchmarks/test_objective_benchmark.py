"""Smoke test of the objective benchmark: `python -m benchmarks.objective --quick` runs and its JSON is sane."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks.common import tcmalloc_library

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
    assert bound["allocator"] == quick_result["machine"]["allocator"]
    if quick_result["machine"]["allocator"] != "tcmalloc" and tcmalloc_library():  # side by side on tcmalloc
        on_tcmalloc = quick_result["matmul_bound_tcmalloc"]
        assert on_tcmalloc["allocator"] == "tcmalloc"
        assert [(r["global_batch_N"], r["low_memory"]) for r in on_tcmalloc["rows"]] == [
            (r["global_batch_N"], r["low_memory"]) for r in rows
        ]


def _allocator_in_subprocess(preload: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | ({"LD_PRELOAD": preload} if preload else {})
    code = "from benchmarks.common import allocator; print(allocator())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_allocator_names_the_malloc_in_use():
    assert _allocator_in_subprocess(None) == "glibc"
    if tcmalloc_library() is None:
        pytest.skip("no tcmalloc library on this machine (apt install libtcmalloc-minimal4)")
    assert _allocator_in_subprocess(tcmalloc_library()) == "tcmalloc"


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
        assert cats["dot"] > 0 and cats["exp_reduce"] > 0 and cats["topk"] > 0 and cats["copy_fill"] > 0
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


# A cut-down optimized XLA:CPU module (the shapes of the fast path's ops): a matmul in a __ynn_fusion, a
# zero-fill (broadcast of a scalar computed from x), a tile store (dynamic-update-slice with index
# arithmetic), an exp + row sum, an element-wise maximum, TopK and a while loop.
HLO = """HloModule jit_loss, is_scheduled=true

%fused_dot (p0: f32[1024,128], p1: f32[512,128]) -> f32[1024,512] {
  %p0 = f32[1024,128]{1,0} parameter(0)
  %p1 = f32[512,128]{1,0} parameter(1)
  ROOT %dot_general.1 = f32[1024,512]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

%fill (q0: f32[10,1024,128]) -> f32[10,20,1024,512] {
  %q0 = f32[10,1024,128]{2,1,0} parameter(0)
  %slice.1 = f32[1,1,1]{2,1,0} slice(%q0), slice={[0:1], [0:1], [0:1]}
  %c = f32[1,1,1]{2,1,0} constant({ { {0} } })
  %mul.1 = f32[1,1,1]{2,1,0} multiply(%slice.1, %c)
  %bitcast.1 = f32[] bitcast(%mul.1)
  ROOT %b = f32[10,20,1024,512]{3,2,1,0} broadcast(%bitcast.1), dimensions={}
}

%store (r0: f32[10,20,1024,512], r1: s32[], r2: f32[1024,512]) -> f32[10,20,1024,512] {
  %r0 = f32[10,20,1024,512]{3,2,1,0} parameter(0)
  %r2 = f32[1024,512]{1,0} parameter(2)
  %bitcast.2 = f32[1,1,1024,512]{3,2,1,0} bitcast(%r2)
  %r1 = s32[] parameter(1)
  %k = s32[] constant(10)
  %add.1 = s32[] add(%r1, %k)
  %z = s32[] constant(0)
  ROOT %dus = f32[10,20,1024,512]{3,2,1,0} dynamic-update-slice(%r0, %bitcast.2, %add.1, %r1, %z, %z)
}

%sum (s0: f32[], s1: f32[]) -> f32[] {
  %s0 = f32[] parameter(0)
  %s1 = f32[] parameter(1)
  ROOT %add.2 = f32[] add(%s0, %s1)
}

%expsum (t0: f32[1024,512]) -> f32[1024] {
  %t0 = f32[1024,512]{1,0} parameter(0)
  %exp.1 = f32[1024,512]{1,0} exponential(%t0)
  %zero = f32[] constant(0)
  ROOT %reduce.1 = f32[1024]{0} reduce(%exp.1, %zero), dimensions={1}, to_apply=%sum
}

%wrapped_maximum_computation (u0: f32[1024,512], u1: f32[1024,512]) -> f32[1024,512] {
  %u0 = f32[1024,512]{1,0} parameter(0)
  %u1 = f32[1024,512]{1,0} parameter(1)
  ROOT %maximum.1 = f32[1024,512]{1,0} maximum(%u0, %u1)
}

ENTRY %main.1 (x.1: f32[10,1024,128], a.1: f32[1024,128], b.1: f32[512,128], i.1: s32[]) -> f32[1024,512] {
  %x.1 = f32[10,1024,128]{2,1,0} parameter(0)
  %a.1 = f32[1024,128]{1,0} parameter(1)
  %b.1 = f32[512,128]{1,0} parameter(2)
  %i.1 = s32[] parameter(3)
  %ynn_fusion.1 = f32[1024,512]{1,0} fusion(%a.1, %b.1), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(loss)/dot_general"}, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %bitcast_broadcast_fusion.1 = f32[10,20,1024,512]{3,2,1,0} fusion(%x.1), kind=kLoop, calls=%fill
  %store_fusion = f32[10,20,1024,512]{3,2,1,0} fusion(%bitcast_broadcast_fusion.1, %i.1, %ynn_fusion.1), kind=kLoop, calls=%store
  %ynn_fusion = f32[1024]{0} fusion(%ynn_fusion.1), kind=kCustom, calls=%expsum
  %wrapped_maximum = f32[1024,512]{1,0} fusion(%ynn_fusion.1, %ynn_fusion.1), kind=kLoop, calls=%wrapped_maximum_computation
  %custom-call = (f32[1024,10]{1,0}, s32[1024,10]{1,0}) custom-call(%ynn_fusion.1), custom_call_target="TopK"
  ROOT %copy.1 = f32[1024,512]{1,0} copy(%wrapped_maximum)
}
"""


def test_breakdown_categories_from_hlo():
    from benchmarks.objective import classify_op, op_breakdown, parse_hlo

    module, instrs = parse_hlo(HLO)
    assert module == "jit_loss"
    assert instrs["ynn_fusion.1"]["dot_flops"] == 2 * 1024 * 512 * 128
    expected = {
        "ynn_fusion.1": "dot",
        "bitcast_broadcast_fusion.1": "copy_fill",  # zero-fill: arithmetic on one element only
        "store_fusion": "copy_fill",  # tile store: index arithmetic only
        "ynn_fusion": "exp_reduce",
        "wrapped_maximum": "other",
        "custom-call": "topk",
        "copy.1": "copy_fill",
    }
    assert {name: classify_op(instrs[name]) for name in expected} == expected
    assert instrs["store_fusion"]["written_elements"] == 1024 * 512  # the update, not the buffer

    def event(name, dur, run):
        args = {"hlo_module": "jit_loss", "hlo_op": name, "run_id": run}
        return {"ph": "X", "name": name, "dur": dur, "args": args}

    events = [event(n, 1000.0, r) for r in ("1", "2") for n in expected] + [event("while.3", 9000.0, "1")]
    events.append({"ph": "X", "name": "unrelated", "dur": 5.0, "args": {"hlo_module": "other", "hlo_op": "x"}})
    instrs["while.3"] = {**instrs["copy.1"], "opcode": "while"}
    out = op_breakdown(events, module, instrs)
    assert out["traced_executions"] == 2
    assert out["categories_ms"] == {"dot": 1.0, "exp_reduce": 1.0, "topk": 1.0, "copy_fill": 3.0, "other": 1.0}
    assert out["containers_ms_not_counted"] == 4.5 and out["ops_total_ms"] == 7.0
    assert out["dot_flops_per_call"] == 2 * 1024 * 512 * 128
