"""The evaluation protocols' pieces against their definitions: schedule, SGD, frozen vs
fine-tuned steps, masking, counts, stratified fractions, the logistic probe (VOC07's SVMs and
multi-label data: tests/test_voc07.py)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bt_jax import distributed
from bt_jax.data import IMAGENET, subsets
from bt_jax.evaluation import classifier, features, probes
from bt_jax.models import resnet


def test_epoch_cosine_is_torch_cosine_annealing_stepped_per_epoch():
    schedule = classifier.epoch_cosine(0.3, steps_per_epoch=3, epochs=5)
    got = [float(schedule(s)) for s in range(15)]
    want = [0.3 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5) for _ in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_torch_sgd_update_order():
    """torch.optim.SGD(momentum=0.9, weight_decay=wd) with an LR that changes per step."""
    lrs = [0.3, 0.2, 0.1]
    tx = classifier.torch_sgd(lambda step: jnp.asarray(lrs)[step], 0.9, 0.01)
    p = jnp.array([1.0, -2.0])
    state = tx.init(p)
    ref_p, buf = np.array([1.0, -2.0]), None
    for step, g in enumerate([np.array([0.5, 0.1]), np.array([-0.2, 0.3]), np.array([1.0, 1.0])]):
        updates, state = tx.update(jnp.asarray(g), state, p)
        p = p + updates
        d = g + 0.01 * ref_p
        buf = d if buf is None else 0.9 * buf + d
        ref_p = ref_p - lrs[step] * buf
    np.testing.assert_allclose(np.asarray(p), ref_p, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    module = resnet("resnet18", width=0.125, cifar_stem=True, stage_sizes=(1, 1))
    images = jnp.zeros((1, 8, 8, 3))
    variables = jax.jit(lambda k: module.init(k, images, train=False))(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (16, 8, 8, 3), dtype=np.uint8),
        "label": rng.integers(0, 3, 16).astype(np.int32),
        "mask": np.ones(16, bool),
    }
    return module, variables, batch


def _opt(finetune):
    cfg = ml_collections.ConfigDict(
        dict(lr_head=0.5, lr_backbone=0.05, momentum=0.9, weight_decay=0.0, epochs=2)
    )
    return classifier.make_optimizer(cfg, 4, finetune=finetune)


@pytest.mark.parametrize("finetune", [False, True])
def test_frozen_backbone_never_changes_fine_tuned_one_does(tiny, finetune):
    module, variables, batch = tiny
    tx, _ = _opt(finetune)
    state = classifier.init_state(variables, module.num_features, 3, tx, finetune=finetune)
    before = jax.tree.map(np.asarray, state)
    new, metrics = classifier.train_step(
        state,
        batch,
        backbone=features.Encoder(module, IMAGENET),
        num_classes=3,
        tx=tx,
        finetune=finetune,
    )
    assert np.isfinite(float(metrics["loss"]))

    def same(a, b):
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        return all(np.array_equal(x, np.asarray(y)) for x, y in pairs)

    assert not same(before.params["head"], new.params["head"])
    assert same(before.params["backbone"], new.params["backbone"]) != finetune
    assert same(before.batch_stats, new.batch_stats) != finetune  # BN train mode updates
    assert np.std(np.asarray(before.params["head"]["kernel"])) == pytest.approx(0.01, rel=0.3)
    assert not np.asarray(before.params["head"]["bias"]).any()


def test_padded_rows_neither_train_nor_count():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    tx, _ = _opt(False)
    state = classifier.init_state({}, 4, 3, tx, finetune=False)
    clean = {"image": x, "label": y, "mask": np.ones(8, bool)}
    padded = {
        "image": np.concatenate([x, 100 * np.ones((8, 4), np.float32)]),
        "label": np.concatenate([y, np.zeros(8, np.int32)]),
        "mask": np.arange(16) < 8,
    }
    kw = dict(backbone=None, num_classes=3, tx=tx, finetune=False)
    a, _ = classifier.train_step(state, clean, **kw)
    state = classifier.init_state({}, 4, 3, tx, finetune=False)
    b, _ = classifier.train_step(state, padded, **kw)
    np.testing.assert_allclose(a.params["head"]["kernel"], b.params["head"]["kernel"], atol=1e-6)
    counts = classifier.eval_counts(b.params, {}, padded, backbone=None, num_classes=3)
    assert int(counts["count"]) == 8 and int(counts["class_count"].sum()) == 8


def test_evaluate_reports_mean_per_class_over_present_classes():
    mesh = distributed.make_mesh()
    head = {"kernel": jnp.eye(3, 4), "bias": jnp.zeros(4)}  # predicts argmax of x
    x = np.eye(3, dtype=np.float32)[[0, 0, 0, 1]]  # 3 of class 0 (right), 1 of class 2 (wrong)
    y = np.array([0, 0, 0, 2], np.int32)
    state = classifier.State(step=0, params={"head": head}, batch_stats={}, opt_state=None)
    with jax.set_mesh(mesh):
        batches = features.ordered_batches(x, y, global_batch=8)
        got = classifier.evaluate(state, batches, mesh, backbone=None, num_classes=4)
    assert got["num_examples"] == 4 and got["top1"] == 75.0
    assert got["mean_per_class"] == 50.0  # classes 0 and 2 only: (100 + 0) / 2


def test_stratified_fraction():
    labels = np.repeat(np.arange(4), [10, 20, 3, 100])
    idx = subsets.stratified_indices(labels, 0.1, seed=0)
    assert np.bincount(labels[idx]).tolist() == [1, 2, 1, 10]  # at least one per class
    assert (np.diff(idx) > 0).all()
    assert not np.array_equal(idx, subsets.stratified_indices(labels, 0.1, seed=1))
    with pytest.raises(ValueError, match="fraction"):
        subsets.stratified_indices(labels, 0.0, seed=0)


def test_shuffled_feature_batches_cover_each_row_once_per_epoch():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10, dtype=np.int32)
    seen = [
        b["label"][b["mask"]]
        for b in features.shuffled_batches(x, y, global_batch=4, seed=0, epoch=3)
    ]
    assert sorted(np.concatenate(seen).tolist()) == list(range(10)) and len(seen) == 3


def test_logistic_probe_on_separable_data():
    mesh = distributed.make_mesh()
    rng = np.random.default_rng(0)
    centers = 4 * rng.normal(size=(3, 6))
    y = rng.integers(0, 3, 300).astype(np.int32)
    x = (centers[y] + rng.normal(size=(300, 6))).astype(np.float32)
    cfg = ml_collections.ConfigDict(dict(heldout_fraction=0.2, l2_grid=(1.0, 1e-3), max_iter=100))
    with jax.set_mesh(mesh):
        result, l2, scores = probes.logistic_probe(
            (x[:200], y[:200]),
            (x[200:], y[200:]),
            3,
            cfg,
            mesh,
            seed=0,
            metric="top1",
            say=lambda _: None,
        )
    assert result["top1"] > 95 and result["num_examples"] == 100 and set(scores) == {1.0, 1e-3}


def test_precise_bn_is_the_mean_of_per_batch_train_statistics(tiny):
    """The stem BN's re-estimated running statistics against its input (the stem conv of the
    normalised images, by lax.conv) averaged batch by batch; a padded batch ends it."""
    from bt_jax.evaluation.backbone import precise_bn_statistics

    module, variables, _ = tiny
    rng = np.random.default_rng(3)
    batches = [
        {
            "image": rng.integers(lo, lo + 100, (8, 8, 8, 3), dtype=np.uint8),
            "label": np.zeros(8, np.int32),
            "mask": np.arange(8) < (8 if i < 3 else 5),  # the 4th batch is padded
        }
        for i, lo in enumerate([0, 60, 150, 0])
    ]
    encoder = features.Encoder(module, IMAGENET)
    mesh = distributed.make_mesh(8)
    with jax.set_mesh(mesh):
        new, used = precise_bn_statistics(encoder, variables, batches, mesh, num_batches=10)
    assert used == 3
    kernel = variables["params"]["conv1"]["kernel"]
    means, variances = [], []
    for batch in batches[:3]:
        x = (batch["image"] / 255.0 - np.array(IMAGENET.mean)) / np.array(IMAGENET.std)
        y = jax.lax.conv_general_dilated(
            jnp.asarray(x, jnp.float32), kernel, (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
        )  # fmt: skip
        y = np.asarray(y, np.float64)
        means.append(y.mean((0, 1, 2)))
        variances.append(y.var((0, 1, 2)))  # biased, as BN in train mode
    stem = new["batch_stats"]["bn1"]
    np.testing.assert_allclose(stem["mean"], np.mean(means, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stem["var"], np.mean(variances, 0), rtol=1e-4, atol=1e-5)
    deeper = new["batch_stats"]["layer1_0"]["bn1"]["var"]
    assert not np.allclose(deeper, 1.0)  # every BN was re-estimated, not only the stem
