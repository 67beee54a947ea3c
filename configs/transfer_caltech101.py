r"""Transfer to Caltech-101: linear probe on frozen features and full fine-tuning.

Dataset: caltech101_jpeg (TFDS format, 101 classes, 5,784 train / 2,893 test images in a
fixed ~2:1 per-class split, prepared offline: pass its TFDS folder as
--config.data.data_dir). Score: mean per-class accuracy (Caltech-101's convention; top-1 is
reported too).
linear: multinomial logistic regression on center-crop features, L2 chosen among
1, 0.1, ..., 1e-6 on a stratified 20 % held out from train, then refit on all of train.
finetune: every layer, BN in train mode: the semi-supervised recipe of
configs/semi_supervised.py on the train split.

Commands (from the repository root):

  python -m bt_jax.main --config=configs/transfer_caltech101.py --workdir=/tmp/bt_caltech \
      --config.pretrained_workdir=/ckpt/bt_imagenet --config.data.data_dir=$TFDS_DIR

  # the quickstart run (a 32 px CIFAR backbone): variant "quickstart" at 64 px, 5 epochs of
  # fine-tuning (the fine-tuning took 35 minutes on 2 loaded CPU cores)
  python -m bt_jax.main --config=configs/transfer_caltech101.py:quickstart \
      --workdir=/tmp/bt_qs_caltech --config.pretrained_workdir=/tmp/bt_quickstart \
      --config.data.data_dir=$TFDS_DIR

Expected: results.json with transfer_linear_mean_per_class, transfer_linear_top1,
transfer_finetune_mean_per_class_last, ... (no published Barlow Twins number uses this
split). Quickstart (measured on its earlier 1/4-width checkpoint, docs/benchmarks.md,
Evaluation): transfer_linear_mean_per_class 24.4 % (top-1 41.7 %) against 14.6 % (32.0 %)
from a random backbone.
"""

from bt_jax.data.config import data_config
from bt_jax.defaults import eval_config, finetune_config, parse_variant, transfer_config


def get_config(variant: str = ""):
    variant = parse_variant(variant, "transfer_caltech101", ("quickstart",))
    config = eval_config("transfer")
    config.data = data_config("caltech101_jpeg")  # data_dir: TFDS default unless set
    config.transfer = transfer_config(metric="mean_per_class")
    config.finetune = finetune_config()
    if variant == "quickstart":
        config.transfer.image_size = 64
        config.finetune.update(image_size=64, epochs=5)
        config.log_every_steps = 10
    return config
