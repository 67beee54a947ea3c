"""Frozen backbone features: of a batch on the devices, of a whole split on every host.

Encoder is a backbone as every evaluation uses it: uint8 images in, features out, the
images standardised with the statistics the backbone was trained with (its pretraining
run's, whatever dataset it is shown; bt_jax/data/normalization.py). backbone_features is
the inference-mode forward pass every frozen protocol uses (kNN too); rankme the effective
rank of a feature matrix (Garrido et al., 2023).
extract gives the features of a whole split, in the split's order, for the protocols that
train on precomputed features (the fast linear check, transfer's regularised logistic
regression and VOC07 SVMs); shuffled_batches / ordered_batches feed them back as batches,
rows_to_global as row-sharded arrays. Features are computed on the devices
(eval preprocessing, inference-mode BN), each process keeps its own rows, and the rows of
all processes are gathered in process order. Process p reads the p-th contiguous part of the
split (bt_jax.data.eval_batches), so the result is in the split's order whatever the number
of processes, and padded rows (mask False) are dropped: every example appears exactly once.

Memory: N x F float32 on every host (ImageNet, ResNet-50: 10.5 GB).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from bt_jax import distributed
from bt_jax.data.normalization import Normalization, normalize


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A backbone module and the input statistics it was trained with (hashable: a static
    jit argument). apply takes uint8 images and normalises them first."""

    module: nn.Module
    normalization: Normalization

    @property
    def num_features(self) -> int:
        return self.module.num_features

    def apply(self, variables, images: jax.Array, *, train: bool = False, **kwargs):
        return self.module.apply(
            variables, normalize(images, self.normalization), train=train, **kwargs
        )


@functools.partial(jax.jit, static_argnames=("backbone",))
def backbone_features(backbone: Encoder, variables, images: jax.Array) -> jax.Array:
    """Inference-mode pooled features (float32) of a global batch of uint8 images."""
    return backbone.apply(variables, images).astype(jnp.float32)


def rankme(singular_values, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., 2023): exp of the entropy of p_k = sigma_k / ||sigma||_1 + eps.

    Between 1 (one direction) and the feature count (a flat spectrum): the effective number
    of dimensions the representation uses; collapse shows as a falling RankMe.
    """
    s = np.asarray(singular_values, np.float64)
    p = s / np.sum(s) + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def rankme_of_gram(gram) -> float:
    """RankMe of a feature matrix X from its Gram X^T X ([F, F]): sigma = sqrt(eig)."""
    eigenvalues = np.linalg.eigvalsh(np.asarray(gram, np.float64))
    return rankme(np.sqrt(np.clip(eigenvalues, 0.0, None)))


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order it fed them."""
    shards = {s.index[0].start or 0: s for s in x.addressable_shards}  # replicas share a start
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def extract(
    backbone: Encoder, variables, batches: Iterable, mesh: Mesh, keys=("label",)
) -> tuple[np.ndarray, ...]:
    """(features [N, F] float32, then batch[key] [N, ...] for each of keys) of every
    unpadded example, on every host: (features, labels) by default."""
    feats, rows = [], {key: [] for key in (*keys, "mask")}
    for batch in batches:
        images = distributed.host_to_global({"image": batch["image"]}, mesh)["image"]
        feats.append(backbone_features(backbone, variables, images))  # async
        for key, kept in rows.items():
            kept.append(batch[key])
    if not feats:
        raise ValueError("the split yielded no batches")
    local = {key: np.concatenate(kept) for key, kept in rows.items()}
    local["feature"] = np.concatenate([_local_rows(f) for f in feats])
    if jax.process_count() > 1:  # equal shapes everywhere: eval batches are padded
        local = multihost_utils.process_allgather(local, tiled=True)
    keep = local["mask"].astype(bool)
    return tuple(local[key][keep] for key in ("feature", *keys))


def rows_to_global(arrays: dict, mesh: Mesh) -> dict:
    """Host arrays with the same rows on every process -> row-sharded global arrays.

    Rows are padded to a multiple of the device count; "mask" marks the real ones.
    """
    n = len(next(iter(arrays.values())))
    devices, processes = mesh.devices.size, jax.process_count()
    padded = -(-n // devices) * devices
    per_process = padded // processes
    lo = jax.process_index() * per_process
    out = {}
    for key, value in {**arrays, "mask": np.ones(n, bool)}.items():
        value = np.asarray(value)
        pad = np.zeros((padded - n, *value.shape[1:]), value.dtype)
        out[key] = np.concatenate([value, pad])[lo : lo + per_process]
    return distributed.host_to_global(out, mesh)


def shuffled_batches(
    features: np.ndarray, labels: np.ndarray, *, global_batch: int, seed: int, epoch: int
) -> Iterator[dict]:
    """One epoch of host-local batches of precomputed features, a permutation per epoch.

    The global batch at each step is the same set of rows on any number of processes (the
    permutation depends only on seed and epoch); process p takes its slice. The last batch
    is padded with mask False, so the loss (a masked mean) and every count see each example
    once per epoch.
    """
    n = len(features)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    steps = -(-n // global_batch)
    order = np.concatenate([order, np.zeros(steps * global_batch - n, order.dtype)])
    mask = np.arange(steps * global_batch) < n
    count = jax.process_count()
    local = global_batch // count
    for step in range(steps):
        lo = step * global_batch + jax.process_index() * local
        rows = order[lo : lo + local]
        yield {"image": features[rows], "label": labels[rows], "mask": mask[lo : lo + local]}


def ordered_batches(
    features: np.ndarray, labels: np.ndarray, *, global_batch: int
) -> Iterator[dict]:
    """One pass over precomputed features in order, the last batch padded (mask False)."""
    n = len(features)
    steps = num_steps(n, global_batch)
    local = global_batch // jax.process_count()
    for step in range(steps):
        lo = step * global_batch + jax.process_index() * local
        index = np.arange(lo, lo + local)
        rows = np.minimum(index, n - 1)  # padding repeats the last row, masked out
        yield {"image": features[rows], "label": labels[rows], "mask": index < n}


def num_steps(n: int, global_batch: int) -> int:
    return -(-n // global_batch)
