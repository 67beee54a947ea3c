r"""The kNN job: the pretraining monitor's protocol, offline, on any checkpoint and dataset.

  python -m bt_jax.main --config=configs/knn.py --workdir=W --config.pretrained_workdir=P

L2-normalised inference-mode backbone features, cosine similarity, the k = 200 nearest train
examples vote with weight exp(similarity / 0.1); top-1 and top-5 on the eval split (the bank
sharded over the devices as in bt_jax/knn.py; padded rows excluded, so each example counts
once on any number of processes). Results: knn_top1, knn_top5, knn_num_queries in
W/results.json.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from bt_jax import distributed
from bt_jax.data import eval_batches
from bt_jax.evaluation import job as evaluation_job
from bt_jax.evaluation import knn


@functools.partial(jax.jit, static_argnames=("mesh", "k", "temperature", "num_classes"))
def _count_batch(bank, bank_labels, bank_mask, queries, labels, mask, *, mesh, **kw):
    """knn._count_batch with check_vma=False: the vote's counts come from all-gathered values,
    identical on every device, but shard_map cannot infer that they are replicated."""
    row, batch = P(None, knn.AXIS), P(knn.AXIS)
    return jax.shard_map(
        functools.partial(knn._vote_counts, **kw),
        mesh=mesh,
        in_specs=(row, row, row, batch, batch, batch),
        out_specs=P(),
        check_vma=False,
    )(bank, bank_labels, bank_mask, queries, labels, mask)


def knn_accuracy(backbone, variables, bank_batches, query_batches, mesh, **kw) -> dict:
    """Top-1 / top-5 (percent) of the weighted vote; each unpadded query counted once."""
    bank = knn.extract(backbone, variables, bank_batches, mesh)
    counts = []
    for batch in distributed.prefetch_to_mesh(query_batches, mesh):
        queries = knn.embed(backbone, variables, batch["image"])
        counts.append(_count_batch(*bank, queries, batch["label"], batch["mask"], mesh=mesh, **kw))
    top1, top5, total = np.sum(distributed.global_to_host(counts), axis=0, dtype=np.int64)
    if total == 0:
        raise ValueError("the query split is empty")
    return {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total, "num_queries": int(total)}


def run(config, workdir: str) -> dict:
    job = evaluation_job.start(config, workdir, "knn")
    cfg, data = config.knn, config.data
    distributed.check_global_batch(cfg.global_batch, job.mesh)
    splits = (cfg.bank_split or data.train_split, cfg.query_split or data.eval_split)
    bank, queries = (
        eval_batches(data, s, global_batch=cfg.global_batch, image_size=cfg.image_size)
        for s in splits
    )
    job.say(
        f"kNN (k={cfg.k}, temperature {cfg.temperature}) on {job.backbone.label} features of "
        f"{data.dataset}: bank {splits[0]} ({bank.num_examples}), queries {splits[1]} "
        f"({queries.num_examples}), {cfg.image_size} px"
    )
    with jax.set_mesh(job.mesh):
        variables = evaluation_job.replicate(job.backbone.variables, job.mesh)
        result = knn_accuracy(
            job.backbone.module,
            variables,
            bank,
            queries,
            job.mesh,
            k=cfg.k,
            temperature=cfg.temperature,
            num_classes=bank.num_classes,
        )
    results = {f"knn_{k}": v for k, v in result.items()}
    return job.finish(results, k=cfg.k, bank_split=splits[0], query_split=splits[1])
