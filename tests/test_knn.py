"""The sharded kNN classifier against a brute-force numpy implementation of the protocol,
and the kNN job against the pretraining monitor and that reference on a real checkpoint."""

import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from bt_jax.data import IMAGENET, normalize
from bt_jax.distributed import make_mesh, replicated
from bt_jax.evaluation import knn
from bt_jax.evaluation.features import Encoder


class Flatten(nn.Module):
    """A parameter-free 'backbone': features are the normalised pixels."""

    @nn.compact
    def __call__(self, x, train=False):
        return x.reshape(x.shape[0], -1)


def make_batches(rng, num_batches, batch, num_valid, num_classes):
    images = rng.integers(0, 256, (num_batches * batch, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, num_batches * batch).astype(np.int32)
    mask = np.arange(num_batches * batch) < num_valid  # the padded tail is masked out
    return [
        {
            "image": images[i : i + batch],
            "label": labels[i : i + batch],
            "mask": mask[i : i + batch],
        }
        for i in range(0, num_batches * batch, batch)
    ]


def reference_votes(bank_x, bank_y, query_x, query_y, k, temperature, num_classes):
    """The vote written out on L2-normalised float64 features: cosine similarity, top k,
    exp(sim / T) votes, top-1/top-5 (percent) and the number of queries."""
    top1 = top5 = 0
    for x, y in zip(query_x, query_y, strict=True):
        sims = bank_x @ x
        nearest = np.argsort(-sims)[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, bank_y[nearest], np.exp(sims[nearest] / temperature))
        voted = [c for c in np.argsort(-votes, kind="stable") if votes[c] > 0]
        top1 += voted[0] == y
        top5 += y in voted[:5]  # a class nobody voted for is not a prediction
    return 100 * top1 / len(query_y), 100 * top5 / len(query_y), len(query_y)


def reference_knn(bank, queries, k, temperature, num_classes):
    """The protocol on the normalised pixels of host batches (the Flatten 'backbone')."""

    def features(batches):
        x = (
            np.concatenate([np.asarray(normalize(b["image"], IMAGENET)) for b in batches])
            .reshape(-1, 48)
            .astype(np.float64)
        )
        m = np.concatenate([b["mask"] for b in batches])
        y = np.concatenate([b["label"] for b in batches])
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x[m], y[m]

    return reference_votes(*features(bank), *features(queries), k, temperature, num_classes)


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("k", [5, 30])
def test_matches_brute_force(num_devices, k):
    rng = np.random.default_rng(k)
    bank = make_batches(rng, num_batches=4, batch=16, num_valid=57, num_classes=7)
    queries = make_batches(rng, num_batches=2, batch=16, num_valid=27, num_classes=7)
    head = {  # a linear probe scored on the same query features
        "kernel": rng.normal(size=(48, 7)).astype(np.float32),
        "bias": rng.normal(size=7).astype(np.float32),
    }
    got = knn.knn_accuracy(
        Encoder(Flatten(), IMAGENET),
        {},
        bank,
        queries,
        make_mesh(num_devices),
        k=k,
        temperature=0.1,
        num_classes=7,
        probe=head,
    )
    top1, top5, count = reference_knn(bank, queries, k, 0.1, 7)
    assert got["num_queries"] == count == 27
    assert got["top1"] == pytest.approx(top1)
    assert got["top5"] == pytest.approx(top5)

    def pixels(batches):  # the Flatten features, unpadded rows, float64
        x = np.concatenate([np.asarray(normalize(b["image"], IMAGENET)) for b in batches])
        keep = np.concatenate([b["mask"] for b in batches])
        y = np.concatenate([b["label"] for b in batches])
        return x.reshape(len(x), -1).astype(np.float64)[keep], y[keep]

    # RankMe of the bank's raw features (Garrido et al.: p = sigma / ||sigma||_1 + 1e-7)
    sigma = np.linalg.svd(pixels(bank)[0], compute_uv=False)
    p = sigma / sigma.sum() + 1e-7
    assert got["rankme"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-4)
    x, y = pixels(queries)
    logits = x @ head["kernel"] + head["bias"]
    assert got["probe_top1"] == pytest.approx(100 * np.mean(np.argmax(logits, 1) == y))


def test_rankme_on_known_spectra():
    """exp(entropy) of the normalised spectrum: r equal singular values give r; a spectrum
    (1, 1/2, 1/4, 1/8) gives exp(H) of p = (8, 4, 2, 1) / 15, written out by hand."""
    from bt_jax.evaluation.features import rankme, rankme_of_gram

    assert rankme([3.0] * 5 + [0.0] * 3) == pytest.approx(5.0, rel=1e-5)
    p = np.array([8, 4, 2, 1]) / 15
    assert rankme([1, 0.5, 0.25, 0.125]) == pytest.approx(np.exp(-(p * np.log(p)).sum()), 1e-5)
    x = np.random.default_rng(0).normal(size=(50, 6)) @ np.diag([5, 4, 3, 2, 1, 0.5])
    sigma = np.linalg.svd(x, compute_uv=False)
    assert rankme_of_gram(x.T @ x) == pytest.approx(rankme(sigma), rel=1e-9)


@pytest.mark.slow
def test_job_equals_monitor_and_brute_force(tmp_path):
    """One checkpoint (the smoke model at initialisation), three computations of its kNN:
    configs/knn.py:smoke's job, the pretraining job's monitor with the smoke pretraining
    config's kNN section, and reference_votes on features from an unjitted forward pass
    (float64 similarities)."""
    from e2e_eval import write_init_checkpoint

    from bt_jax import checkpoint, knn_eval, models, pretrain, reporting
    from bt_jax.data import eval_batches, normalization
    from bt_jax.defaults import load_config

    pretrained = write_init_checkpoint(tmp_path / "pretrain")
    config = load_config("configs/knn.py:smoke")
    config.pretrained_workdir = pretrained
    job = knn_eval.run(config, str(tmp_path / "knn"))

    pretrain_config = load_config("configs/quickstart.py:smoke")
    for field in ("k", "temperature", "image_size", "bank_split", "query_split"):
        assert pretrain_config.knn[field] == config.knn[field]  # the batch size differs
    assert pretrain_config.data.to_dict() == config.data.to_dict()
    variables, _, _ = checkpoint.restore_model_variables(pretrained)
    mesh = make_mesh()
    state = types.SimpleNamespace(**jax.device_put(variables, replicated(mesh)), probe_params=None)
    model = models.build_model(pretrain_config.model)
    writer = reporting.MetricWriter(str(tmp_path / "monitor"))
    monitor = pretrain._knn_monitor(
        pretrain_config, model, state, mesh, writer, reporting.Progress(1, 0), 1
    )
    writer.close()
    # RankMe's Gram is summed over batches of another size: equal up to float32 rounding
    assert monitor.pop("rankme") == pytest.approx(job["rankme"], rel=1e-5)
    assert monitor == {k: v for k, v in job.items() if k != "rankme"}

    backbone_vars = {k: v["backbone"] for k, v in variables.items()}

    def features(split):
        xs, ys = [], []
        for batch in eval_batches(config.data, split, global_batch=100, image_size=16):
            keep = batch["mask"]
            images = normalize(batch["image"][keep], normalization.of_config(pretrain_config))
            xs.append(np.asarray(model.backbone.apply(backbone_vars, images, train=False)))
            ys.append(batch["label"][keep])
        x = np.concatenate(xs).astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True), np.concatenate(ys)

    top1, top5, count = reference_votes(*features("train"), *features("test"), 200, 0.1, 10)
    assert job["knn_num_queries"] == count == 1000
    assert job["knn_top1"] == pytest.approx(top1)
    assert job["knn_top5"] == pytest.approx(top5)
    assert 0 < top1 < 100
