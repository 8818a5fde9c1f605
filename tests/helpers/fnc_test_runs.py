"""Shared pieces of the resume / fault / multi-process tests: one tiny config, subprocess runs, checkpoints.

Every end-to-end test in tests/test_resume.py, tests/test_faults.py and
tests/test_multiprocess_training.py trains the same tiny network with the same config (`TINY`), so
the train step is compiled once per device layout and then read back from JAX's persistent
compilation cache (`cache_dir`): the pytest process and every training subprocess of the session
share one cache directory. The cache changes nothing in the computation; it only skips XLA's
compilation of an identical program.

Imported by the tests as `fnc_test_runs` (tests/helpers is put on sys.path by each test module).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# The tiny run: the embedded-MNIST quickstart (configs/default.py) shrunk to seconds per run, in
# memory + EMA mode (the quickstart itself is in-batch), so the queue, its labels, the EMA network
# and the online probe are all part of the state that has to resume. V = 2 views, a queue of
# 2 x 16 = 32 rows (V <= multiplier), device-side blur on (its key is folded with the step).
TINY = {
    "batch_size": 16,
    "total_steps": 8,
    "checkpoint_every_steps": 4,
    "log_every_steps": 1,
    "views.support_size": 0,
    "memory.multiplier": 2,
    "model.proj_layers": 2,
    "model.proj_out_dim": 16,
    "eval.final_report": False,
}

PROGRESS = re.compile(r"^pretrain step (\d+)/(\d+) \|", re.MULTILINE)  # the trainer's progress line


def load_config(name: str = "default", **overrides: Any):
    """configs/<name>.py with dotted-key overrides (e.g. `**{"model.depth": 34}`)."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO_ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict(overrides)
    return config


def tiny_config(**overrides: Any):
    return load_config("default", **{**TINY, **overrides})


# The tiny step of the in-process step and pretraining tests: 16 px, 1/8 width, 1 support view, a
# selection loose enough (top-3, threshold 0) that the FN path always selects something.
STEP = {
    "batch_size": 16,
    "views.support_size": 1,
    "model.width_multiplier": 0.125,
    "model.proj_layers": 2,
    "model.proj_out_dim": 16,
    "data.image_size": 16,
    "eval.final_report": False,
    "fn.topk": 3,
    "fn.threshold": 0.0,
}


def step_config(**overrides: Any):
    return load_config("default", **{**STEP, **overrides})


def cli_args(workdir: pathlib.Path | str, *, config: str = "default", overrides: dict | None = None) -> list[str]:
    """`python -m fnc_jax.main` with the tiny config (plus `overrides`) in `workdir`."""
    args = [sys.executable, "-m", "fnc_jax.main", f"--config=configs/{config}.py", f"--workdir={workdir}"]
    for key, value in {**(TINY if config == "default" else {}), **(overrides or {})}.items():
        args.append(f"--config.{key}={value}")
    return args


def cache_dir(tmp_path_factory) -> pathlib.Path:
    """The session's persistent compilation cache (one directory for every test module and subprocess)."""
    path = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def persistent_cache_in_process(path: pathlib.Path) -> Iterator[None]:
    """Turns JAX's persistent compilation cache on in this (pytest) process, and off again after."""
    import jax  # noqa: PLC0415
    from jax.experimental.compilation_cache import compilation_cache  # noqa: PLC0415

    old_dir = jax.config.jax_compilation_cache_dir
    old_time = jax.config.jax_persistent_cache_min_compile_time_secs
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", old_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_time)
        compilation_cache.reset_cache()


def subprocess_env(*, num_devices: int, cache: pathlib.Path | None) -> dict[str, str]:
    """Environment of a training subprocess: CPU, `num_devices` fake devices, no scheduler variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(
        # The same flag string as conftest's for 8 devices, so the cache keys match the pytest process's.
        XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"]),
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    if cache is not None:
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        )
    return env


def start(args: list[str], log: pathlib.Path, env: dict[str, str]) -> subprocess.Popen:
    """Starts a subprocess in the repository root with stdout+stderr going to `log` (never a pipe)."""
    with open(log, "ab") as out:
        return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def run(args: list[str], log: pathlib.Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Runs a subprocess to the end (killed after `timeout` s); returns (exit code, its output)."""
    proc = start(args, log, env)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{' '.join(args)} did not finish in {timeout} s:\n{tail(log)}") from None
    return code, log.read_text(errors="replace")


def tail(log: pathlib.Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "<no log>"


def wait_for(predicate, *, procs: list[subprocess.Popen], timeout: float, what: str, log: pathlib.Path) -> None:
    """Polls `predicate()` every 20 ms; fails if a process exits first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"process exited before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{tail(log)}")
        time.sleep(0.02)


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def progress_steps(text: str) -> list[int]:
    """The step of every progress line in a training log."""
    return [int(m.group(1)) for m in PROGRESS.finditer(text)]


def straight_and_resumed(config, root: pathlib.Path, *, stop_at: int, cache: pathlib.Path) -> dict[str, Any]:
    """One uninterrupted in-process run of `config` and one stopped by a real SIGTERM at step `stop_at`
    (sent just before the preemption watcher is asked about that step) and run again to the end."""
    from fnc_jax import loop, pretrain  # noqa: PLC0415

    straight, interrupted = root / "straight", root / "interrupted"
    real_should_stop = loop.PreemptionWatcher.should_stop

    def should_stop(self, step):
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before os.kill returns
        return real_should_stop(self, step)

    old_handler = signal.getsignal(signal.SIGTERM)
    original = loop.PreemptionWatcher.should_stop
    try:
        with persistent_cache_in_process(cache):
            full = pretrain.run(config, str(straight))
            loop.PreemptionWatcher.should_stop = should_stop
            try:
                first = pretrain.run(config, str(interrupted))
            finally:
                loop.PreemptionWatcher.should_stop = original
            after_stop = {"checkpoints": checkpoint_steps(interrupted), "history": history(interrupted)}
            second = pretrain.run(config, str(interrupted))
    finally:
        signal.signal(signal.SIGTERM, old_handler)  # the watcher installed its own handler in this process
    return dict(
        straight=straight, interrupted=interrupted, full=full, first=first, second=second, after_stop=after_stop
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path: pathlib.Path) -> dict:
    return json.loads(pathlib.Path(path).read_text())


def history(workdir: pathlib.Path) -> list[dict]:
    return read_json(pathlib.Path(workdir) / "train_history.json")["history"]


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """Steps of the complete checkpoints (orbax's own view: temporary directories are not steps)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints") as manager:
        return sorted(manager.all_steps())


def load_checkpoint(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """The train state saved at `step`, as {"path/of/leaf": numpy array} (no template needed)."""
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "default"
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)
        state = checkpointer.restore(path, target)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}


def tmp_checkpoint_dirs(workdir: pathlib.Path) -> list[str]:
    """Orbax's in-progress save directories (`<step>.orbax-checkpoint-tmp-<n>`) in the workdir."""
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(p.name for p in root.iterdir() if "tmp" in p.name) if root.exists() else []
