"""Pipeline behaviour: sharding, determinism, resume, bad input and errors.

Uses the embedded cifar10_jpeg_mini and small TFDS datasets written here; processes are
simulated by passing process_index / process_count.
"""

import hashlib
import io
import itertools
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from bt_jax import distributed
from bt_jax.data import (
    EMBEDDED_DATA_DIR,
    IMAGENET,
    cifar_views,
    data_config,
    eval_batches,
    imagenet_views,
    normalize,
    pretrain_batches,
)

MINI = "cifar10_jpeg_mini"  # train 5,000 / test 1,000, embedded in the package


def _take(batches, steps):
    return list(itertools.islice(iter(batches), steps))


def _digests(images) -> list[str]:
    return [hashlib.sha1(image.tobytes()).hexdigest() for image in images]


def _global_step_sets(process_count, steps, num_streams=4, **kwargs):
    """Per step: the set of (view1, view2) digests over all simulated processes."""
    cfg = data_config(MINI, num_streams=num_streams)
    per_process = [
        _take(
            pretrain_batches(
                cfg,
                cifar_views(16),
                global_batch=32,
                seed=3,
                process_index=p,
                process_count=process_count,
                **kwargs,
            ),
            steps,
        )
        for p in range(process_count)
    ]
    return [
        {
            pair
            for batches in per_process
            for pair in zip(
                _digests(batches[k]["view1"]), _digests(batches[k]["view2"]), strict=True
            )
        }
        for k in range(steps)
    ]


def test_embedded_dataset_is_the_default_for_the_mini_set():
    cfg = data_config(MINI)
    assert cfg.data_dir == "" and cfg.eval_split == "test" and cfg.cache
    assert os.path.isfile(os.path.join(EMBEDDED_DATA_DIR, MINI, "1.0.0", "dataset_info.json"))
    batches = pretrain_batches(cfg, cifar_views(), global_batch=16, seed=0, process_count=1)
    batch = next(iter(batches))
    assert set(batch) == {"view1", "view2", "label"}  # labelled: the online probe's
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert batches.num_classes == 10
    for view in (batch["view1"], batch["view2"]):
        assert view.shape == (16, 32, 32, 3) and view.dtype == np.uint8
    assert batches.steps_per_epoch == 5000 // 16
    assert not np.array_equal(batch["view1"], batch["view2"])  # the two views differ


def test_same_global_batches_on_1_and_2_processes():
    # 2 streams read by 1 process or by 2 (4 processes: the sharding test below).
    reference = _global_step_sets(1, steps=2, num_streams=2)
    assert _global_step_sets(2, steps=2, num_streams=2) == reference
    assert len(reference[0]) == 32 and reference[0] != reference[1]


@pytest.mark.parametrize("cache", [True, False])
def test_deterministic_and_seed_dependent(cache):
    def first_batches(seed, threads):
        cfg = data_config(MINI, cache=cache, shuffle_buffer=512, threads=threads)
        batches = pretrain_batches(
            cfg, cifar_views(16), global_batch=16, seed=seed, process_index=0, process_count=1
        )
        return _take(batches, 2)

    # Same seed, different thread counts: identical; another seed: different.
    a, b, c = first_batches(0, threads=1), first_batches(0, threads=2), first_batches(1, 0)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["view1"], y["view1"])
        np.testing.assert_array_equal(x["view2"], y["view2"])
    assert not np.array_equal(a[0]["view1"], c[0]["view1"])


@pytest.mark.parametrize("cache", [True, False])
def test_resume_continues_exactly_across_an_epoch(cache):
    # train[:256], 2 streams of 128, batches of 2 x 32: 4 steps per epoch.
    cfg = data_config(MINI, train_split="train[:256]", num_streams=2, cache=cache)

    def run(start_step, steps):
        batches = pretrain_batches(
            cfg,
            cifar_views(16),
            global_batch=64,
            seed=5,
            start_step=start_step,
            process_index=0,
            process_count=1,
        )
        assert batches.steps_per_epoch == 4
        return _take(batches, steps)

    full = run(0, 7)
    resumed = run(5, 2)  # mid-epoch 1, after an epoch boundary
    for x, y in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(x["view1"], y["view1"])
        np.testing.assert_array_equal(x["view2"], y["view2"])
    # A new epoch is a new permutation of the same examples.
    assert not np.array_equal(full[0]["view1"], full[4]["view1"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_one_epoch_shards_are_disjoint_and_cover_the_split(process_count):
    cfg = data_config(MINI, num_streams=4)
    ids = []
    for p in range(process_count):
        batches = pretrain_batches(
            cfg,
            cifar_views(8),
            global_batch=500,
            seed=0,
            process_index=p,
            process_count=process_count,
            with_ids=True,
        )
        assert batches.steps_per_epoch == 10
        ids.append([i for b in _take(batches, 10) for i in b["id"]])
    assert sum(len(x) for x in ids) == 5000
    assert len(set().union(*map(set, ids))) == 5000  # disjoint and the whole split
    assert all(len(set(x)) == len(x) == 5000 // process_count for x in ids)


@pytest.mark.parametrize("process_count", [2, 4])
def test_eval_pass_covers_the_split_once_with_equal_batch_counts(process_count):
    cfg = data_config(MINI)
    passes = [
        eval_batches(
            cfg,
            "test",
            global_batch=96,
            image_size=16,
            process_index=p,
            process_count=process_count,
            with_ids=True,
        )
        for p in range(process_count)
    ]
    assert len({e.num_batches for e in passes}) == 1
    assert passes[0].num_examples == 1000 and passes[0].num_classes == 10
    seen = []
    for e in passes:
        batches = list(e)
        assert len(batches) == e.num_batches
        for b in batches:
            assert b["image"].shape == (96 // process_count, 16, 16, 3)
            assert b["image"].dtype == np.uint8 and b["label"].dtype == np.int32
            seen += list(b["id"][b["mask"]])
            assert (b["id"][~b["mask"]] == b"").all()
    assert len(seen) == len(set(seen)) == 1000


def test_eval_train_augment_epochs():
    e = eval_batches(
        data_config(MINI),
        "test",
        global_batch=100,
        image_size=16,
        train_augment=True,
        epochs=2,
        process_index=0,
        process_count=1,
    )
    batches = list(e)
    assert e.num_batches == 10 and len(batches) == 20
    assert batches[0]["mask"].all() and batches[0]["image"].shape == (100, 16, 16, 3)
    labels = np.concatenate([b["label"] for b in batches[:10]])
    assert np.bincount(labels).tolist() == [100] * 10  # one epoch: every example once


# ---------------------------------------------------------------------------------------
# Bad input: a small TFDS dataset written here.


def _encoded(kind: str, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(len(kind))
    pixels = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    buffer = io.BytesIO()
    if kind == "rgb":
        Image.fromarray(pixels[..., :3]).save(buffer, "JPEG")
    elif kind == "gray":
        Image.fromarray(pixels[..., 0], "L").save(buffer, "JPEG")
    elif kind == "cmyk":
        Image.fromarray(pixels, "CMYK").save(buffer, "JPEG")
    elif kind == "png":  # PNG bytes in the JPEG field
        Image.fromarray(pixels[..., :3]).save(buffer, "PNG")
    elif kind == "tiny":
        Image.fromarray(pixels[:10, :10, :3]).save(buffer, "JPEG")
    elif kind == "garbage":
        return b"this is not an image"
    elif kind == "truncated":
        return _encoded("rgb")[:120]
    return buffer.getvalue()


KINDS = ("rgb", "gray", "cmyk", "png", "tiny", "garbage", "truncated")
UNDECODABLE = ("garbage", "truncated")


def _write_tfds(root, name, splits: dict, with_label=True) -> None:
    """A prepared TFDS dataset (image, id[, label]) from encoded bytes, no re-encoding."""
    version_dir = os.path.join(root, name, "1.0.0")
    os.makedirs(version_dir, exist_ok=True)
    features = {"image": tfds.features.Image(encoding_format="jpeg"), "id": tfds.features.Text()}
    if with_label:
        features["label"] = tfds.features.ClassLabel(num_classes=len(KINDS))
    infos = []
    for split, examples in splits.items():
        path = os.path.join(version_dir, f"{name}-{split}.tfrecord-00000-of-00001")
        with tf.io.TFRecordWriter(path) as writer:
            for i, (data, label) in enumerate(examples):
                feature = {
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                    "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"%d" % i])),
                }
                if with_label:
                    feature["label"] = tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[label])
                    )
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)], num_bytes=0))
    tfds.folder_dataset.write_metadata(
        data_dir=version_dir,
        features=tfds.features.FeaturesDict(features),
        split_infos=infos,
        check_data=False,
    )


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds"))
    examples = [(_encoded(kind), label) for label, kind in enumerate(KINDS)]
    _write_tfds(root, "bad_images", {"train": examples * 4, "test": examples})
    _write_tfds(root, "unlabelled", {"train": examples[:2]}, with_label=False)
    return root


@pytest.mark.parametrize("cache", [True, False])
def test_bad_images_stream_skip_and_count(bad_dir, cache):
    cfg = data_config("bad_images", data_dir=bad_dir, cache=cache, shuffle_buffer=64)
    batches = pretrain_batches(
        cfg, imagenet_views(40), global_batch=5, seed=0, process_index=0, process_count=1
    )
    assert batches.steps_per_epoch == 28 // 5
    steps = _take(batches, 2 * batches.steps_per_epoch)
    for batch in steps:
        assert batch["view1"].shape == (5, 40, 40, 3) and batch["view1"].dtype == np.uint8
    # 2 of 7 undecodable; steps kept 50 images, so about 50 * 2/5 records were skipped.
    assert 10 <= batches.num_skipped <= 30


@pytest.mark.parametrize("cache", [True, False])
def test_resume_on_corrupt_data_is_exact_given_the_per_stream_skips(bad_dir, cache):
    """Undecodable records shift a stream: resuming at start_step * batch would re-read
    records. Told how many each stream skipped (what checkpoints record), the resumed
    pipeline yields exactly the uninterrupted one's batches, views included."""
    cfg = data_config("bad_images", data_dir=bad_dir, cache=cache, num_streams=2)

    def batches(**resume):
        return pretrain_batches(cfg, cifar_views(16), global_batch=4, seed=0, process_index=0,
                                process_count=1, with_ids=True, **resume)  # fmt: skip

    whole = batches()
    steps = _take(whole, 10)
    per_stream = sum(list(whole.skipped_per_batch)[:4])
    assert per_stream.sum() > 0 and len(per_stream) == 2
    resumed = _take(batches(start_step=4, skipped_before=per_stream), 6)
    for got, expected in zip(resumed, steps[4:], strict=True):
        assert got["id"].tolist() == expected["id"].tolist()
        np.testing.assert_array_equal(got["view1"], expected["view1"])
    naive = _take(batches(start_step=4), 6)  # the old resume: records counted as if clean
    assert [b["id"].tolist() for b in naive] != [b["id"].tolist() for b in steps[4:]]


def test_bad_images_in_eval(bad_dir):
    cfg = data_config("bad_images", data_dir=bad_dir)
    e = eval_batches(cfg, "test", global_batch=4, image_size=24, process_count=1)
    batches = list(e)
    assert len(batches) == e.num_batches == 2
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    decodable = [i for i, kind in enumerate(KINDS) if kind not in UNDECODABLE]
    assert sorted(labels.tolist()) == decodable
    assert e.num_skipped == len(UNDECODABLE)
    for b in batches:  # grayscale / CMYK / PNG / tiny images all come out RGB at 24 px
        assert b["image"].shape == (4, 24, 24, 3)


def test_errors_name_what_exists(bad_dir):
    with pytest.raises(ValueError, match="bad_images"):
        pretrain_batches(
            data_config("bad_imagez", data_dir=bad_dir), cifar_views(), global_batch=4, seed=0
        )
    with pytest.raises(ValueError, match=r"'test', 'train'"):
        eval_batches(
            data_config("bad_images", data_dir=bad_dir), "validation", global_batch=4, image_size=8
        )
    with pytest.raises(ValueError, match="no ClassLabel"):
        eval_batches(
            data_config("unlabelled", data_dir=bad_dir), "train", global_batch=2, image_size=8
        )
    with pytest.raises(ValueError, match="multiple of the process count"):
        pretrain_batches(
            data_config(MINI, num_streams=3),
            cifar_views(),
            global_batch=12,
            seed=0,
            process_index=0,
            process_count=2,
        )
    with pytest.raises(ValueError, match="divisible by num_streams"):
        pretrain_batches(
            data_config(MINI, num_streams=4),
            cifar_views(),
            global_batch=10,
            seed=0,
            process_index=0,
            process_count=1,
        )


def test_normalize_and_global_arrays():
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = jax.jit(normalize, static_argnums=1)(images, IMAGENET)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (images / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)

    mesh = distributed.make_mesh()
    batches = pretrain_batches(
        data_config(MINI), cifar_views(8), global_batch=16, seed=0, process_count=1
    )
    host = next(iter(batches))
    batch = next(distributed.prefetch_to_mesh(batches, mesh, size=2))
    assert batch["view1"].shape == (16, 8, 8, 3) and batch["view1"].dtype == np.uint8
    assert batch["view1"].sharding.spec[0] == distributed.DATA_AXIS
    assert len(batch["view1"].addressable_shards) == jax.device_count()
    np.testing.assert_array_equal(np.asarray(batch["view1"]), host["view1"])


@pytest.mark.shared_data
def test_shared_sets_load(shared_tfds_dir):
    cfg = data_config("cifar10_jpeg", data_dir=shared_tfds_dir)
    batch = next(
        iter(pretrain_batches(cfg, cifar_views(), global_batch=8, seed=0, process_count=1))
    )
    assert batch["view1"].shape == (8, 32, 32, 3)
    cfg = data_config("imagewoof320_sample", data_dir=shared_tfds_dir, train_split="val")
    batch = next(
        iter(pretrain_batches(cfg, imagenet_views(), global_batch=4, seed=0, process_count=1))
    )
    assert batch["view2"].shape == (4, 224, 224, 3)
    e = eval_batches(
        data_config("caltech101_jpeg", data_dir=shared_tfds_dir),
        "test",
        global_batch=8,
        image_size=224,
        process_count=1,
    )
    assert e.num_classes == 101 and next(iter(e))["image"].shape == (8, 224, 224, 3)


def test_device_pixel_ops_batches():
    views = cifar_views(16, pixel_ops="device")
    batches = pretrain_batches(data_config(MINI), views, global_batch=8, seed=0, process_count=1)
    batch = next(iter(batches))
    assert set(batch) == {"view1", "view2", "view1_ops", "view2_ops", "label"}
    assert batch["view1_ops"].shape == (8, 13) and batch["view1_ops"].dtype == np.float32
    from bt_jax.data.device_ops import finish_views

    mesh = distributed.make_mesh()  # as in the train step: batch sharded on explicit axes
    with jax.set_mesh(mesh):
        sharded = distributed.host_to_global(batch, mesh)
        view1, view2 = jax.jit(lambda b: finish_views(b, views, IMAGENET))(sharded)
    assert view1.shape == (8, 16, 16, 3) and view1.dtype == np.float32
    assert view1.sharding.spec[0] == distributed.DATA_AXIS
    assert np.isfinite(np.asarray(view2)).all()


def test_normalization_presets_follow_the_dataset_and_cifars_fit_its_pixels():
    """auto: cifar* -> CIFAR-10's statistics, anything else ImageNet's; CIFAR-10's preset
    against the mean / std of every pixel of the embedded training images (a JPEG copy:
    its red and blue means sit 0.005-0.007 below the original PNG pixels' preset)."""
    from bt_jax.data import normalization

    for dataset, preset in [
        ("cifar10", "cifar10"),
        ("cifar100", "cifar10"),
        (MINI, "cifar10"),
        ("imagenet2012", "imagenet"),
        ("imagenet2012_subset/1pct", "imagenet"),
        ("my_images", "imagenet"),
    ]:
        assert normalization.resolve("auto", dataset) == preset
        assert normalization.resolve("imagenet", dataset) == "imagenet"
    with pytest.raises(ValueError, match="unknown normalization 'cifar'; choose one of auto"):
        normalization.resolve("cifar", "cifar10")
    old_run = {"model": {"arch": "resnet18"}, "data": {"dataset": "cifar10"}}
    assert normalization.of_config(old_run) == normalization.IMAGENET  # before the field

    ds = tfds.load(MINI, split="train", data_dir=EMBEDDED_DATA_DIR, batch_size=5000)
    pixels = next(iter(tfds.as_numpy(ds)))["image"].reshape(-1, 3) / 255.0
    cifar = normalization.PRESETS["cifar10"]
    np.testing.assert_allclose(pixels.mean(0), cifar.mean, atol=0.008)
    np.testing.assert_allclose(pixels.std(0), cifar.std, atol=0.002)
    assert np.abs(pixels.std(0) - IMAGENET.std).min() > 0.015  # and not ImageNet's


def test_pretraining_labels_are_the_records_own():
    """The label travels with its image: by TFDS id, every label equals the dataset's."""
    cfg = data_config(MINI, num_streams=2)
    batches = pretrain_batches(
        cfg, cifar_views(16), global_batch=64, seed=1, process_count=1, with_ids=True
    )
    truth = {
        example["id"]: example["label"]
        for example in tfds.as_numpy(tfds.load(MINI, split="train", data_dir=EMBEDDED_DATA_DIR))
    }
    for batch in _take(batches, 2):
        assert [truth[i] for i in batch["id"]] == batch["label"].tolist()
