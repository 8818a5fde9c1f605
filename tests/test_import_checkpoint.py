"""`python -m fnc_jax.import_checkpoint`: an official TF1 checkpoint becomes a workdir the evaluation modes take.

The golden ResNet-18 (written by the official FNC code) is imported, then a short linear evaluation and
a kNN evaluation run from the new workdir on the embedded digits (resized to the checkpoint's 32 px,
with its ImageNet stem named explicitly).
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from fnc_jax import evaluate, parallel
from fnc_jax.evaluation import restore, starting_variables
from fnc_jax.interop import tf1
from fnc_jax.interop import workdir as imported_workdir
from fnc_jax.models import factory

sys.path.insert(0, str(pathlib.Path(__file__).parent / "interop"))
import official_resnet  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
R18 = REPO / "tests" / "golden" / "official_checkpoints" / "resnet18_w0.125" / "model.ckpt-3"


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fnc_jax.import_checkpoint", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def eval_config(name: str, workdir: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.pretrained.workdir = str(workdir)
    c.data.image_size = 32  # the checkpoint's size; the digits are resized
    c.model.update(depth=18, width_multiplier=0.125, stem="imagenet", proj_out_dim=128)
    c.batch_size = 64
    c.eval.batch_size = 200
    return c


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> pathlib.Path:
    """The command run for real on the official ResNet-18 (online network)."""
    workdir = tmp_path_factory.mktemp("imported") / "r18"
    done = command(f"--tf_checkpoint={R18}", f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encoder: ResNet-18, width 0.125, ImageNet stem" in done.stdout
    assert "not read, optimizer slots: 71 (*/Momentum)" in done.stdout and "global_step 3" in done.stdout
    return workdir


def test_the_workdir_holds_the_network_and_its_model_section(imported):
    config = json.loads((imported / "config.json").read_text())
    assert config["model"] == {
        "depth": 18,
        "width_multiplier": 0.125,
        "stem": "imagenet",
        "sk_ratio": 0.0,
        "se_ratio": 0.0,
        "proj_layers": 3,
        "proj_out_dim": 128,
        "proj_hidden_dim": 0,
    }
    assert config["imported_from"] == {"tf_checkpoint": str(R18), "network": "online", "global_step": 3}
    tree = restore.read_tree_metadata(imported / "checkpoints" / "3")
    assert {k for k, v in tree.items() if v} == {"step", "params", "batch_stats"}  # nothing else is pretended
    saved = restore.load_network(
        restore.find_checkpoint(eval_config("default_knn", imported).pretrained),
        network="online",
        modules=("encoder", "projection_head"),
        sharding=parallel.replicated(parallel.create_mesh()),
    )
    _, official = tf1.load(str(R18))
    assert jax.tree.structure(saved) == jax.tree.structure(official)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(official)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_linear_eval_and_knn_start_from_the_imported_workdir(imported, tmp_path):
    c = eval_config("default_linear_eval", imported)
    c.total_steps = 4
    c.log_every_steps = 2
    results = evaluate.run(c, str(tmp_path / "linear"))
    assert results["pretrained"]["step"] == 3 and results["pretrained"]["restored"] == [
        "params/encoder",
        "batch_stats/encoder",
    ]
    assert results["steps"] == 4 and results["eval"]["num_examples"] == 1000

    c = eval_config("default_knn", imported)
    results = evaluate.run(c, str(tmp_path / "knn"))
    assert results["pretrained"]["restored"][:2] == ["params/encoder", "params/projection_head"]
    assert results["num_train"] == 4000 and results["knn_top1_k20"] > 0.1  # chance: 0.1

    c.model.stem = "cifar"  # the workdir's config.json names its stem: a mismatch is refused before compiling
    with pytest.raises(
        ValueError, match=r"config.model.stem='cifar' .* used the imagenet stem \(model.stem='imagenet'\)"
    ):
        evaluate.run(c, str(tmp_path / "mismatch"))


def test_a_checkpoint_without_projection_head_imports_for_evaluation(tmp_path):
    """SimCLR v1 releases have no projection head: proj_layers = 0, and the evaluations accept it."""
    store = official_resnet.Store(seed=0)
    official_resnet.run(
        store, np.zeros((1, 32, 32, 3), np.float32), head=None, num_classes=10, depth=18, width_multiplier=0.125
    )
    path = official_resnet.save({**store.created, "global_step": np.int64(5)}, str(tmp_path / "v1" / "model.ckpt-5"))
    imported_workdir.import_to_workdir(path, str(tmp_path / "workdir"))
    c = eval_config("default_knn", tmp_path / "workdir")
    c.model.update(proj_layers=0, proj_out_dim=64)
    source = restore.find_checkpoint(c.pretrained)
    restore.check_model_matches(c, source)
    variables, report = starting_variables.initial_variables(
        c, factory.contrastive_model(c), source, parallel.create_mesh()
    )
    assert report["restored"] == ["params/encoder", "batch_stats/encoder"] and report["step"] == 5
    reader = tf.train.load_checkpoint(path)
    np.testing.assert_array_equal(
        variables["params"]["encoder"]["stem_conv"]["kernel"], reader.get_tensor("base_model/conv2d/kernel")
    )


def assert_refused(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("import_checkpoint: ") and message in last, last


def test_the_command_refuses_what_it_cannot_map_with_status_2(imported, tmp_path):
    """One line naming what did not fit, exit status 2, nothing written; an existing workdir is refused too."""
    reader = tf.train.load_checkpoint(str(R18))
    values = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map() if n != "base_model/conv2d_7/kernel"}
    broken = official_resnet.save(values, str(tmp_path / "broken" / "model.ckpt-3"))
    workdir = tmp_path / "w"
    assert_refused(command(f"--tf_checkpoint={broken}", f"--workdir={workdir}"), "missing base_model/conv2d_7/kernel")
    assert not workdir.exists()  # refused before anything is written
    with pytest.raises(ValueError, match=r"already holds checkpoints .*: allowed is a new directory"):
        imported_workdir.import_to_workdir(str(R18), str(imported))

    imported_workdir.import_to_workdir(str(R18), str(workdir), network="ema")  # the momentum encoder
    assert json.loads((workdir / "config.json").read_text())["imported_from"]["network"] == "ema"
    c = eval_config("default_knn", workdir)
    saved = restore.load_network(
        restore.find_checkpoint(c.pretrained),
        network="online",
        modules=("encoder",),
        sharding=parallel.replicated(parallel.create_mesh()),
    )
    np.testing.assert_array_equal(
        saved["params"]["encoder"]["stem_conv"]["kernel"], reader.get_tensor("ema_model/base_model/conv2d/kernel")
    )


def test_both_command_line_modules_import_into_one_process():
    """A test session (or a notebook) imports `fnc_jax.main` and `fnc_jax.import_checkpoint` together: their flags
    must not collide (CI once failed collecting the tests on a duplicate `--workdir`)."""
    code = "import fnc_jax.import_checkpoint, fnc_jax.main; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
