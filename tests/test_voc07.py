"""VOC07 as VISSL runs it: the SVMs against scikit-learn + VISSL's trainer, its AP by hand and
against its loop, the preprocessing against PIL on real images, the multi-label batches, and
the transfer job end to end on a synthetic multi-label dataset (VOC itself needs a download).
"""

import io
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

from bt_jax.data import augment, data_config, multilabel, source
from bt_jax.defaults import transfer_config
from bt_jax.evaluation import svm

VISSL_COSTS = [0.01, 0.1, 1.0, 2, 5, 10, 15, 20, 50, 100, 1000]  # its voc07 yaml


def test_config_is_vissls_yaml():
    cfg = transfer_config().svm
    assert list(cfg.costs) == VISSL_COSTS and (cfg.folds, cfg.max_iter) == (3, 2000)
    assert (cfg.resize, cfg.center_crop, cfg.sort_by) == (256, False, "image/filename")


# ---------------------------------------------------------------------------------------
# AP


def _vissl_ap(targets, scores):
    """vissl/utils/svm_utils/evaluate.py get_precision_recall + calculate_ap, as written
    there (loops and all): the reference for svm.voc_ap."""
    targets = np.array(targets > 0, dtype=np.float32)
    ind = np.argsort(scores)[::-1]
    sortcounts = targets[ind].astype(np.float64)
    tp = sortcounts
    fp = sortcounts.copy()
    for i in range(sortcounts.shape[0]):
        fp[i] = 0.0 if sortcounts[i] >= 1 else 1.0
    prec = np.cumsum(tp) / (np.cumsum(tp) + np.cumsum(fp))
    rec = np.cumsum(tp) / np.sum(targets)
    rec, prec = rec.reshape(rec.size, 1), prec.reshape(prec.size, 1)
    z, o = np.zeros((1, 1)), np.ones((1, 1))
    mrec, mpre = np.vstack((z, rec, o)), np.vstack((z, prec, z))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    indices = np.where(mrec[1:] != mrec[0:-1])[0] + 1
    ap = 0
    for i in indices:
        ap = ap + (mrec[i] - mrec[i - 1]) * mpre[i]
    return float(ap[0])


def test_ap_by_hand():
    # ranked: miss, hit, hit. Envelope precision 2/3 over recall 0 -> 1: AP 2/3 (sklearn's
    # non-interpolated AP: (1/2 + 2/3) / 2 = 7/12).
    assert svm.voc_ap(np.array([0, 1, 1], bool), np.array([3.0, 2.0, 1.0])) == pytest.approx(2 / 3)
    # ranked: hit, miss, miss, hit: precision 1 to recall 1/2, then 1/2: AP 0.75 (the VOC07
    # devkit's 11-point AP: (6 * 1 + 5 * 0.5) / 11 = 0.773).
    hits = np.array([1, 0, 0, 1], bool)
    assert svm.voc_ap(hits, np.array([4.0, 3.0, 2.0, 1.0])) == pytest.approx(0.75)


def test_ap_equals_vissls_loop():
    rng = np.random.default_rng(0)
    for n in (5, 50, 500):
        labels = rng.random(n) < 0.3
        labels[0] = True
        scores = rng.normal(size=n) + labels
        scores[: n // 5] = np.round(scores[: n // 5], 1)  # some ties
        assert svm.voc_ap(labels, scores) == pytest.approx(_vissl_ap(labels, scores), abs=1e-12)


# ---------------------------------------------------------------------------------------
# The SVMs against scikit-learn, the way VISSL's SVMTrainer calls it


def _vissl_reference(train, test, costs, folds, max_iter, seed):
    """VISSL's SVMTrainer.train / train_cls / test, transcribed (one fit per cost, the
    model of the best cross-validated AP kept), with random_state fixed."""
    normalise = lambda x: x / (np.linalg.norm(x, axis=1) + 1e-5)[:, np.newaxis]  # noqa: E731
    (features, targets), (test_features, test_targets) = train, test
    features = normalise(np.array(features).astype(np.float64))
    test_features = normalise(np.array(test_features).astype(np.float64))
    chosen, aps = [], []
    for cls_num in range(targets.shape[1]):
        cls_labels = targets[:, cls_num].astype(dtype=np.int32, copy=True)
        cls_labels[np.where(cls_labels == 0)] = -1
        models, cv = [], []
        for cost in costs:
            clf = LinearSVC(
                C=cost,
                class_weight={1: 2, -1: 1},
                intercept_scaling=1.0,
                penalty="l2",
                loss="squared_hinge",
                tol=0.0001,
                dual=True,
                max_iter=max_iter,
                random_state=seed,
            )
            scores = cross_val_score(
                clf, features, cls_labels, cv=folds, scoring="average_precision"
            )
            cv.append(scores.mean())
            models.append(clf.fit(features, cls_labels))
        best = int(np.argmax(cv))
        chosen.append(costs[best])
        prediction = models[best].decision_function(test_features)
        inds = test_targets[:, cls_num] != -1
        eval_labels = test_targets[:, cls_num][inds].copy()
        eval_labels[np.where(eval_labels == 0)] = -1
        aps.append(_vissl_ap(eval_labels, prediction[inds]))
    return np.array(chosen), np.array(aps)


def _multilabel_features(rng, n, dim=10, classes=4):
    """Class c present when a noisy projection is high; some present ones only "difficult"."""
    w = rng.normal(size=(dim, classes))
    x = rng.normal(size=(n, dim)) + 0.5
    signal = x @ w + rng.normal(size=(n, classes)) * np.linspace(0.5, 3.0, classes)
    labels = (signal > 1.0).astype(np.int8)
    labels[(labels == 1) & (rng.random((n, classes)) < 0.15)] = -1  # difficult only
    return x.astype(np.float32), labels


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_svms_equal_sklearn_as_vissl_calls_it():
    rng = np.random.default_rng(1)
    train, test = _multilabel_features(rng, 240), _multilabel_features(rng, 150)
    cfg = ml_collections.ConfigDict(dict(costs=tuple(VISSL_COSTS), folds=3, max_iter=2000))
    got = svm.voc07_svms(train, test, cfg, seed=0, say=print)
    costs, aps = _vissl_reference(train, test, VISSL_COSTS, 3, 2000, seed=0)
    np.testing.assert_array_equal(got["costs"], costs)
    np.testing.assert_allclose(got["ap"], aps, rtol=0, atol=1e-12)
    assert got["map"] == pytest.approx(100 * aps.mean())
    assert got["cv_ap"].shape == (4, 11) and len(set(costs)) > 1  # the grid matters here
    # Difficult images are negatives in training (VISSL), not ignored: a different model.
    ignored = (train[0][train[1].min(1) >= 0], train[1][train[1].min(1) >= 0])
    assert not np.allclose(svm.voc07_svms(ignored, test, cfg, seed=0, say=print)["ap"], aps)


def test_svms_refuse_a_class_without_positives():
    rng = np.random.default_rng(2)
    x, labels = _multilabel_features(rng, 60)
    labels[:, 1] = 0
    cfg = ml_collections.ConfigDict(dict(costs=(1.0,), folds=3, max_iter=100))
    with pytest.raises(ValueError, match="class 1 has no positive or no negative train image"):
        svm.voc07_svms((x, labels), (x, labels), cfg, seed=0, say=print)


# ---------------------------------------------------------------------------------------
# Preprocessing: VISSL's torchvision transforms on PIL images


def _pil_reference(jpeg: bytes, resize=256, size=224, center_crop=False) -> np.ndarray:
    """torchvision Resize(256) then Resize([224, 224]) (or CenterCrop(224)) on a PIL image:
    its size rule and crop offsets, PIL's bilinear resampling."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    image = image.resize((resize, new_long) if w <= h else (new_long, resize), Image.BILINEAR)
    if center_crop:
        w, h = image.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        return np.asarray(image.crop((left, top, left + size, top + size)))
    return np.asarray(image.resize((size, size), Image.BILINEAR))


def _jpegs(name, data_dir, count):
    builder = source.open_builder(name, data_dir)
    split = sorted(builder.info.splits)[0]
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return [example["image"] for example in dataset.take(count).as_numpy_iterator()]


def _check_against_pil(jpegs):
    for jpeg in jpegs:
        for center_crop in (False, True):
            ours = multilabel.vissl_view(tf.constant(jpeg), 256, 224, center_crop).numpy()
            theirs = _pil_reference(jpeg, center_crop=center_crop)
            diff = np.abs(ours.astype(int) - theirs)
            # JPEG decoding is exact (accurate DCT, as PIL); resampling rounds differently
            assert ours.shape == (224, 224, 3) and diff.max() <= 2 and diff.mean() < 0.35
        # what the other protocols see (center crop 0.875) is another image altogether
        other = augment.eval_view(tf.constant(jpeg), 224).numpy()
        assert np.abs(other.astype(int) - _pil_reference(jpeg)).mean() > 3


def test_preprocessing_matches_pil_on_embedded_images():
    _check_against_pil(_jpegs("cifar10_jpeg_mini", None, 4))  # 32 px: up-sampled


@pytest.mark.shared_data
def test_preprocessing_matches_pil_on_real_photos(shared_tfds_dir):
    # down-sampled (426 x 320 ImageNet photos) and mixed (Caltech-101, ~300 x 200)
    _check_against_pil(_jpegs("imagewoof320_sample", shared_tfds_dir, 4))
    _check_against_pil(_jpegs("caltech101_jpeg", shared_tfds_dir, 4))


# ---------------------------------------------------------------------------------------
# Multi-label batches and the job


def write_multilabel_tfds(root, name, splits: dict) -> None:
    """A VOC-like TFDS dataset: image, image/filename, labels, labels_no_difficult.

    splits: split -> list of (filename, labels, labels_no_difficult, jpeg bytes)."""
    label = tfds.features.Sequence(tfds.features.ClassLabel(num_classes=3))
    feats = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "labels": label,
            "labels_no_difficult": label,
        }
    )
    version = os.path.join(root, name, "1.0.0")
    os.makedirs(version)
    infos = []
    for split, examples in splits.items():
        path = os.path.join(version, f"{name}-{split}.tfrecord-00000-of-00001")
        with tf.io.TFRecordWriter(path) as writer:
            for filename, labels, positive, jpeg in examples:
                example = {
                    "image": jpeg,
                    "image/filename": filename,
                    "labels": labels,
                    "labels_no_difficult": positive,
                }
                writer.write(feats.serialize_example(example))
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)], num_bytes=0))
    tfds.folder_dataset.write_metadata(
        data_dir=version, features=feats, split_infos=infos, check_data=False
    )


def _jpeg(rgb, size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), rgb, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_multilabel_batches(tmp_path):
    examples = [  # name, labels, labels_no_difficult
        ("e.jpg", [0, 2], [2]),
        ("d.jpg", [1], [1]),
        ("c.jpg", [], []),
        ("b.jpg", [0], [0]),
        ("a.jpg", [2], []),
    ]
    rows = [(*example, _jpeg(40 * i)) for i, example in enumerate(examples)]
    names = [name for name, *_ in examples]
    write_multilabel_tfds(str(tmp_path), "multi", {"test": rows})
    cfg = data_config("multi", data_dir=str(tmp_path))

    def batches(**kw):
        return multilabel.multilabel_batches(
            cfg, "test", global_batch=4, image_size=8, resize=10, sort_by="image/filename", **kw
        )

    parts = [list(batches(process_index=p, process_count=2)) for p in range(2)]
    assert [len(p) for p in parts] == [2, 2]  # 3 and 2 examples, batches of 2: equal counts
    masked = [{k: b[k][b["mask"]] for k in ("label", "sort_key")} for p in parts for b in p]
    np.testing.assert_array_equal(
        np.concatenate([m["label"] for m in masked]),
        [[-1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, -1]],  # -1: only difficult
    )
    keys = np.concatenate([m["sort_key"] for m in masked])
    assert keys.shape == (5, 64) and [bytes(k).rstrip(b"\0").decode() for k in keys] == names
    assert parts[0][0]["image"].shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="no multi-label feature 'objects'"):
        batches(label_key="objects")
    with pytest.raises(ValueError, match="no feature 'id' to sort by"):
        multilabel.multilabel_batches(cfg, "test", global_batch=4, image_size=8, sort_by="id")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.usefixtures("compilation_cache")
def test_transfer_job_runs_vissls_protocol_on_name_sorted_rows(tmp_path):
    """The job on a tiny VOC-like set whose stored order is not the name order: the costs
    and APs of VISSL's trainer on the same backbone's features in name order."""
    import jax
    from e2e_eval import load_config, read_results, write_init_checkpoint

    from bt_jax import distributed, main
    from bt_jax.evaluation import backbone, features
    from bt_jax.evaluation.job import replicate

    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]])

    def rows(n, prefix):
        out = []
        for i in rng.permutation(n):
            present = rng.random(3) < 0.4
            present[i % 3] = True
            present[(i + 1) % 3] = False  # every class present in some images, absent in some
            labels = np.flatnonzero(present).tolist()
            positive = [c for c in labels if rng.random() > 0.1]  # the rest: only difficult
            mean = colours[present].sum(0) / present.sum()
            rgb = np.clip(mean + rng.normal(0, 30, 3), 0, 255).astype(np.uint8)
            out.append((f"{prefix}{i:04d}.jpg", labels, positive, _jpeg(rgb)))
        return out

    splits = {"train": rows(48, "tr"), "test": rows(24, "te")}
    write_multilabel_tfds(str(tmp_path), "voclike", splits)
    config = load_config("configs/transfer_voc2007.py")
    config.pretrained_workdir = write_init_checkpoint(tmp_path / "pretrain")
    config.expected_arch = "resnet18"
    config.data = data_config("voclike", data_dir=str(tmp_path), train_split="train")
    config.transfer.update(image_size=16, eval_batch=16)
    costs = (0.1, 10.0, 1000.0)
    config.transfer.svm.update(resize=18, costs=costs)
    results = main.run(config, str(tmp_path / "eval"))
    assert read_results(tmp_path / "eval")["results"] == results
    assert results["transfer_svm_num_test"] == 24

    # The reference: features of the stored order (no sort key), put in name order here.
    net = backbone.load_backbone(config)
    mesh = distributed.make_mesh()
    variables = replicate(net.variables, mesh)
    by_name = []
    for split, written in splits.items():
        batches = multilabel.multilabel_batches(
            config.data, split, global_batch=16, image_size=16, resize=18
        )
        with jax.set_mesh(mesh):
            x, labels = features.extract(net.encoder, variables, batches, mesh)
        order = np.argsort([name for name, *_ in written])
        by_name.append((x[order], labels[order]))
    want_costs, want_ap = _vissl_reference(*by_name, list(costs), 3, 2000, seed=0)
    assert results["transfer_svm_costs"] == want_costs.tolist()
    np.testing.assert_allclose(results["transfer_svm_ap_per_class"], np.round(100 * want_ap, 2))
    assert results["transfer_svm_map"] == pytest.approx(100 * want_ap.mean())
