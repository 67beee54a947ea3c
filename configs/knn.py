r"""kNN evaluation of a pretrained backbone (the monitor's protocol as a standalone job).

L2-normalised backbone features (inference mode), cosine similarity, k = 200, votes weighted
by exp(similarity / 0.1); top-1 and top-5. Bank: the train split with eval preprocessing;
queries: the eval split.

Commands (from the repository root):

  # ImageNet, ResNet-50 pretraining run in /ckpt/bt_imagenet
  python -m bt_jax.main --config=configs/knn.py --workdir=/tmp/bt_knn \
      --config.pretrained_workdir=/ckpt/bt_imagenet

  # the official Barlow Twins ResNet-50 (torch.hub's resnet50.pth, a torchvision state dict)
  python -m bt_jax.main --config=configs/knn.py --workdir=/tmp/bt_official_knn \
      --config.pretrained_torchvision=/ckpt/resnet50.pth

  # the quickstart run (python -m bt_jax.main --config=configs/quickstart.py
  # --workdir=/tmp/bt_quickstart), on the embedded dataset at 32 px
  python -m bt_jax.main --config=configs/knn.py:quickstart --workdir=/tmp/bt_qs_knn \
      --config.pretrained_workdir=/tmp/bt_quickstart

Expected: results.json with knn_top1 / knn_top5 / knn_num_queries. ImageNet: neither the
paper nor the official repository publishes a kNN number (for its checkpoint either); use it
as a cheap, comparable signal between checkpoints. Quickstart
(measured 2026-12-02 on a configs/quickstart.py run, 1,000 queries, ~20 s on 2 CPU cores):
knn_top1 28.6 % (equal to the run's own monitor), and 27.7 % with --config.random_init=True
(BN statistics re-estimated on 19 x 256 = 4,864 training images, all the full batches
the 5,000 hold; 23.2 % with
--config.random_init_bn.batches=0, the initial mean 0 / variance 1).
"""

from bt_jax.data.config import data_config
from bt_jax.defaults import eval_config, knn_config, parse_variant


def get_config(variant: str = ""):
    variant = parse_variant(variant, "knn", ("quickstart", "smoke"))
    config = eval_config("knn", "imagenet2012")
    config.knn = knn_config()
    if variant:
        config.data = data_config("cifar10_jpeg_mini")
        config.knn.image_size = 32 if variant == "quickstart" else 16
        config.knn.global_batch = 256 if variant == "quickstart" else 64
    return config
