"""launch/ scripts: --help, argument errors, and the exact commands, dry-run and real.

Real runs use stub `gcloud`, `sbatch`, `srun`, `scontrol`, `python`, `python3` placed first on PATH.
Each stub appends its name and argv to a log (fields separated by \\x1f, one call per line); some
also answer like the real tool (a TPU state, a job id, host names) or run what they are given
(`srun` runs its command as task 0; `gcloud ... ssh` runs the remote command locally, with HOME in
a temp dir, when STUB_EXEC_SSH is set), so the remote scripts themselves are exercised too.
"""

import os
import pathlib
import shlex
import subprocess
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO_ROOT / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SUBMIT = LAUNCH / "slurm_submit.sh"
SBATCH = LAUNCH / "slurm.sbatch"
LOCAL = LAUNCH / "local_gpu.sh"

_LOG = r"""{ printf '%s' "${0##*/}"; printf '\x1f%s' "$@"; printf '\n'; } >> "$STUB_LOG"
"""
STUBS = {
    "gcloud": _LOG
    + r"""
case " $* " in
  *" describe "*)  # next queued TPU state; the last one repeats
    head -n 1 "$STUB_STATES"
    if [ "$(wc -l < "$STUB_STATES")" -gt 1 ]; then sed -i 1d "$STUB_STATES"; fi ;;
  *" ssh "*)
    if [ -n "${STUB_EXEC_SSH:-}" ]; then
      for arg in "$@"; do case $arg in --command=*) cmd=${arg#--command=} ;; esac; done
      exec bash -c "$cmd"
    fi ;;
esac
""",
    "sbatch": _LOG + 'echo "Submitted batch job 4242"\n',
    "scontrol": _LOG + 'printf "node001\\nnode002\\n"\n',
    # Skips srun's own options, then runs the command as task 0 of the step.
    "srun": _LOG + 'while [[ $1 == -* ]]; do shift; done\nSLURM_PROCID=0 SLURM_LOCALID=0 exec "$@"\n',
    # Record which GPUs the process would see as a first pseudo-argument.
    "python": r"""set -- "CVD=${CUDA_VISIBLE_DEVICES-unset}" "$@"
"""
    + _LOG,
    "python3": _LOG + 'case " $* " in *" fnc_jax.main "*) exit "${STUB_PYTHON_EXIT:-0}" ;; esac\n',
}

GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
ZONE = "us-central2-b"
TPU_ARGS = [
    "--name",
    "fnc-test",
    "--zone",
    ZONE,
    "--accelerator-type",
    "v4-64",
    "--version=tpu-ubuntu2204-base",
    "--repo",
    "REPO",
    "--ref",
    "v1.2",
    "--config",
    "configs/imagenet.py",
    "--workdir",
    "gs://bucket/run1",
    "--config.num_epochs=3",
    "--config.name=it's a run",
]
TRAIN_ARGV = [
    "-m",
    "fnc_jax.main",
    "--config=configs/imagenet.py",
    "--workdir=gs://bucket/run1",
    "--config.num_epochs=3",
    "--config.name=it's a run",
]


class Env:
    """A temp dir with the stubs first on PATH, a call log and a fake HOME."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        for name, body in STUBS.items():
            path = self.bin / name
            path.write_text("#!/usr/bin/env bash\n" + body)
            path.chmod(0o755)
        self.log = root / "calls.log"
        self.log.touch()
        self.states = root / "states"
        self.home = root / "home"
        self.home.mkdir()
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "FNC_JAX_", "CUDA_VISIBLE_DEVICES", "PYTHON"))
        }
        self.env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            STUB_LOG=str(self.log),
            STUB_STATES=str(self.states),
            HOME=str(self.home),
        )

    def run(self, script, *args, check=True, **env):
        proc = subprocess.run(
            [str(script), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def calls(self, name=None):
        calls = [line.split("\x1f") for line in self.log.read_text().splitlines()]
        return [c for c in calls if name is None or c[0] == name]


@pytest.fixture
def stubs(tmp_path):
    return Env(tmp_path)


def dry_run_commands(proc):
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def both_modes(stubs, script, *args, **env):
    """Commands printed by --dry-run and commands actually run (stub log); must be identical."""
    printed = dry_run_commands(stubs.run(script, *args, "--dry-run", **env))
    assert stubs.calls() == [], "dry run must not run anything"
    stubs.run(script, *args, **env)
    executed = stubs.calls()
    assert printed == executed
    return executed


def command_of(call):
    (command,) = [a[len("--command=") :] for a in call if a.startswith("--command=")]
    return command


# ----------------------------------------------------------------------------- help and errors


@pytest.mark.parametrize("script", [TPU, SUBMIT, SBATCH, LOCAL])
def test_help(stubs, script):
    proc = stubs.run(script, "--help")
    assert "Usage" in proc.stdout or "sbatch" in proc.stdout
    assert "--workdir" in proc.stdout
    assert stubs.calls() == []


@pytest.mark.parametrize(
    "script, args, missing",
    [
        (TPU, ["create", "--zone", ZONE], "--name"),
        (TPU, ["create", "--name", "n", "--zone", ZONE, "--version", "v"], "--accelerator-type"),
        (TPU, ["install", "--name", "n", "--zone", ZONE], "--repo"),
        (TPU, ["train", "--name", "n", "--zone", ZONE, "--config", "c"], "--workdir"),
        (TPU, ["train", "--name", "n", "--zone", ZONE, "--config", "c", "--workdir", "/local"], "gs://"),
        (TPU, ["--name", "n", "--zone", ZONE], "COMMAND"),
        (TPU, ["create", "--name"], "--name needs a value"),
        (SUBMIT, ["--nodes", "2", "--config", "c", "--workdir", "w"], "--gpus-per-node"),
        (SUBMIT, ["--nodes", "two", "--gpus-per-node", "8", "--config", "c", "--workdir", "w"], "--nodes"),
        (SBATCH, ["--config=c"], "--workdir"),
        (LOCAL, ["--workdir", "w"], "--config"),
    ],
)
def test_missing_or_bad_argument_is_named(stubs, script, args, missing):
    proc = stubs.run(script, *args, check=False)
    assert proc.returncode != 0
    assert missing in proc.stderr
    assert stubs.calls() == []


# ----------------------------------------------------------------------------- TPU pod


@pytest.mark.parametrize("spot", [True, False])
def test_tpu_create(stubs, spot):
    calls = both_modes(stubs, TPU, "create", *TPU_ARGS, *(["--spot"] if spot else []))
    assert calls == [
        GCLOUD_TPU
        + [
            "create",
            "fnc-test",
            f"--zone={ZONE}",
            "--accelerator-type=v4-64",
            "--version=tpu-ubuntu2204-base",
            *(["--spot"] if spot else []),
        ]
    ]


def test_tpu_project_is_passed(stubs):
    calls = both_modes(stubs, TPU, "delete", "--name", "fnc-test", "--zone", ZONE, "--project=my-proj")
    assert calls == [GCLOUD_TPU + ["delete", "fnc-test", f"--zone={ZONE}", "--project=my-proj", "--quiet"]]


def test_tpu_install_train_logs_delete_commands(stubs):
    (install,) = both_modes(stubs, TPU, "install", *TPU_ARGS)
    assert install[:7] == GCLOUD_TPU + ["ssh", "fnc-test", f"--zone={ZONE}"]
    assert install[7] == "--worker=all"
    script = command_of(install)
    assert "git fetch -q --depth=1 REPO v1.2" in script
    assert "python3 -m pip install -q 'jax[tpu]>=0.10.2,<0.11' ." in script

    stubs.log.write_text("")
    (train,) = both_modes(stubs, TPU, "train", *TPU_ARGS)
    assert train[:8] == GCLOUD_TPU + ["ssh", "fnc-test", f"--zone={ZONE}", "--worker=all"]
    script = command_of(train)
    assert "nohup bash -c" in script and ">> $HOME/fnc_jax_train.log 2>&1 < /dev/null &" in script
    # The training command line, unquoted the way the remote shells will.
    inner = shlex.split(script.split("nohup bash -c ", 1)[1])[0]
    assert shlex.split(inner.split(";")[0]) == ["python3", *TRAIN_ARGV]

    stubs.log.write_text("")
    assert both_modes(stubs, TPU, "logs", "--name", "fnc-test", "--zone", ZONE) == [
        GCLOUD_TPU
        + [
            "ssh",
            "fnc-test",
            f"--zone={ZONE}",
            "--worker=0",
            "--command=tail -n 200 -F $HOME/fnc_jax_train.log",
        ]
    ]
    stubs.log.write_text("")
    assert both_modes(stubs, TPU, "delete", "--name", "fnc-test", "--zone", ZONE) == [
        GCLOUD_TPU + ["delete", "fnc-test", f"--zone={ZONE}", "--quiet"]
    ]


@pytest.fixture
def git_repo(tmp_path):
    repo = tmp_path / "src"
    repo.mkdir()
    (repo / "marker.txt").write_text("fnc_jax")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "x"], ["tag", "v1.2"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env)
    return f"file://{repo}"


def wait_for(path: pathlib.Path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.05)  # let the writer finish the line
    return path.read_text()


def test_tpu_remote_scripts_run(stubs, git_repo):
    """The install and train remote commands work when a shell actually runs them."""
    args = [a if a != "REPO" else git_repo for a in TPU_ARGS]
    stubs.run(TPU, "install", *args, STUB_EXEC_SSH="1")
    assert (stubs.home / "fnc_jax" / "marker.txt").read_text() == "fnc_jax"
    assert stubs.calls("python3")[-1][1:] == ["-m", "pip", "install", "-q", "jax[tpu]>=0.10.2,<0.11", "."]

    stubs.run(TPU, "train", *args, STUB_EXEC_SSH="1")
    assert wait_for(stubs.home / "fnc_jax_train.exitcode").strip() == "0"
    assert stubs.calls("python3")[-1][1:] == TRAIN_ARGV
    assert (stubs.home / "fnc_jax_train.pid").read_text().strip().isdigit()


def test_tpu_train_refuses_second_copy(stubs):
    (stubs.home / "fnc_jax").mkdir()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (stubs.home / "fnc_jax_train.pid").write_text(f"{sleeper.pid}\n")
        proc = stubs.run(TPU, "train", *TPU_ARGS, check=False, STUB_EXEC_SSH="1")
        assert proc.returncode != 0 and "already running" in proc.stderr
        assert stubs.calls("python3") == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_tpu_watch_dry_run_shows_recovery(stubs):
    commands = dry_run_commands(stubs.run(TPU, "watch", *TPU_ARGS, "--spot", "--dry-run"))
    assert [c[4] for c in commands] == ["describe", "delete", "create", "ssh", "ssh"]
    assert commands[0] == GCLOUD_TPU + ["describe", "fnc-test", f"--zone={ZONE}", "--format=value(state)"]
    assert "--spot" in commands[2]
    assert stubs.calls() == []


@pytest.mark.parametrize("exit_code", [0, 3])
def test_tpu_watch_recreates_preempted_slice_and_resumes(stubs, git_repo, exit_code):
    stubs.states.write_text("PREEMPTED\nREADY\n")
    args = [a if a != "REPO" else git_repo for a in TPU_ARGS]
    proc = stubs.run(
        TPU,
        "watch",
        *args,
        "--spot",
        "--poll-seconds=0.1",
        check=False,
        STUB_EXEC_SSH="1",
        STUB_PYTHON_EXIT=str(exit_code),
    )
    assert proc.returncode == exit_code, proc.stderr
    gcloud = stubs.calls("gcloud")
    assert [c[4] for c in gcloud[:6]] == ["describe", "delete", "create", "ssh", "ssh", "describe"]
    assert gcloud[2] == GCLOUD_TPU + [
        "create",
        "fnc-test",
        f"--zone={ZONE}",
        "--accelerator-type=v4-64",
        "--version=tpu-ubuntu2204-base",
        "--spot",
    ]
    assert "--worker=all" in gcloud[3] and "--worker=all" in gcloud[4]
    # Training was restarted once, with the same workdir (so it resumes), and ran to its end.
    train_calls = [c for c in stubs.calls("python3") if "fnc_jax.main" in c]
    assert [c[1:] for c in train_calls] == [TRAIN_ARGV]
    assert f"finished with exit code {exit_code}" in proc.stderr


# ----------------------------------------------------------------------------- SLURM


def test_slurm_submit(stubs):
    calls = both_modes(
        stubs,
        SUBMIT,
        "--nodes",
        "2",
        "--gpus-per-node=8",
        "--config",
        "configs/imagenet.py",
        "--workdir",
        "/shared/run1",
        "--time",
        "01:00:00",
        "--partition",
        "gpu",
        "--config.num_epochs=3",
    )
    assert calls == [
        [
            "sbatch",
            "--nodes=2",
            "--ntasks-per-node=8",
            "--gpus-per-node=8",
            f"--chdir={REPO_ROOT}",
            "--time=01:00:00",
            "--partition=gpu",
            str(SBATCH),
            "--config=configs/imagenet.py",
            "--workdir=/shared/run1",
            "--config.num_epochs=3",
        ]
    ]


def test_slurm_submit_explicit_coordinator(stubs):
    (call,) = both_modes(
        stubs,
        SUBMIT,
        "--nodes",
        "1",
        "--gpus-per-node",
        "4",
        "--config",
        "c",
        "--workdir",
        "w",
        "--explicit-coordinator",
    )
    assert "--export=ALL,FNC_JAX_EXPLICIT_COORDINATOR=1" in call


SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[001-002]", "SLURM_NTASKS": "16"}
SBATCH_ARGS = ["--config=configs/imagenet.py", "--workdir=/shared/run1", "--config.num_epochs=3"]


def test_slurm_batch_script_auto_detect(stubs):
    srun = ["srun", "--kill-on-bad-exit=1", "python", "-m", "fnc_jax.main", *SBATCH_ARGS]
    assert dry_run_commands(stubs.run(SBATCH, *SBATCH_ARGS, "--dry-run", **SLURM_JOB)) == [srun]
    stubs.run(SBATCH, *SBATCH_ARGS, **SLURM_JOB)
    # The process srun starts gets exactly the main command line; JAX detects the rest.
    assert stubs.calls() == [srun, ["python", "CVD=unset", "-m", "fnc_jax.main", *SBATCH_ARGS]]


def test_slurm_batch_script_explicit_coordinator(stubs):
    env = {**SLURM_JOB, "FNC_JAX_EXPLICIT_COORDINATOR": "1"}
    printed = dry_run_commands(stubs.run(SBATCH, *SBATCH_ARGS, "--dry-run", **env))
    assert printed[0] == ["scontrol", "show", "hostnames", "node[001-002]"]
    assert printed[1][-len(SBATCH_ARGS) - 2 :] == ["python", "HEAD_NODE:24242", *SBATCH_ARGS]
    stubs.run(SBATCH, *SBATCH_ARGS, **env)
    scontrol, srun, python = stubs.calls()
    assert scontrol == ["scontrol", "show", "hostnames", "node[001-002]"]
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
    assert python == [
        "python",
        "CVD=0",
        "-m",
        "fnc_jax.main",
        "--coordinator_address=node001:24242",
        "--num_processes=16",
        "--process_id=0",
        *SBATCH_ARGS,
    ]


# ----------------------------------------------------------------------------- single machine


@pytest.mark.parametrize("gpus", [None, "0,1"])
def test_local_gpu(stubs, gpus):
    args = ["--config", "configs/imagenet.py", "--workdir", "/tmp/run1", "--config.num_epochs=3"]
    main = ["-m", "fnc_jax.main", "--config=configs/imagenet.py", "--workdir=/tmp/run1", "--config.num_epochs=3"]
    printed = dry_run_commands(stubs.run(LOCAL, *args, *(["--gpus", gpus] if gpus else [])))
    expected = ["python", *main] if gpus is None else ["env", "CUDA_VISIBLE_DEVICES=0,1", "python", *main]
    assert printed == []  # not a dry run: the stub ran
    assert stubs.calls() == [["python", f"CVD={gpus or 'unset'}", *main]]
    assert dry_run_commands(stubs.run(LOCAL, *args, *(["--gpus", gpus] if gpus else []), "--dry-run")) == [expected]
