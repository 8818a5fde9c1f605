"""fnc_jax.distributed: env detection, flag validation, and a real two-process CPU run."""

import copy
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest
from absl import flags

from fnc_jax import distributed

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- env detection

_SLURM_STEP = {
    "SLURM_JOB_ID": "1234",
    "SLURM_STEP_NODELIST": "node[001-002]",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "3",
}


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, False),
        ({"HOME": "/root", "PATH": "/usr/bin"}, False),
        (_SLURM_STEP, True),
        ({**_SLURM_STEP, "SLURM_NTASKS": "1"}, False),  # srun -n1: one process
        # Inside the sbatch script itself (no srun): no step node list, a single Python process.
        ({k: v for k, v in _SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}, False),
        ({**_SLURM_STEP, "SLURM_NTASKS": "garbage"}, False),
        ({"OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "4"}, True),
        ({"OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "1"}, False),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, False),  # no mpirun URI: JAX cannot auto-detect it
        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3", "TPU_WORKER_ID": "2"}, True),
        ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, False),  # single-host slice
        # JAX prefers TPU_PROCESS_ADDRESSES over TPU_WORKER_HOSTNAMES.
        ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476", "TPU_WORKER_HOSTNAMES": "a,b"}, False),
        ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, True),
        ({"MEGASCALE_NUM_SLICES": "2", "TPU_WORKER_HOSTNAMES": "localhost"}, True),
        ({"MEGASCALE_NUM_SLICES": "1"}, False),
    ],
)
def test_is_multiprocess_environment(environ, expected):
    assert distributed.is_multiprocess_environment(environ) is expected


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, missing",
    [
        (dict(coordinator_address="h:1", num_processes=2, process_id=None), "--process_id"),
        (dict(coordinator_address=None, num_processes=2, process_id=0), "--coordinator_address"),
        (dict(coordinator_address="h:1", num_processes=None, process_id=0), "--num_processes"),
    ],
)
def test_partial_flags_name_the_missing_one(kwargs, missing):
    with pytest.raises(ValueError, match=missing):
        distributed.initialize(**kwargs)


@pytest.mark.parametrize("num_processes, process_id", [(0, 0), (2, 2), (2, -1)])
def test_inconsistent_flags_rejected(num_processes, process_id):
    with pytest.raises(ValueError, match="--(num_processes|process_id)"):
        distributed.initialize(coordinator_address="h:1", num_processes=num_processes, process_id=process_id)


def test_single_process_does_nothing(monkeypatch):
    # Runs in the pytest process: it must neither initialise jax.distributed nor fail.
    import jax

    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(distributed, "_running_on_cloud_tpu_vm", lambda: False)
    distributed.initialize(coordinator_address=None, num_processes=None, process_id=None)
    assert not jax.distributed.is_initialized()


def test_auto_detected_environment_calls_initialize_without_arguments(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "_use_gloo_cpu_collectives", lambda: None)
    for name, value in _SLURM_STEP.items():
        monkeypatch.setenv(name, value)
    distributed.initialize(coordinator_address=None, num_processes=None, process_id=None)
    assert calls == [{"initialization_timeout": 300}]


def test_flags_defined_and_forwarded(monkeypatch):
    distributed.define_flags()
    distributed.define_flags()  # idempotent: the entry point and tests may both call it
    fv = flags.FlagValues()  # parse copies, so the global FLAGS stay untouched for other tests
    for name in ("coordinator_address", "num_processes", "process_id"):
        assert name in flags.FLAGS
        fv[name] = copy.deepcopy(flags.FLAGS[name])
    fv(["prog", "--coordinator_address=10.0.0.1:1234", "--num_processes=4", "--process_id=1"])
    seen = {}
    monkeypatch.setattr(flags, "FLAGS", fv)
    monkeypatch.setattr(distributed, "initialize", lambda **kw: seen.update(kw))
    distributed.initialize_from_flags()
    assert seen == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 1}


# ----------------------------------------------------------------------------- two real processes

_WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    from fnc_jax import distributed

    # As with older JAX defaults: no CPU collectives. initialize() must select gloo itself.
    jax.config.update("jax_cpu_collectives_implementation", None)

    distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]), initialization_timeout=30)

    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))  # all 4 devices of both processes
    # Process p holds rows [2p, 2p+1] of the global vector [1, 2, 3, 4].
    local = np.arange(2, dtype=np.float32) + 2 * jax.process_index() + 1
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "data"), mesh=mesh,
                                 in_specs=P("data"), out_specs=P()))
    # all_gather's result is identical on every device, but shard_map's replication check does not
    # infer that, hence check_vma=False.
    gather = jax.jit(jax.shard_map(lambda a: jax.lax.all_gather(a, "data", tiled=True), mesh=mesh,
                                   in_specs=P("data"), out_specs=P(), check_vma=False))
    print("RESULT " + json.dumps({
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "psum": np.asarray(psum(x).addressable_data(0)).tolist(),
        "gather": np.asarray(gather(x).addressable_data(0)).tolist(),
    }), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_cross_process_collectives():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_"))}
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",  # replaces conftest's 8
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
    )
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, address, str(i)],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            # A crashed peer makes the other one fail its connect/collective within the timeouts;
            # this bound is the last resort so CI can never hang.
            try:
                outputs.append(p.communicate(timeout=60)[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {len(outputs)} did not finish in 60 s; outputs so far: {outputs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out}"
    results = [
        json.loads(line[len("RESULT ") :]) for out in outputs for line in out.splitlines() if line.startswith("RESULT ")
    ]
    assert sorted(r["process_index"] for r in results) == [0, 1]
    for r in results:
        assert r["process_count"] == 2
        assert r["device_count"] == 4
        assert r["local_device_count"] == 2
        assert r["psum"] == [10.0]
        assert r["gather"] == [1.0, 2.0, 3.0, 4.0]
