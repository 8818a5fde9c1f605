"""Multi-process start-up: decide whether this run spans several processes and initialise JAX.

A run is one process per host (TPU pod worker) or one process per GPU (SLURM task). Every process
runs the same program; `jax.distributed.initialize` connects them so that `jax.devices()` lists the
devices of *all* processes and jitted computations over a global `Mesh` use cross-process
collectives. It has to happen before anything initialises an XLA backend (`jax.devices()`, the
first computation, `jax.device_put`, ...), which is why `initialize` decides from the environment
alone and touches no device.

How the decision is made (`initialize`):

1. Explicit `coordinator_address`, `num_processes`, `process_id` (all three, or none): passed to
   `jax.distributed.initialize` as given, with JAX's cluster auto-detection switched off so that a
   surrounding scheduler (e.g. running inside a SLURM allocation) cannot silently change them.
2. A scheduler that JAX can auto-detect, with more than one process (`is_multiprocess_environment`):
   SLURM via `srun`, Open MPI via `mpirun`, GKE TPU / multislice env vars. Also any Cloud TPU VM:
   on a TPU VM created with `gcloud compute tpus tpu-vm create` the worker list lives in the GCE
   metadata server, not in the environment, so the process count cannot be read from env vars;
   JAX's own TPU detection (made at `import jax` from the PCI bus, no backend start) tells us we
   are on one, and `jax.distributed.initialize()` then reads the workers from the metadata server
   (a single-host TPU VM simply becomes a 1-process distributed system).
   -> `jax.distributed.initialize()` without arguments, which auto-detects everything.
3. Otherwise a single process: nothing to do (JAX never initialises the distributed system by
   itself, and a 1-process run needs none).

CPU collectives: cross-process collectives on the CPU backend need a CPU collectives library.
Without one (`jax_cpu_collectives_implementation=None`, the default of older JAX releases) a
cross-process computation fails with "Multiprocess computations aren't implemented on the CPU
backend". jax 0.10.2 defaults to "gloo" (TCP, rendezvous through the distributed key-value store),
picked up when the CPU client is created after `jax.distributed.initialize`. We set "gloo" explicitly for multi-process runs unless the user chose
an implementation with `JAX_CPU_COLLECTIVES_IMPLEMENTATION` (e.g. "mpi"), so CPU multi-process runs
(the tests) keep working if the default changes. It only configures the CPU client, so it is
harmless on GPU/TPU hosts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from absl import flags, logging

from fnc_jax import errors

# Env var names JAX's cluster detection (jax/_src/clusters/*.py in jax 0.10.2) reads.
# SlurmCluster.is_env_present needs all of these; `srun` sets them for every task. A bare
# `sbatch` script (no srun) has SLURM_NTASKS but no SLURM_STEP_NODELIST, so it is correctly not
# treated as multi-process: only one Python process would be running there.
_SLURM_REQUIRED = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# OmpiCluster: OMPI_MCA_orte_hnp_uri exists only under mpirun/mpiexec.
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"
_OMPI_SIZE = "OMPI_COMM_WORLD_SIZE"
# GkeTpuCluster: comma-separated worker list of this slice (TPU_PROCESS_ADDRESSES wins if set);
# BaseTpuCluster: MEGASCALE_NUM_SLICES > 1 for multislice. (CLOUD_TPU_TASK_ID was only used by
# old JAX releases and is no longer read.)
_TPU_WORKER_LISTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
_TPU_NUM_SLICES = "MEGASCALE_NUM_SLICES"


def _int_env(environ: Mapping[str, str], name: str) -> int:
    """Integer value of an env var; 0 when unset or not an integer."""
    try:
        return int(environ.get(name, "").strip())
    except ValueError:
        return 0


def is_multiprocess_environment(environ: Mapping[str, str]) -> bool:
    """Whether `environ` describes a scheduler-launched run of more than one process.

    Pure function of the environment (no JAX, no network). True for: a SLURM job step started with
    `srun` with `SLURM_NTASKS` > 1; an Open MPI `mpirun` with more than one rank; a TPU slice whose
    worker list (`TPU_PROCESS_ADDRESSES` / `TPU_WORKER_HOSTNAMES`, set on GKE) has more than one
    host, or a multislice run (`MEGASCALE_NUM_SLICES` > 1). GCE TPU VMs keep their worker list in
    the metadata server instead; `initialize` handles those separately.
    """
    if all(name in environ for name in _SLURM_REQUIRED) and _int_env(environ, "SLURM_NTASKS") > 1:
        return True
    if _OMPI_URI in environ and _int_env(environ, _OMPI_SIZE) > 1:
        return True
    for name in _TPU_WORKER_LISTS:
        if name in environ:  # the first one present is the one JAX uses
            if len([h for h in environ[name].split(",") if h.strip()]) > 1:
                return True
            break
    return _int_env(environ, _TPU_NUM_SLICES) > 1


def _running_on_cloud_tpu_vm() -> bool:
    """JAX's own answer, computed at `import jax` from the PCI bus (TPU chips + libtpu present).

    It is private JAX state; if a future release moves it we fall back to "not a TPU VM", which
    only loses auto-initialisation on GCE TPU pods (explicit flags still work).
    """
    try:
        from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _use_gloo_cpu_collectives() -> None:
    import jax  # pylint: disable=g-import-not-at-top

    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    *,
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    initialization_timeout: int = 300,
) -> None:
    """Initialises `jax.distributed` when this run has several processes; see the module docstring.

    Call it first thing in the program, before any JAX call that could start a backend.

    Args:
      coordinator_address: "host:port" of process 0's coordinator service.
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      initialization_timeout: seconds to wait for all processes to connect.

    Raises:
      ValueError: only some of the three explicit arguments were given, or they are inconsistent.
    """
    import jax  # pylint: disable=g-import-not-at-top

    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if given and len(given) < len(explicit):
        missing = [f"--{name}" for name, value in explicit.items() if value is None]
        raise errors.ConfigError(
            f"Multi-process flags must be given all together or not at all: got "
            f"{', '.join('--' + g for g in given)} but missing {', '.join(missing)}."
        )

    if jax.distributed.is_initialized():
        # E.g. a notebook or test harness that initialised already; initialising twice is an error.
        logging.info("jax.distributed already initialised; leaving it as is.")
        return

    if given:
        if num_processes < 1:
            raise errors.ConfigError(f"--num_processes must be >= 1, got {num_processes}.")
        if not 0 <= process_id < num_processes:
            raise errors.ConfigError(f"--process_id must be in [0, {num_processes}), got {process_id}.")
        logging.info(
            "Initialising jax.distributed from flags: coordinator=%s, process %d of %d.",
            coordinator_address,
            process_id,
            num_processes,
        )
        _use_gloo_cpu_collectives()
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout,
            # Explicit means explicit: without this JAX would still consult SLURM/MPI env vars to
            # fill `local_device_ids` and could hide all but one local GPU.
            cluster_detection_method="deactivate",
        )
    elif is_multiprocess_environment(os.environ) or _running_on_cloud_tpu_vm():
        logging.info("Multi-process environment detected; jax.distributed.initialize() auto-detects.")
        _use_gloo_cpu_collectives()
        jax.distributed.initialize(initialization_timeout=initialization_timeout)
    else:
        logging.info("Single-process run; jax.distributed not initialised.")


def define_flags() -> None:
    """Defines --coordinator_address, --num_processes, --process_id (idempotent)."""
    if "coordinator_address" in flags.FLAGS:
        return
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0 for a manual multi-process run. Leave unset on Cloud TPU pods, "
        "under SLURM (srun) and Open MPI: JAX detects them.",
    )
    flags.DEFINE_integer("num_processes", None, "Total number of processes (manual multi-process run).")
    flags.DEFINE_integer("process_id", None, "Index of this process, 0-based (manual multi-process run).")


def initialize_from_flags() -> None:
    """`initialize` with the values of the flags from `define_flags` (after flag parsing)."""
    initialize(
        coordinator_address=flags.FLAGS.coordinator_address,
        num_processes=flags.FLAGS.num_processes,
        process_id=flags.FLAGS.process_id,
    )
