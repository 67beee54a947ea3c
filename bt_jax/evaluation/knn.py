"""Weighted kNN classification on frozen backbone features: the one implementation behind
the pretraining monitor and the kNN job.

Features: the backbone's pooled output in inference mode (running BN statistics) on
images normalised with its training statistics (features.Encoder), L2-normalised. A
query's k nearest bank examples by cosine similarity vote for their class with weight
exp(similarity / temperature); top-1 and top-5 of the vote. The protocol's numbers (k,
temperature, splits) are config.knn's: bt_jax/defaults.py knn_config(). Alongside: RankMe of
the bank's raw features, from their [F, F] Gram summed batch by batch, and optionally a
linear head's accuracy on the query features (the pretraining job's online probe).

Scale: the bank stays on the devices, sharded by rows as it was computed (a stack of
per-batch [B, F] arrays, P(None, "data")), so no host or device ever holds all of it. For
each query batch, every device ranks all queries against its own bank rows; an all-to-all
hands each device its own queries' candidates from every device, which it merges and votes
on. Each device counts its own queries and the counts are psum'd: a psum is typed
replicated, so shard_map checks the P() output (an all-gathered vote would be typed
device-varying and fail that check). Padded rows (mask False) never enter the bank or the
counts, so every example counts exactly once on any number of processes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bt_jax import data, distributed
from bt_jax.evaluation import classifier
from bt_jax.evaluation.features import Encoder, backbone_features, rankme_of_gram

AXIS = distributed.DATA_AXIS
_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def _l2_normalised(features: jax.Array) -> jax.Array:
    return features * jax.lax.rsqrt(jnp.sum(jnp.square(features), -1, keepdims=True) + 1e-12)


def embed(backbone: Encoder, variables, images: jax.Array) -> jax.Array:
    """L2-normalised inference-mode features of a global batch of uint8 images."""
    return _l2_normalised(backbone_features(backbone, variables, images))


@functools.partial(jax.jit, static_argnames=("mesh",))
def _gram(features: jax.Array, mask: jax.Array, *, mesh: Mesh) -> jax.Array:
    """sum over unpadded rows of f f^T ([F, F], replicated): the bank's RankMe input."""
    kept = features * mask[:, None].astype(features.dtype)
    return jnp.einsum(
        "nf,ng->fg", kept, kept, precision=_HIGHEST, out_sharding=NamedSharding(mesh, P())
    )


def extract(backbone: Encoder, variables, batches: Iterable, mesh: Mesh):
    """Normalised features, labels and masks of every batch, stacked: [num_batches, B, ...]
    on the devices; and the Gram of the raw (unnormalised) features of the unpadded rows."""
    feats, labels, masks, gram = [], [], [], 0.0
    for batch in distributed.prefetch_to_mesh(batches, mesh):
        raw = backbone_features(backbone, variables, batch["image"])
        feats.append(_l2_normalised(raw))
        gram = gram + _gram(raw, batch["mask"], mesh=mesh)
        labels.append(batch["label"])
        masks.append(batch["mask"])
    if not feats:
        raise ValueError("the evaluation split yielded no batches")
    stack = jax.jit(lambda xs: jnp.stack(xs))
    return (stack(feats), stack(labels), stack(masks)), gram


def _vote_counts(
    bank, bank_labels, bank_mask, queries, query_labels, query_mask, *, k, temperature, num_classes
):
    """shard_map body: psum'd (top-1 correct, top-5 correct, valid) counts of a query batch."""
    bank = bank.reshape(-1, bank.shape[-1])  # this device's rows of every bank batch
    bank_labels, bank_mask = bank_labels.reshape(-1), bank_mask.reshape(-1)
    all_queries = jax.lax.all_gather(queries, AXIS, tiled=True)

    sims = jnp.einsum("qf,bf->qb", all_queries, bank, precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(bank_mask[None, :], sims, -jnp.inf)
    top_sims, top_idx = jax.lax.top_k(sims, min(k, sims.shape[1]))
    top_labels = bank_labels[top_idx]
    # [Q, k] per device -> [Q / W, W k]: this device's queries, candidates from every device.
    top_sims = jax.lax.all_to_all(top_sims, AXIS, split_axis=0, concat_axis=1, tiled=True)
    top_labels = jax.lax.all_to_all(top_labels, AXIS, split_axis=0, concat_axis=1, tiled=True)
    top_sims, idx = jax.lax.top_k(top_sims, min(k, top_sims.shape[1]))
    top_labels = jnp.take_along_axis(top_labels, idx, axis=1)

    weights = jnp.where(jnp.isfinite(top_sims), jnp.exp(top_sims / temperature), 0.0)
    votes = jnp.einsum("qk,qkc->qc", weights, jax.nn.one_hot(top_labels, num_classes))
    ranked_votes, ranked = jax.lax.top_k(votes, min(5, num_classes))
    # A class without a single vote is not a prediction (with k < 5 neighbours, or few
    # classes among them, top-5 would otherwise be filled by index order).
    hit = (ranked == query_labels[:, None]) & (ranked_votes > 0)
    counts = (
        jnp.sum(hit[:, 0] & query_mask),
        jnp.sum(jnp.any(hit, axis=1) & query_mask),
        jnp.sum(query_mask),
    )
    return jax.lax.psum(counts, AXIS)


@functools.partial(jax.jit, static_argnames=("mesh", "k", "temperature", "num_classes"))
def _count_batch(
    bank, bank_labels, bank_mask, queries, labels, mask, *, mesh, k, temperature, num_classes
):
    body = functools.partial(_vote_counts, k=k, temperature=temperature, num_classes=num_classes)
    rows, batch = P(None, AXIS), P(AXIS)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(rows, rows, rows, batch, batch, batch), out_specs=P()
    )(bank, bank_labels, bank_mask, queries, labels, mask)


def knn_accuracy(
    backbone: Encoder,
    variables,
    bank_batches: Iterable,
    query_batches: Iterable,
    mesh: Mesh,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    probe=None,
) -> dict:
    """Top-1 / top-5 (percent) of the weighted kNN vote; counts every unpadded query once.

    bank_batches, query_batches: host-local {"image" uint8, "label", "mask"} batches (as
    bt_jax.data.eval_batches yields); variables: the backbone's, on the devices. Also
    "rankme": RankMe of the bank's raw backbone features (computed from their [F, F] Gram,
    so nothing more is kept than the bank itself). probe: parameters of a linear head
    (classifier.linear_head) on the raw features, scored on the same query features:
    "probe_top1" / "probe_top5".
    """
    bank, bank_gram = extract(backbone, variables, bank_batches, mesh)
    counts, probe_counts = [], []
    for batch in distributed.prefetch_to_mesh(query_batches, mesh):
        raw = backbone_features(backbone, variables, batch["image"])
        counts.append(
            _count_batch(
                *bank,
                _l2_normalised(raw),
                batch["label"],
                batch["mask"],
                mesh=mesh,
                k=k,
                temperature=temperature,
                num_classes=num_classes,
            )
        )
        if probe is not None:
            inputs = {"image": raw, "label": batch["label"], "mask": batch["mask"]}
            probe_counts.append(
                classifier.eval_counts(
                    {"head": probe}, {}, inputs, backbone=None, num_classes=num_classes
                )
            )
    top1, top5, total = np.sum(distributed.global_to_host(counts), axis=0, dtype=np.int64)
    if total == 0:
        raise ValueError("the query split is empty")
    result = {
        "top1": 100.0 * top1 / total,
        "top5": 100.0 * top5 / total,
        "num_queries": int(total),
        "rankme": rankme_of_gram(distributed.global_to_host(bank_gram)),
    }
    if probe is not None:
        accuracy = classifier.accuracies_of(probe_counts)
        result.update(probe_top1=accuracy["top1"], probe_top5=accuracy["top5"])
    return result


# knn_accuracy's keys -> the names results and metrics give them (job and monitor alike)
_NAMES = {
    "top1": "knn_top1",
    "top5": "knn_top5",
    "num_queries": "knn_num_queries",
    "rankme": "rankme",
    "probe_top1": "online_linear_top1",
    "probe_top5": "online_linear_top5",
}


def named(result: dict) -> dict:
    """knn_accuracy's result under the names jobs and the pretraining monitor report."""
    return {_NAMES[k]: v for k, v in result.items()}


def split_names(
    knn_cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict
) -> tuple[str, str]:
    """(bank split, query split): knn_cfg's, or else data_cfg's train and eval splits."""
    return knn_cfg.bank_split or data_cfg.train_split, knn_cfg.query_split or data_cfg.eval_split


def splits(knn_cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict, mesh: Mesh):
    """(bank, queries): eval-preprocessed batches of the split_names of data_cfg's dataset."""
    distributed.check_global_batch(knn_cfg.global_batch, mesh)
    return tuple(
        data.eval_batches(
            data_cfg, name, global_batch=knn_cfg.global_batch, image_size=knn_cfg.image_size
        )
        for name in split_names(knn_cfg, data_cfg)
    )


def evaluate(
    backbone: Encoder,
    variables,
    bank,
    queries,
    knn_cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    probe=None,
) -> dict:
    """knn_accuracy with knn_cfg's k and temperature, on the batches `splits` opened."""
    return knn_accuracy(
        backbone,
        variables,
        bank,
        queries,
        mesh,
        k=knn_cfg.k,
        temperature=knn_cfg.temperature,
        num_classes=bank.num_classes,
        probe=probe,
    )
