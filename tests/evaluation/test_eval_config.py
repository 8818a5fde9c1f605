"""Evaluation configs: every shipped config validates, and bad values fail before anything is read or
compiled, with a message naming the field, the value and what is allowed."""

import importlib.util
import pathlib

import pytest

from fnc_jax import evaluate
from fnc_jax.config_base import eval_config
from fnc_jax.evaluation import validation

REPO = pathlib.Path(__file__).resolve().parents[2]
EVAL_CONFIGS = [
    ("default_linear_eval", None, "linear_eval"),
    ("default_finetune", None, "finetune"),
    ("default_knn", None, "knn"),
    ("default_fn_analysis", None, "fn_analysis"),
    ("default_transfer", "fashion_mnist", "transfer"),
    ("imagenet_linear_eval", None, "linear_eval"),
    ("imagenet_finetune_1pct", None, "finetune"),
    ("imagenet_finetune_10pct", None, "finetune"),
    ("imagenet_knn", None, "knn"),
    ("imagenet_fn_analysis", None, "fn_analysis"),
    ("transfer", "cifar10", "transfer"),
    ("transfer", "dtd,finetune", "transfer"),
]


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"eval_config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize("name,arg,mode", EVAL_CONFIGS)
def test_shipped_configs_validate(name, arg, mode):
    c = load(name, arg)
    assert c.mode == mode
    for field in ("seed", "batch_size", "epochs", "total_steps", "checkpoint_every_steps"):
        assert field in c, field
    c.pretrained.workdir = c.pretrained.workdir or "/pretrained"
    validation.validate_eval(c, num_devices=8)
    text = (REPO / "configs" / f"{name}.py").read_text()  # the docstring: command, hardware, target
    assert "python -m fnc_jax.main --config=configs/" in text and "Hardware" in text


def test_paper_recipes():
    linear = load("imagenet_linear_eval")
    assert (linear.batch_size, linear.epochs, linear.optim.name, linear.model.ft_proj_selector) == (
        1024,
        90,
        "sgd_nesterov",
        0,
    )
    assert linear.optim.base_lr == 0.005 and linear.optim.lr_scaling == "sqrt" and linear.optim.weight_decay == 0
    one = load("imagenet_finetune_1pct")
    assert (one.data.name, one.epochs, one.optim.name, one.model.ft_proj_selector) == (
        "imagenet2012_subset/1pct",
        60,
        "lars",
        1,
    )
    assert not one.finetune.train_projection
    assert load("imagenet_finetune_10pct").data.name == "imagenet2012_subset/10pct"
    transfer = load("transfer", "cifar10,finetune")
    assert len(transfer.transfer.learning_rates) == 7 and len(transfer.transfer.weight_decays) == 8
    assert transfer.transfer.bn_momentum == -1
    with pytest.raises(ValueError, match="VOC2007 .* multi-label"):
        load("transfer", "voc2007")
    with pytest.raises(ValueError, match="protocol 'probe' is invalid"):
        load("transfer", "cifar10,probe")


def test_transfer_bn_momentum_rule():
    c = load("transfer", "cifar10,finetune")
    assert evaluate.transfer_bn_momentum(c, 50000) == pytest.approx(1 - 10 / (50000 // 256))
    assert evaluate.transfer_bn_momentum(c, 1000) == 0.9
    c.transfer.bn_momentum = 0.99
    assert evaluate.transfer_bn_momentum(c, 1000) == 0.99


def _base(mode="linear_eval"):
    c = eval_config(mode)
    c.pretrained.workdir = "/pretrained"
    return c


BAD = [
    ("linear_eval", "mode", "pretrain", r"config.mode='pretrain' is invalid: allowed values are linear_eval, finetune"),
    (
        "linear_eval",
        "batch_size",
        100,
        r"config.batch_size=100 is invalid: allowed values are multiples of the device count \(8\)",
    ),
    ("linear_eval", "eval.batch_size", 12, r"config.eval.batch_size=12 is invalid"),
    ("linear_eval", "epochs", 0, r"config.epochs=0 is invalid: allowed values are numbers > 0"),
    (
        "linear_eval",
        "model.ft_proj_selector",
        4,
        r"config.model.ft_proj_selector=4 is invalid: allowed values are integers in \[-4, 3\]",
    ),
    ("linear_eval", "model.stem", "vit", r"config.model.stem='vit' is invalid"),
    (
        "linear_eval",
        "optim.name",
        "sgd",
        r"config.optim.name='sgd' is invalid: allowed values are lars, sgd_nesterov, adamw",
    ),
    ("linear_eval", "optim.base_lr", -1.0, r"config.optim.base_lr=-1.0 is invalid"),
    ("linear_eval", "pretrained.step", -2, r"config.pretrained.step=-2 is invalid: allowed values are -1 \(latest\)"),
    (
        "linear_eval",
        "pretrained.network",
        "target",
        r"config.pretrained.network='target' is invalid: allowed values are online, ema",
    ),
    ("knn", "knn.ks", (), r"config.knn.ks=\(\) is invalid: allowed values are non-empty sequences of integers >= 1"),
    ("knn", "knn.temperature", 0.0, r"config.knn.temperature=0.0 is invalid"),
    (
        "knn",
        "knn.features",
        "logits",
        r"config.knn.features='logits' is invalid: allowed values are encoder, projection",
    ),
    (
        "fn_analysis",
        "fn_analysis.support_sizes",
        (10,),
        r"config.fn_analysis.support_sizes=\(10,\) is invalid: allowed values are support sizes in \[0, num_views - 2 = 8\]",
    ),
    ("fn_analysis", "fn_analysis.thresholds", (1.5,), r"config.fn_analysis.thresholds=\(1.5,\) is invalid"),
    ("fn_analysis", "fn_analysis.aggregations", ("sum",), r"config.fn_analysis.aggregations=\('sum',\) is invalid"),
    (
        "fn_analysis",
        "fn_analysis.anchor_batch_size",
        3,
        r"config.fn_analysis.anchor_batch_size=3 is invalid: allowed values are 0 or divisors",
    ),
    (
        "fn_analysis",
        "batch_size",
        1000,
        r"config.batch_size=1000 is invalid: allowed values are multiples of eval.batch_size=256",
    ),
    (
        "transfer",
        "transfer.protocol",
        "knn",
        r"config.transfer.protocol='knn' is invalid: allowed values are linear_eval, finetune",
    ),
    ("transfer", "transfer.learning_rates", (0.1, 0.0), r"config.transfer.learning_rates=\(0.1, 0.0\) is invalid"),
    ("transfer", "transfer.weight_decays", (), r"config.transfer.weight_decays=\(\) is invalid"),
    ("transfer", "transfer.bn_momentum", 2.0, r"config.transfer.bn_momentum=2.0 is invalid"),
    ("transfer", "transfer.sweep_val_split", "", r"config.transfer.sweep_val_split='' is invalid"),
]


@pytest.mark.parametrize("mode,field,value,message", BAD, ids=[f"{m}:{f}" for m, f, _, _ in BAD])
def test_bad_values_name_the_field(mode, field, value, message):
    c = _base(mode)
    *path, last = field.split(".")
    node = c
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(ValueError, match=message):
        validation.validate_eval(c, num_devices=8)


def test_pretrained_source_rules(tmp_path):
    c = _base()
    c.pretrained.workdir = ""
    with pytest.raises(
        ValueError,
        match=r"config.pretrained.workdir='' and config.pretrained.checkpoint='' name no pretrained weights.*allow_random_init=True",
    ):
        validation.validate_eval(c, num_devices=8)
    c.pretrained.allow_random_init = True
    validation.validate_eval(c, num_devices=8)
    c.pretrained.workdir, c.pretrained.checkpoint = "/a", "/b/checkpoints/3"
    with pytest.raises(ValueError, match="are both set: allowed is one of them"):
        validation.validate_eval(c, num_devices=8)


def test_missing_section_is_named():
    c = _base("finetune")
    del c["finetune"]
    with pytest.raises(ValueError, match=r"config.finetune is missing: mode 'finetune' needs it"):
        validation.validate_eval(c, num_devices=8)


def test_run_fails_before_reading_anything(tmp_path):
    """A bad value fails in run() before the checkpoint, data or workdir are touched."""
    c = _base()
    c.pretrained.workdir = str(tmp_path / "does-not-exist")
    c.optim.momentum = 1.5
    with pytest.raises(ValueError, match=r"config.optim.momentum=1.5 is invalid"):
        evaluate.run(c, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()
    c.optim.momentum = 0.9
    with pytest.raises(FileNotFoundError, match="config.pretrained.workdir=.*no complete checkpoint"):
        evaluate.run(c, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()
