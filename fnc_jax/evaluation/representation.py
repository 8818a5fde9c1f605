"""Representation quality of a frozen encoder: features, kNN and a linear probe, vs a random encoder.

This is the quick report that ends a pretraining run on small data (the quickstart): frozen pooled
encoder features (BatchNorm in inference mode) of the eval-preprocessed train and held-out splits,
a weighted kNN classifier (k = 20, 200) and a full-batch logistic-regression probe, for the
pretrained encoder and for the same architecture at its random initialisation.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fnc_jax import console
from fnc_jax.evaluation import features, knn
from fnc_jax.models import factory


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_logistic_regression(x, y, *, num_classes: int, steps: int, learning_rate=1e-2, weight_decay=1e-4):
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

    def step(_, carry):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
    return params


def linear_probe_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *, num_classes: int, steps: int
) -> float:
    """Top-1 of a full-batch logistic regression on standardised frozen features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    params = _fit_logistic_regression(
        jnp.asarray((train_x - mean) / std), jnp.asarray(train_y), num_classes=num_classes, steps=steps
    )
    logits = ((test_x - mean) / std) @ np.asarray(params["w"]) + np.asarray(params["b"])
    return float(np.mean(np.argmax(logits, -1) == test_y))


def evaluate_encoder(model, variables: dict, config, mesh, num_classes: int) -> dict[str, float]:
    """kNN and linear-probe accuracy of `model`'s pooled features (eval split against train split)."""
    (train_x, train_y), (test_x, test_y) = features.extract_train_and_eval(model, variables, config, mesh)
    scores = knn.knn_evaluate(
        test_x,
        test_y,
        train_x,
        train_y,
        num_classes=num_classes,
        ks=tuple(config.eval.knn_ks),
        temperature=config.eval.knn_temperature,
    )
    scores["linear_probe_top1"] = linear_probe_accuracy(
        train_x, train_y, test_x, test_y, num_classes=num_classes, steps=config.eval.probe_epochs
    )
    scores["num_train"], scores["num_test"] = len(train_y), len(test_y)
    return scores


def quality_report(config: ml_collections.ConfigDict, model, variables: dict, mesh, info) -> dict[str, Any]:
    """kNN and linear-probe accuracy of the pretrained encoder (`variables`) and of a random one."""
    report: dict[str, Any] = {
        "split": config.data.eval_split,
        "pretrained": evaluate_encoder(model, variables, config, mesh, info.num_classes),
    }
    if config.eval.compare_random_init:
        size = config.data.image_size
        random_vars = jax.jit(lambda key: model.init(key, jnp.zeros((2, size, size, 3)), train=False))(
            factory.init_key(config.seed + 1)
        )
        report["random_init"] = evaluate_encoder(model, random_vars, config, mesh, info.num_classes)
    return report


def flat_scalars(report: dict[str, Any]) -> dict[str, float]:
    return {
        f"final/{who}/{k}": float(v)
        for who, scores in report.items()
        if isinstance(scores, dict)
        for k, v in scores.items()
    }


def print_report(report: dict[str, Any]) -> None:
    rows = [k for k in report["pretrained"] if k not in ("num_train", "num_test")]
    random = "random_init" in report
    lines = [
        f"\nRepresentation quality on the held-out '{report['split']}' split "
        f"({report['pretrained']['num_test']} images; frozen encoder features):",
        f"  {'metric':<22}{'pretrained':>12}" + (f"{'random init':>14}" if random else ""),
    ]
    for k in rows:
        lines.append(
            f"  {k:<22}{100 * report['pretrained'][k]:>11.2f}%"
            + (f"{100 * report['random_init'][k]:>13.2f}%" if random else "")
        )
    if report.get("fn_precision_last_window") is not None:
        lines.append(
            f"  false-negative precision during the last logged training window: "
            f"{100 * report['fn_precision_last_window']:.1f}% (recall {100 * report['fn_recall_last_window']:.1f}%)"
        )
    console.say("\n".join(lines))
