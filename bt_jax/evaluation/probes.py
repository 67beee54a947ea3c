"""Full-batch logistic regression on precomputed features, for the transfer protocols.

logistic_probe: multinomial logistic regression (L-BFGS), its L2 strength chosen on a
stratified held-out part of the train split, then refit on the whole train split (the
SimCLR / BYOL transfer protocol). (VOC07's per-class SVMs: bt_jax/evaluation/svm.py.)

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
