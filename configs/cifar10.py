r"""Barlow Twins on CIFAR-10: ResNet-18 with the CIFAR stem, solo-learn's public recipe.

ResNet-18 (3x3 stride-1 stem, no max-pool), projector 2048-2048-2048, batch 256, 1000
epochs, lambda 0.0051, loss x 0.1, LARS eta 0.02 with LR clipping, lr 0.3 for all
parameters (biases and BN excluded from decay and adaptation), wd 1e-4, 32 px views without
blur, inputs normalised with CIFAR-10's mean/std (model.normalization "auto" picks them for
any cifar* dataset; bt_jax/data/normalization.py). One known difference: solo-learn's trust
ratio is eta ||p|| / (||g|| + wd ||p||), ours the official eta ||p|| / ||g + wd p||.

Command:

  python -m bt_jax.main --config=configs/cifar10.py --workdir=/tmp/bt_cifar10

  offline, on the prepared JPEG copy:
  python -m bt_jax.main --config=configs/cifar10.py --workdir=/tmp/bt_cifar10 \
      --config.data.dataset=cifar10_jpeg --config.data.data_dir=../shared/tfds

Expected: kNN (k=200) top-1 ~ 85-88 % and linear top-1 ~ 92 % after 1000 epochs
(solo-learn reports 92.1 % linear). One epoch is 195 steps.
"""

from bt_jax.data.config import cifar_views, data_config
from bt_jax.defaults import parse_variant, pretrain_config


def get_config(variant: str = ""):
    parse_variant(variant, "cifar10")
    config = pretrain_config()  # what follows is what differs from the ImageNet recipe

    config.model.arch = "resnet18"
    config.model.cifar_stem = True
    config.model.projector = "2048-2048-2048"

    config.loss.scale = 0.1

    config.optim.lr_weights = 0.3
    config.optim.lr_biases = 0.3
    config.optim.weight_decay = 1e-4
    config.optim.eta = 0.02
    config.optim.clip_lr = True

    config.train.global_batch = 256
    config.train.log_every_steps = 50
    config.train.checkpoint_every_steps = 1000

    config.data = data_config("cifar10")
    config.augment = cifar_views(32)
    config.knn.every_epochs = 50
    config.knn.image_size = 32
    return config
