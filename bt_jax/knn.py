"""Weighted kNN classification on frozen backbone features (the SSL monitor protocol).

Features: the backbone's pooled output in inference mode (running BN statistics),
L2-normalised. A query's k = 200 nearest bank examples by cosine similarity vote for their
class with weight exp(similarity / 0.1); top-1 and top-5 of the vote.

Scale: the bank stays on the devices, sharded by rows as it was computed (a stack of
per-batch [B, F] arrays, P(None, "data")), so no host or device ever holds all of it. For
each query batch, every device ranks its own bank rows, the per-device top-k lists are
all-gathered and merged. Padded rows (mask False) never enter the bank or the counts, so
every example counts exactly once on any number of processes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from bt_jax import data, distributed
from bt_jax.data import normalize

AXIS = distributed.DATA_AXIS


@functools.partial(jax.jit, static_argnames=("backbone",))
def embed(backbone, variables, images):
    """L2-normalised inference-mode features of a global batch of uint8 images."""
    features = backbone.apply(variables, normalize(images), train=False).astype(jnp.float32)
    return features * jax.lax.rsqrt(jnp.sum(jnp.square(features), -1, keepdims=True) + 1e-12)


def extract(backbone, variables, batches, mesh):
    """Features, labels and masks of every batch, stacked: [num_batches, B, ...] on devices."""
    feats, labels, masks = [], [], []
    for batch in batches:
        batch = distributed.host_to_global(batch, mesh)
        feats.append(embed(backbone, variables, batch["image"]))
        labels.append(batch["label"])
        masks.append(batch["mask"])
    if not feats:
        raise ValueError("the evaluation split yielded no batches")
    stack = jax.jit(lambda xs: jnp.stack(xs))
    return stack(feats), stack(labels), stack(masks)


def _vote_counts(
    bank,
    bank_labels,
    bank_mask,
    queries,
    query_labels,
    query_mask,
    *,
    k,
    temperature,
    num_classes,
):
    """shard_map body: (top-1 correct, top-5 correct, valid) counts for one query batch.

    Every device ranks all queries against its own bank rows; an all-to-all then hands each
    device the candidates of its own queries from every device, which it merges and votes on.
    """
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
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(None, AXIS), P(None, AXIS), P(None, AXIS), P(AXIS), P(AXIS), P(AXIS)),
        out_specs=P(),
    )(bank, bank_labels, bank_mask, queries, labels, mask)


def knn_accuracy(
    backbone, variables, bank_batches, query_batches, mesh, *, k, temperature, num_classes
) -> dict:
    """Top-1 / top-5 (percent) of the weighted kNN vote; counts every query once."""
    bank, bank_labels, bank_mask = extract(backbone, variables, bank_batches, mesh)
    counts = np.zeros(3, np.int64)
    for batch in query_batches:
        batch = distributed.host_to_global(batch, mesh)
        queries = embed(backbone, variables, batch["image"])
        got = _count_batch(
            bank,
            bank_labels,
            bank_mask,
            queries,
            batch["label"],
            batch["mask"],
            mesh=mesh,
            k=k,
            temperature=temperature,
            num_classes=num_classes,
        )
        counts += np.asarray(jax.device_get(got), np.int64)
    top1, top5, total = counts
    if total == 0:
        raise ValueError("the query split is empty")
    return {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total, "num_queries": int(total)}


def evaluate(backbone, variables, config, mesh) -> dict:
    """kNN accuracy of `backbone` with config.knn on config.data (bank: train, queries: eval)."""
    knn_cfg, data_cfg = config.knn, config.data
    splits = (
        knn_cfg.bank_split or data_cfg.train_split,
        knn_cfg.query_split or data_cfg.eval_split,
    )
    bank, queries = (
        data.eval_batches(
            data_cfg, split, global_batch=knn_cfg.global_batch, image_size=knn_cfg.image_size
        )
        for split in splits
    )
    return knn_accuracy(
        backbone,
        variables,
        bank,
        queries,
        mesh,
        k=knn_cfg.k,
        temperature=knn_cfg.temperature,
        num_classes=bank.num_classes,
    )
