"""Input pipeline: TFDS records -> augmented uint8 views -> host-local batches.

from bt_jax.data import data_config, imagenet_views, pretrain_batches, normalize, IMAGENET
batches = pretrain_batches(data_config("imagenet2012"), imagenet_views(),
                           global_batch=2048, seed=0)
for batch in distributed.prefetch_to_mesh(batches, mesh):   # global jax.Arrays
    z = model(normalize(batch["view1"], IMAGENET), ...)       # inside the jitted step

Names are imported on first use (PEP 562), so the TensorFlow-free parts (configs,
normalize and the on-device pixel ops) never import TensorFlow: the train step runs on
machines without it. Only the readers (pretrain_batches, eval_batches) need it.
"""

import importlib

_HOMES = {
    "EMBEDDED_DATA_DIR": "config",
    "cifar_views": "config",
    "data_config": "config",
    "imagenet_views": "config",
    "linear_eval_view": "config",
    "view_config": "config",
    "IMAGENET": "normalization",
    "Normalization": "normalization",
    "normalize": "normalization",
    "EvalBatches": "evaluation",
    "eval_batches": "evaluation",
    "PretrainBatches": "pipeline",
    "pretrain_batches": "pipeline",
}

__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
