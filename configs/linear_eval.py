r"""Linear evaluation: the official protocol (Barlow Twins evaluate.py --weights freeze).

A linear classifier (init N(0, 0.01), bias 0) on the frozen backbone in inference mode
(running BN statistics); SGD momentum 0.9, weight decay 1e-6, batch 256, lr 0.3 (scaled by
batch / 256 if you change the batch), cosine annealing stepped once per epoch, 100 epochs;
train views RandomResizedCrop(224) + flip, eval views resize 256 + center crop 224.
Results: top-1 / top-5 of the last and of the best epoch (linear_top1_last, ..._best).

Commands (from the repository root):

  # ImageNet, ResNet-50 pretraining run in /ckpt/bt_imagenet (TFDS imagenet2012 prepared)
  python -m bt_jax.main --config=configs/linear_eval.py --workdir=/tmp/bt_linear \
      --config.pretrained_workdir=/ckpt/bt_imagenet

  # the quickstart run, 32 px embedded dataset, 10 epochs (a few minutes on 2 CPU cores)
  python -m bt_jax.main --config=configs/linear_eval.py:quickstart --workdir=/tmp/bt_qs_lin \
      --config.pretrained_workdir=/tmp/bt_quickstart
  # the same protocol on a randomly initialised backbone of that architecture (baseline)
  python -m bt_jax.main --config=configs/linear_eval.py:quickstart \
      --workdir=/tmp/bt_qs_lin_random --config.pretrained_workdir=/tmp/bt_quickstart \
      --config.random_init=True
  # fast check on precomputed center-crop features (results named linear_fast_features_*)
  ... --config.linear.mode=fast_features

  # the official Barlow Twins ResNet-50 (torch.hub's resnet50.pth: a torchvision state dict;
  # any torchvision/timm ResNet file, .pth or .safetensors, instead of a pretraining run)
  python -m bt_jax.main --config=configs/linear_eval.py --workdir=/tmp/bt_official_linear \
      --config.pretrained_torchvision=/ckpt/resnet50.pth

Expected: ImageNet, ResNet-50 after 1000 epochs: linear_top1 73.2, linear_top5 91.0 (paper;
the README checkpoint 73.5 / 91.0). The official torch.hub checkpoint
(ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth), through the official evaluate.py
(facebookresearch/barlowtwins#14, April 2021, when the README gave --lr-classifier 0.1):
`{"epoch": 99, "acc1": 73.266, "acc5": 91.094, "best_acc1": 73.29, "best_acc5": 91.108}`,
i.e. linear_top1_last 73.27, linear_top5_last 91.09. Quickstart, 10 epochs (measured,
docs/benchmarks.md, Evaluation): linear_top1_last 29.0 % against 18.6 % on the random
backbone (~1.5 min each on 2 CPU cores); fast_features 30.4 % against 17.8 % (~20 s).
"""

from bt_jax.data.config import data_config
from bt_jax.defaults import eval_config, linear_config, parse_variant


def get_config(variant: str = ""):
    variant = parse_variant(variant, "linear_eval", ("quickstart", "smoke"))
    config = eval_config("linear_eval", "imagenet2012")
    config.linear = linear_config()
    if variant:
        config.data = data_config("cifar10_jpeg_mini")
        config.log_every_steps = 10
    if variant == "quickstart":
        config.linear.update(epochs=10, image_size=32)
    elif variant == "smoke":
        config.linear.update(epochs=1, image_size=16, global_batch=128, eval_batch=128)
    return config
