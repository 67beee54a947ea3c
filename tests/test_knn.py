"""The sharded kNN classifier against a brute-force numpy implementation of the protocol."""

import flax.linen as nn
import numpy as np
import pytest

from bt_jax.data import normalize
from bt_jax.distributed import make_mesh
from bt_jax.evaluation import knn


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


def reference_knn(bank, queries, k, temperature, num_classes):
    """The protocol written out: cosine similarity, top k, exp(sim / T) votes, top-1/top-5."""

    def features(batches):
        x = (
            np.concatenate([np.asarray(normalize(b["image"])) for b in batches])
            .reshape(-1, 48)
            .astype(np.float64)
        )
        m = np.concatenate([b["mask"] for b in batches])
        y = np.concatenate([b["label"] for b in batches])
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x[m], y[m]

    bx, by = features(bank)
    qx, qy = features(queries)
    top1 = top5 = 0
    for x, y in zip(qx, qy, strict=True):
        sims = bx @ x
        nearest = np.argsort(-sims)[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, by[nearest], np.exp(sims[nearest] / temperature))
        voted = [c for c in np.argsort(-votes, kind="stable") if votes[c] > 0]
        top1 += voted[0] == y
        top5 += y in voted[:5]  # a class nobody voted for is not a prediction
    return 100 * top1 / len(qy), 100 * top5 / len(qy), len(qy)


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("k", [5, 30])
def test_matches_brute_force(num_devices, k):
    rng = np.random.default_rng(k)
    bank = make_batches(rng, num_batches=4, batch=16, num_valid=57, num_classes=7)
    queries = make_batches(rng, num_batches=2, batch=16, num_valid=27, num_classes=7)
    got = knn.knn_accuracy(
        Flatten(), {}, bank, queries, make_mesh(num_devices), k=k, temperature=0.1, num_classes=7
    )
    top1, top5, count = reference_knn(bank, queries, k, 0.1, 7)
    assert got["num_queries"] == count == 27
    assert got["top1"] == pytest.approx(top1)
    assert got["top5"] == pytest.approx(top5)
