"""Input pipeline: TFDS records -> augmented uint8 views -> host-local batches.

from bt_jax.data import data_config, imagenet_views, pretrain_batches, normalize
batches = pretrain_batches(data_config("imagenet2012"), imagenet_views(),
                           global_batch=2048, seed=0)
for batch in distributed.prefetch_to_mesh(batches, mesh):   # global jax.Arrays
    z = model(normalize(batch["view1"]), ...)                 # inside the jitted step
"""

from bt_jax.data.config import (
    EMBEDDED_DATA_DIR,
    cifar_views,
    data_config,
    imagenet_views,
    linear_eval_view,
    view_config,
)
from bt_jax.data.evaluation import EvalBatches, eval_batches
from bt_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize
from bt_jax.data.pipeline import PretrainBatches, pretrain_batches

__all__ = [
    "EMBEDDED_DATA_DIR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalBatches",
    "PretrainBatches",
    "cifar_views",
    "data_config",
    "eval_batches",
    "imagenet_views",
    "linear_eval_view",
    "normalize",
    "pretrain_batches",
    "view_config",
]
