r"""The kNN job: the pretraining monitor's kNN, offline, on any checkpoint and dataset.

  python -m bt_jax.main --config=configs/knn.py --workdir=W --config.pretrained_workdir=P

The protocol (bt_jax/evaluation/knn.py, the monitor's own code) with config.knn's numbers
(configs/knn.py). Results: knn_top1, knn_top5, knn_num_queries and rankme (RankMe of the
bank's backbone features) in W/results.json.
"""

from __future__ import annotations

import jax
import ml_collections

from bt_jax.evaluation import job as evaluation_job
from bt_jax.evaluation import knn


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    cfg = config.knn
    job = evaluation_job.start(config, workdir, "knn", image_size=cfg.image_size)
    bank_split, query_split = knn.split_names(cfg, config.data)
    bank, queries = knn.splits(cfg, config.data, job.mesh)
    job.say(
        f"kNN (k={cfg.k}, temperature {cfg.temperature}) on {job.backbone.label} features of "
        f"{config.data.dataset}: bank {bank_split} ({bank.num_examples}), queries "
        f"{query_split} ({queries.num_examples}), {cfg.image_size} px"
    )
    with jax.set_mesh(job.mesh):
        result = knn.evaluate(job.backbone.encoder, job.variables, bank, queries, cfg, job.mesh)
    results = knn.named(result)
    return job.finish(results, k=cfg.k, bank_split=bank_split, query_split=query_split)
