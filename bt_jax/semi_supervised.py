r"""The semi-supervised job: fine-tune the whole network on a labelled fraction.

  python -m bt_jax.main --config=configs/semi_supervised.py --workdir=W \
      --config.pretrained_workdir=PRETRAIN_W

The official evaluate.py --weights finetune recipe (bt_jax/evaluation/protocols.py
finetune; its numbers: configs/semi_supervised.py), trained on the labelled fraction and
evaluated on config.data's eval split. BN statistics are those of the global batch (the
official run used DDP without SyncBN: statistics of each GPU's 32 images).

The labelled fraction: ImageNet's 1 % / 10 % are the TFDS imagenet2012_subset/1pct and
/10pct datasets (the SimCLR lists; config.finetune.fraction = 0 uses the dataset's train
split as it is); for another dataset, fraction > 0 takes a stratified fraction of its train
split (bt_jax/data/subsets.py). Results: semi_supervised_<label>_top1_last / _best, ...
"""

from __future__ import annotations

import os

import ml_collections

from bt_jax.data import subsets
from bt_jax.evaluation import classifier, protocols
from bt_jax.evaluation import job as evaluation_job


def fraction_label(config: ml_collections.ConfigDict) -> str:
    fraction = config.finetune.fraction
    if fraction:
        return f"{100 * fraction:g}pct".replace(".", "p")
    dataset = config.data.dataset
    return dataset.split("/")[1] if "/" in dataset else "full"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    protocol = f"semi_supervised_{fraction_label(config)}"
    job = evaluation_job.start(config, workdir, protocol, image_size=config.finetune.image_size)
    train_data = config.data
    if config.finetune.fraction:
        root = os.path.join(job.workdir, "subsets")
        train_data = subsets.stratified_subset(
            config.data, config.finetune.fraction, config.seed, root
        )
    history, examples = protocols.finetune(
        config.finetune,
        train_data,
        config.data,
        job,
        name=protocol,
        seed=config.seed,
        log_every_steps=config.log_every_steps,
    )
    results = classifier.summarise(history, protocol)
    return job.finish(
        results,
        train_dataset=train_data.dataset,
        train_examples=examples,
        fraction=config.finetune.fraction,
    )
