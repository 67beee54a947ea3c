"""The VOC07 linear-SVM benchmark exactly as VISSL runs it, with scikit-learn's liblinear.

The protocol behind the paper's VOC07 86.2 mAP (and the 86.83 measured with VISSL on the
official checkpoint, facebookresearch/barlowtwins#32): vissl/utils/svm_utils/svm_trainer.py
(SVMTrainer.train_cls / test) and evaluate.py, with the costs, folds and max_iter of
VISSL's eval_resnet_8gpu_transfer_voc07_svm.yaml (config.transfer.svm). For every class:
- features as float64, L2-normalised: x / (||x|| + 1e-5), train and test alike;
- train labels: 1 present, 0 absent -> -1, and -1 (only "difficult" objects) stays -1: in
  training and cross-validation a difficult image is a negative, as in VISSL;
- per cost: LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0,
  penalty="l2", loss="squared_hinge", tol=1e-4, dual=True, max_iter), scored by
  cross_val_score(cv=folds, scoring="average_precision"): unshuffled StratifiedKFold, so
  the folds follow the row order (VISSL's: sorted image names; bt_jax/data/multilabel.py);
- the cost of the highest mean cross-validated AP (the first on ties) is refit on all of
  the train rows (VISSL fits every cost and keeps that one: the same model);
- test AP of its decision_function over the test images not labelled -1 (difficult ones
  are ignored), by VISSL's get_precision_recall / calculate_ap (voc_ap below): precision
  made monotone from the right and summed over the recall steps, the VOC 2010+ AP, not the
  VOC07 devkit's 11-point one.
mAP is the mean over classes. One deliberate difference: LinearSVC's random_state (the
order of liblinear's dual coordinate descent) is the job's seed, where VISSL leaves it to
numpy's global RNG; reruns then give the same numbers. Classes run in parallel worker
processes (joblib's loky), not threads as in VISSL: liblinear draws from the C library's
one global rand(), so concurrent threads perturb each other's coordinate order and the
chosen costs change from run to run. Every process computes the same result from the same
rows.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import joblib
import ml_collections
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

POSITIVE_WEIGHT = 2  # VISSL's class_weight={1: 2, -1: 1}


def normalise(features: np.ndarray) -> np.ndarray:
    """VISSL's SVMTrainer._normalize_features, in float64."""
    features = np.asarray(features, np.float64)
    return features / (np.linalg.norm(features, axis=1) + 1e-5)[:, None]


def voc_ap(positive: np.ndarray, scores: np.ndarray) -> float:
    """VISSL's get_precision_recall + calculate_ap for one class (vectorised, same order).

    positive: bool per image (the images to ignore already removed); scores: decision values.
    """
    order = np.argsort(scores)[::-1]  # VISSL's call: its tie order too
    hits = np.asarray(positive, np.float64)[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    recall = np.cumsum(hits) / hits.sum()
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def _classifier(cost: float, max_iter: int, seed: int) -> LinearSVC:
    return LinearSVC(
        C=cost,
        class_weight={1: POSITIVE_WEIGHT, -1: 1},
        intercept_scaling=1.0,
        penalty="l2",
        loss="squared_hinge",
        tol=1e-4,
        dual=True,
        max_iter=max_iter,
        random_state=seed,
    )


def _one_class(x_train, labels, x_test, test_labels, cfg, seed) -> dict:
    target = np.where(labels == 1, 1, -1).astype(np.int32)  # 0 and -1 (difficult): negative
    cv_ap = [
        cross_val_score(
            _classifier(cost, cfg.max_iter, seed),
            x_train,
            target,
            cv=cfg.folds,
            scoring="average_precision",
        ).mean()
        for cost in cfg.costs
    ]
    best = int(np.argmax(cv_ap))
    svm = _classifier(cfg.costs[best], cfg.max_iter, seed).fit(x_train, target)
    keep = test_labels != -1
    scores = svm.decision_function(x_test[keep])
    return dict(
        cv_ap=np.asarray(cv_ap),
        cost=float(cfg.costs[best]),
        ap=voc_ap(test_labels[keep] == 1, scores),
        converged=bool(svm.n_iter_ < cfg.max_iter),
    )


def _one_class_quiet(x_train, labels, x_test, test_labels, cfg: dict, seed) -> dict:
    """_one_class in a worker process; convergence is counted by the caller, not warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cfg = ml_collections.ConfigDict(cfg)
        return _one_class(x_train, labels, x_test, test_labels, cfg, seed)


def _check_labels(labels: np.ndarray, test_labels: np.ndarray) -> None:
    for c in range(labels.shape[1]):
        if not (labels[:, c] == 1).any() or (labels[:, c] == 1).all():
            raise ValueError(f"class {c} has no positive or no negative train image")
        if not (test_labels[:, c] == 1).any():
            raise ValueError(f"class {c} has no positive test image: its AP is undefined")


def voc07_svms(
    train: tuple,
    test: tuple,
    cfg: ml_collections.ConfigDict,
    *,
    seed: int,
    say: Callable[[str], None],
) -> dict:
    """Per-class SVMs on (features [N, F], labels int [N, C] in {1, 0, -1}) train / test.

    Returns {"map": percent, "ap": [C] fractions, "costs": [C] chosen, "cv_ap": [C, costs],
    "unconverged": final fits that hit max_iter}.
    """
    (x_train, labels), (x_test, test_labels) = train, test
    _check_labels(labels, test_labels)
    x_train, x_test = normalise(x_train), normalise(x_test)
    classes = labels.shape[1]
    fits = classes * (len(cfg.costs) * cfg.folds + 1)
    say(
        f"{classes} classes x ({len(cfg.costs)} costs x {cfg.folds} folds + the refit): "
        f"{fits} liblinear fits"
    )

    workers = min(classes, os.cpu_count() or 1)
    rows = joblib.Parallel(n_jobs=workers, backend="loky")(
        joblib.delayed(_one_class_quiet)(
            x_train, labels[:, c], x_test, test_labels[:, c], cfg.to_dict(), seed
        )
        for c in range(classes)
    )
    for c, row in enumerate(rows):
        say(f"  class {c}: cost {row['cost']:g} (cv AP {100 * row['cv_ap'].max():.2f}), "
            f"test AP {100 * row['ap']:.2f}")  # fmt: skip
    ap = np.array([row["ap"] for row in rows])
    return dict(
        map=100.0 * float(np.mean(ap)),
        ap=ap,
        costs=np.array([row["cost"] for row in rows]),
        cv_ap=np.stack([row["cv_ap"] for row in rows]),
        unconverged=sum(not row["converged"] for row in rows),
    )
