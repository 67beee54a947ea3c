r"""Barlow Twins on ImageNet: the paper's recipe (Zbontar et al., 2021, section 4 / appendix).

ResNet-50 + projector 8192-8192-8192, batch 2048, 1000 epochs, LARS (10 warm-up epochs then
cosine to 1/1000), weight decay 1.5e-6, lambda 0.0051, BYOL augmentations at 224 px,
ImageNet mean/std: the defaults of bt_jax/defaults.py (pretrain_config), except for the
learning rates and the gradient scale below.

Command (any number of hosts; on a TPU pod or SLURM every host runs the same line):

  python -m bt_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/bt_r50 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected: the loss falls from ~8,000 to the low hundreds (it cannot reach 0: D > N-1);
a linear classifier on the frozen backbone (configs/linear_eval.py) then gives ~73.2 %
top-1 / 91.0 % top-5 on the ImageNet validation set (official README checkpoint: 73.5 / 91.0).
Cost: 626 steps/epoch, 626,000 steps; see README "ImageNet recipe" for pod sizes and times.

Learning rates: lr_weights = lr_biases = 0.0 here, i.e. the authors' rates for
train.global_batch (bt_jax/defaults.py BATCH_SIZE_TABLE, from barlowtwins issue #7: measured
at 128, 256, ..., 4096 over 300 epochs, interpolated between): 0.2 / 0.0048 at the default
2048, 0.4 / 0.0096 with --config.train.global_batch=256. A value on the command line
(--config.optim.lr_weights=0.3) is used as given; lr_biases 0.0 then follows it (x 0.024).

Gradient scale: the official code feeds LARS 1/W of the true gradient (W = its GPU count),
which acts like weight decay x W and lr_biases / W; optim.reference_world_size = W
reproduces a run's dynamics on any device count (0: the true global-batch gradient).
Variants (the default is the paper's):
- `configs/imagenet.py:paper`: the paper's run, weight decay 1.5e-6 on 32 GPUs
  (reference_world_size 32); 73.2 % linear top-1. The default, named.
- `configs/imagenet.py:readme`: the official README checkpoint's run (today's main.py
  defaults), weight decay 1e-6 on 16 GPUs (reference_world_size 16); 73.5 %.

  python -m bt_jax.main --config=configs/imagenet.py:readme --workdir=gs://BUCKET/bt_r50 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

- `configs/imagenet.py:wide`: past the paper's widths (its Figure 4 stops at D = 16,384):
  projector 8192-8192-65536 with its weights, BN and LARS momentum sharded over a model
  axis of 8 (mesh.model = 8: bt_jax/models/parallel.py) and the exact Gram-form loss
  ("auto" picks it, the one strategy for sharded features; bt_jax/losses.py). On a TPU
  v4-128 (64 chips, an 8 x 8 data x model mesh, 32 images per chip) or 32 x A100 (4 x 8,
  each model group one 8-GPU node, 64 images per GPU), the same command on every host:

  python -m bt_jax.main --config=configs/imagenet.py:wide --workdir=gs://BUCKET/bt_r50_wide \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Per chip (compiled, not run: bench/scaling.py on 8 CPU devices as one 1 x 8 model group,
2026-12-02; docs/benchmarks.md, Scaling): params + momentum 0.76 GiB, step temporaries
8.5 GiB at 32 images (v4: 9.2 of its 32 GiB), ~16 GiB at 64 images extrapolated linearly
(A100: ~17 of 40 GB). Replicated, this projector's params and momentum alone are 4.6 GiB.
Expected: not yet measured at this width; the run tests whether Figure 4's gain with D
continues past 16,384 (compare its linear top-1 with the default recipe's ~73 %).
"""

from bt_jax.data.config import imagenet_views
from bt_jax.defaults import parse_variant, pretrain_config


def get_config(variant: str = ""):
    variant = parse_variant(variant, "imagenet", ("paper", "readme", "wide"))
    config = pretrain_config()  # the recipe above, value by value
    config.optim.lr_weights = 0.0  # the authors' rate for train.global_batch
    config.optim.lr_biases = 0.0  # lr_weights x 0.024
    config.optim.reference_world_size = 32  # the paper's 32 GPUs
    if variant == "readme":
        config.optim.weight_decay = 1e-6
        config.optim.reference_world_size = 16
    # The host decodes, crops and flips; colour ops, blur and solarize run on the
    # accelerators (4x the host throughput per core; see docs/benchmarks.md).
    config.augment = imagenet_views(224, pixel_ops="device")
    config.knn.every_epochs = 50
    if variant == "wide":
        config.model.projector = "8192-8192-65536"
        config.mesh.model = 8  # divides 64 and 32 chips; 65,536 splits over all of them
    return config
