"""The one training loop, shared by pretraining, linear evaluation, fine-tuning and every transfer run.

`train(...)` takes a jitted step `(state, global batch) -> (state, metrics)` and runs it to
`total_steps` in a workdir:

- resume: the latest complete checkpoint in `workdir/checkpoints` replaces the fresh state, and the
  input stream restarts at its step (the caller's `batches(start_step)`);
- the step is compiled ahead of time on the first batch (its FLOPs give TFLOP/s and MFU), and batches
  are prefetched to the devices while the previous step runs;
- metrics stay on the devices and are fetched once per log window (`log_every_steps`), so the host
  never waits for a step in between; the window's mean goes to TensorBoard, the progress line and the
  history;
- a non-finite loss or gradient stops the run with `NonFiniteError`; the step that produced it left the
  state untouched, so the last complete checkpoint is good;
- checkpoints every `checkpoint_every_steps` and at the end; SIGTERM (preemption) saves at the next
  step boundary and returns; `train_history.json` is rewritten atomically with every checkpoint, so a
  kill loses no logged step that a checkpoint covers (a resumed run keeps the history up to its
  checkpoint and appends from there).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from fnc_jax import checkpoints, console, parallel

HISTORY_FILE = "train_history.json"

# Peak dense bf16 FLOP/s per device, for MFU in the progress line (device_kind substring → peak).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v6 lite": 918e12,
}


class NonFiniteError(FloatingPointError):
    """Raised when the loss or the gradient stops being finite."""


class PreemptionWatcher:
    """SIGTERM → save at the next step boundary and exit; multi-host runs agree on the step."""

    def __init__(self):
        self.requested = False
        self.multiprocess = jax.process_count() > 1
        if not self.multiprocess:  # multi-process: JAX's coordination service handles SIGTERM
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting.")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


class Progress:
    """The progress line: what, step, the run's own metrics, images/s per device, steps/s, ETA, TFLOP/s, MFU."""

    def __init__(self, what: str, *, total_steps: int, batch_size: int, flops_per_step: float | None = None):
        self.what, self.total_steps, self.batch_size, self.flops = what, total_steps, batch_size, flops_per_step
        self.devices = jax.device_count()
        kind = jax.devices()[0].device_kind
        self.peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
        self.mark_step, self.mark_time, self.paused = 0, time.time(), 0.0

    def start(self, step: int) -> None:
        # `paused`: seconds of checkpointing / evaluation inside the current window, not counted as steps.
        self.mark_step, self.mark_time, self.paused = step, time.time(), 0.0

    def report(self, step: int, summary: str) -> dict[str, float]:
        elapsed = max(time.time() - self.mark_time - self.paused, 1e-9)
        steps_per_s = (step - self.mark_step) / elapsed
        stats = {
            "steps_per_sec": steps_per_s,
            "images_per_sec_per_device": steps_per_s * self.batch_size / self.devices,
        }
        eta = (self.total_steps - step) / max(steps_per_s, 1e-9)
        line = (
            f"{self.what} step {step}/{self.total_steps} | {summary} | {stats['images_per_sec_per_device']:.1f} "
            f"img/s/device | {steps_per_s:.2f} steps/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )
        if self.flops:
            stats["tflops_per_device"] = self.flops * steps_per_s / 1e12
            line += f" | {stats['tflops_per_device']:.3g} TFLOP/s/device"
            if self.peak:
                stats["mfu"] = stats["tflops_per_device"] * 1e12 / self.peak
                line += f" | MFU {100 * stats['mfu']:.1f}%"
        console.say(line)
        self.start(step)
        return stats


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How a run is driven: its length and its logging, checkpointing and evaluation cadence."""

    what: str  # names the run in the progress line and in messages ('pretrain', 'linear_eval', ...)
    total_steps: int
    batch_size: int  # global, in images
    log_every_steps: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    eval_every_steps: int = 0  # > 0: `evaluate` every so many steps (not at the last step)
    scalar_prefix: str = ""  # of the training metrics in TensorBoard, e.g. 'train/'

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, what: str, total_steps: int, **kwargs) -> LoopSettings:
        return cls(
            what=what,
            total_steps=total_steps,
            batch_size=config.batch_size,
            log_every_steps=config.log_every_steps,
            checkpoint_every_steps=config.checkpoint_every_steps,
            keep_checkpoints=config.keep_checkpoints,
            **kwargs,
        )


@dataclasses.dataclass
class LoopResult:
    state: Any
    last_metrics: dict[str, float]  # mean over the last logged window ({} if none)
    history: list[dict[str, Any]]  # every logged window: {'step', metrics..., ['eval']}
    periodic_eval: list[dict[str, Any]]
    preempted: bool  # stopped before total_steps


def window_mean(window: list[dict[str, np.ndarray]]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in window])) for k in window[0] if k != "finite"}


# Executables per jitted step and input signature; an entry goes with its step function.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_step(step_fn: Any, state: Any, batch: Any) -> Any:
    """`step_fn` compiled ahead of time for these inputs, once per process: the runs of a transfer sweep
    (and a test's runs) share one executable, as jit's own cache would share it."""
    leaves, structure = jax.tree.flatten((state, batch))
    signature = (structure, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
    executables = _COMPILED.setdefault(step_fn, {})
    if signature not in executables:
        executables[signature] = step_fn.lower(state, batch).compile()
    return executables[signature]


def _read_history(path: epath.Path, up_to_step: int) -> list[dict[str, Any]]:
    """The logged windows up to the checkpoint a run resumes from (later steps are trained again)."""
    if not up_to_step or not path.exists():
        return []
    return [h for h in json.loads(path.read_text())["history"] if h["step"] <= up_to_step]


def train(
    settings: LoopSettings,
    *,
    workdir: epath.Path,
    state: Any,
    step_fn: Any,
    batches: Callable[[int], Iterator[dict[str, np.ndarray]]],
    mesh: jax.sharding.Mesh,
    writer: metric_writers.MetricWriter,
    summary: Callable[[dict[str, float]], str],
    on_restore: Callable[[Any], Any] = lambda restored: restored,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    advice: str = "",
) -> LoopResult:
    """Runs (or resumes) `step_fn` from `state` to `settings.total_steps` (see the module docstring).

    `batches(start_step)` is this process's host-batch stream from a step on; `summary(metrics)` the
    run's own part of the progress line; `on_restore` adjusts a restored state (e.g. the schedule of
    the current config); `evaluate(state)` is the periodic evaluation; `advice` ends the non-finite
    error message.
    """
    process_index = jax.process_index()
    store = checkpoints.Checkpoints(workdir / "checkpoints", keep=settings.keep_checkpoints)
    if store.latest_step() is not None:
        state = on_restore(store.restore(state))
        logging.info("Resumed from step %d of %s (%s)", int(state.step), workdir, settings.what)
    start_step, total = int(state.step), settings.total_steps
    history_path = workdir / HISTORY_FILE
    history = _read_history(history_path, start_step) if process_index == 0 else []
    periodic = [h["eval"] for h in history if "eval" in h]
    # A finished run started again (e.g. with new eval settings) reports its last logged window again.
    last = {k: v for k, v in history[-1].items() if k not in ("step", "eval")} if history else {}

    def write_history():
        if process_index == 0:
            checkpoints.write_json_atomic(history_path, {"history": history})

    if start_step < total:
        stream = parallel.device_prefetch(batches(start_step), mesh)
        batch = next(stream)
        t0 = time.time()
        compiled = compile_step(step_fn, state, batch)
        logging.info("Compiled (or reused) the %s step in %.1f s", settings.what, time.time() - t0)
        flops = (compiled.cost_analysis() or {}).get("flops")
        progress = Progress(settings.what, total_steps=total, batch_size=settings.batch_size, flops_per_step=flops)
        watcher = PreemptionWatcher()
        # Compile times differ between processes (e.g. JAX's persistent compilation cache is written by
        # process 0 only, so on a restart only process 0 hits it): enter the first step together.
        parallel.barrier(f"fnc_jax_{settings.what}_first_step")
        window: list[dict[str, jax.Array]] = []
        progress.start(start_step)
        for step in range(start_step, total):
            state, metrics = compiled(state, batch)
            window.append(metrics)
            done = step + 1
            save = done % settings.checkpoint_every_steps == 0 or done == total
            stop = watcher.should_stop(done)
            periodic_eval = (
                evaluate is not None
                and settings.eval_every_steps > 0
                and (done % settings.eval_every_steps == 0 and done < total)
            )
            if done % settings.log_every_steps == 0 or save or stop or periodic_eval:
                host = jax.device_get(window)
                window = []
                bad = [m for m in host if not m["finite"]]
                if bad:
                    store.wait()
                    raise NonFiniteError(
                        f"Non-finite loss or gradient at or before step {done} of {settings.what} (loss "
                        f"{bad[0]['loss']}, grad norm {bad[0]['grad_norm']}); the state was not updated by that "
                        f"step and the last complete checkpoint (step {store.latest_step()}) is kept in {workdir}."
                        + (f" {advice}" if advice else "")
                    )
                last = window_mean(host)
                speed = progress.report(done, summary(last))
                writer.write_scalars(done, {f"{settings.scalar_prefix}{k}": v for k, v in last.items()} | speed)
                history.append({"step": done, **last})
            if periodic_eval:
                t = time.time()
                scores = evaluate(state)
                writer.write_scalars(done, {f"eval/{k}": v for k, v in scores.items() if k != "split"})
                history[-1]["eval"] = {"step": done, **scores}
                periodic.append(history[-1]["eval"])
                progress.paused += time.time() - t
            if save or stop:
                t = time.time()
                store.save(done, state)
                write_history()
                progress.paused += time.time() - t
            if stop:
                logging.warning(
                    "Stopped for preemption at step %d of %s; the run resumes from here.", done, settings.what
                )
                break
            if done < total:
                batch = next(stream)
    store.wait()
    store.close()
    write_history()
    writer.flush()
    return LoopResult(state, last, history, periodic, preempted=int(state.step) < total)
