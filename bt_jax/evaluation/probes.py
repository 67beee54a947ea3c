"""Full-batch linear classifiers on precomputed features, for the transfer protocols.

logistic_probe: multinomial logistic regression (L-BFGS), its L2 strength chosen on a
stratified held-out part of the train split, then refit on the whole train split (the
SimCLR / BYOL transfer protocol). svm_probe: one linear SVM per class (squared hinge, L2,
positives weighted 2, as the VOC07 benchmark of Goyal et al. 2019 with sklearn's LinearSVC),
its cost chosen per class by k-fold cross-validation on AP, scored by mAP on the test split.

Features live on the devices as row-sharded global arrays (padded rows carry weight 0), the
solver runs under jit, and the hyper-parameter choice happens on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from bt_jax import distributed
from bt_jax.data import subsets
from bt_jax.evaluation import classifier, features


def lbfgs(fun, init, *, max_iter: int, tol: float):
    """Minimise fun from init with optax's L-BFGS (zoom line search) inside a while_loop."""
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    def more(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        norm = optax.tree.norm(optax.tree.get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (norm >= tol))

    params, _ = jax.lax.while_loop(more, step, (init, opt.init(init)))
    return params


@functools.partial(jax.jit, static_argnames=("max_iter",))
def fit_logistic(rows, l2, init, *, max_iter: int, tol: float = 1e-6):
    """argmin mean masked cross-entropy + l2 / 2 ||W||^2 (bias not regularised)."""
    weights = rows["mask"].astype(jnp.float32)

    def fun(head):
        logits = rows["image"] @ head["kernel"] + head["bias"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, rows["label"])
        data = jnp.sum(losses * weights) / jnp.sum(weights)
        return data + 0.5 * l2 * jnp.sum(jnp.square(head["kernel"]))

    return lbfgs(fun, init, max_iter=max_iter, tol=tol)


def logistic_probe(
    train: tuple,
    test: tuple,
    num_classes: int,
    cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    seed: int,
    metric: str,
    say: Callable[[str], None],
):
    """Held-out choice of L2 over cfg.l2_grid, refit on all of train, test accuracy."""
    (x_tr, y_tr), (x_te, y_te) = train, test
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6  # standardised: better conditioned
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    held = np.zeros(len(y_tr), bool)
    held[subsets.stratified_indices(y_tr, cfg.heldout_fraction, seed)] = True

    def rows(x, y):
        return features.rows_to_global({"image": x, "label": y}, mesh)

    fit_rows, held_rows = rows(x_tr[~held], y_tr[~held]), rows(x_tr[held], y_tr[held])
    zeros = {
        "kernel": jnp.zeros((x_tr.shape[1], num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    head, scores = zeros, {}
    for l2 in sorted(cfg.l2_grid, reverse=True):  # strong to weak, warm-started
        head = fit_logistic(fit_rows, l2, head, max_iter=cfg.max_iter)
        scores[l2] = _accuracy(held_rows, head, num_classes)[metric]
        say(f"  L2 {l2:.1e}: held-out {metric} {scores[l2]:.2f}%")
    best = max(sorted(scores, reverse=True), key=lambda l2: scores[l2])  # ties: stronger
    head = fit_logistic(rows(x_tr, y_tr), best, zeros, max_iter=cfg.max_iter)
    result = _accuracy(rows(x_te, y_te), head, num_classes)
    return result, best, scores


def _accuracy(rows: dict, head: dict, num_classes: int) -> dict:
    """Top-1, top-5, mean per-class accuracy (percent) of head on row-sharded global rows."""
    counts = classifier.eval_counts(
        {"head": head}, {}, rows, backbone=None, num_classes=num_classes
    )
    return classifier.accuracies(distributed.global_to_host(counts))


# ---------------------------------------------------------------------------------------
# Multi-label: per-class linear SVMs and mAP (VOC07).


@functools.partial(jax.jit, static_argnames=("max_iter",))
def fit_svms(rows, costs, *, max_iter: int, tol: float = 1e-5):
    """One squared-hinge L2 SVM per class (bias regularised, as liblinear): labels in
    rows["label"] are 1 (positive), 0 (negative), -1 (ignored, e.g. VOC "difficult")."""
    y = rows["label"].astype(jnp.float32)
    target = jnp.where(y > 0, 1.0, -1.0)
    weight = jnp.where(y > 0, 2.0, jnp.where(y == 0, 1.0, 0.0)) * rows["mask"][:, None]
    x = rows["image"]

    def fun(p):
        margin = target * (x @ p["w"] + p["b"])
        hinge = jnp.sum(weight * jnp.square(jnp.maximum(0.0, 1.0 - margin)), axis=0)
        reg = 0.5 * (jnp.sum(jnp.square(p["w"]), axis=0) + jnp.square(p["b"]))
        return jnp.sum(reg + costs * hinge)  # classes are independent: a sum of problems

    init = {"w": jnp.zeros((x.shape[1], y.shape[1])), "b": jnp.zeros((y.shape[1],))}
    return lbfgs(fun, init, max_iter=max_iter, tol=tol)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class AP (area under the precision-recall steps, as sklearn's
    average_precision_score); labels 1 / 0 / -1 (ignored). NaN for a class without positives."""
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        keep = labels[:, c] >= 0
        s, y = scores[keep, c], labels[keep, c] > 0
        if not y.any():
            continue
        y = y[np.argsort(-s, kind="stable")]
        hits = np.cumsum(y)
        out[c] = float(np.sum((hits / np.arange(1, len(y) + 1))[y]) / y.sum())
    return out


def svm_probe(
    train: tuple,
    test: tuple,
    cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    seed: int,
    say: Callable[[str], None],
):
    """Per-class cost by cfg.folds-fold cross-validation on AP, refit, test mAP (percent)."""
    normalise = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)  # noqa: E731
    (x_tr, y_tr), (x_te, y_te) = (normalise(train[0]), train[1]), (normalise(test[0]), test[1])
    folds = np.random.default_rng(seed).permutation(len(x_tr)) % cfg.folds
    num_classes = y_tr.shape[1]
    cv_ap = np.zeros((len(cfg.costs), num_classes))
    for i, cost in enumerate(cfg.costs):
        costs = jnp.full((num_classes,), cost, jnp.float32)
        for f in range(cfg.folds):
            part = {"image": x_tr[folds != f], "label": y_tr[folds != f]}
            fit = features.rows_to_global(part, mesh)
            p = distributed.global_to_host(fit_svms(fit, costs, max_iter=cfg.max_iter))
            scores = x_tr[folds == f] @ p["w"] + p["b"]
            cv_ap[i] += np.nan_to_num(average_precision(scores, y_tr[folds == f])) / cfg.folds
        say(f"  cost {cost:.1e}: cross-validated mAP {100 * cv_ap[i].mean():.2f}")
    best = np.asarray(cfg.costs)[np.argmax(cv_ap, axis=0)]
    fit = features.rows_to_global({"image": x_tr, "label": y_tr}, mesh)
    p = fit_svms(fit, jnp.asarray(best, jnp.float32), max_iter=cfg.max_iter)
    p = distributed.global_to_host(p)
    ap = average_precision(x_te @ p["w"] + p["b"], y_te)
    return 100.0 * float(np.nanmean(ap)), best, ap
