r"""Transfer to PASCAL VOC 2007 classification: per-class linear SVMs, mAP (documented).

TFDS voc/2007 (20 classes, multi-label; trainval 5,011 / test 4,952), prepared with
`tfds build voc/2007 --data_dir=...`. The VOC07 protocol of Goyal et al. 2019 as the paper
uses it: frozen center-crop features, L2-normalised; one linear SVM per class (squared hinge,
L2, positives weighted 2), its cost chosen among 1e-4 ... 100 by 3-fold cross-validation on
AP over trainval; "difficult" objects ignored in training and in AP; mAP on test.

Command:

  python -m bt_jax.main --config=configs/transfer_voc2007.py --workdir=/tmp/bt_voc07 \
      --config.pretrained_workdir=/ckpt/bt_imagenet --config.data.data_dir=$TFDS_DATA_DIR

Expected: transfer_svm_map 86.2 (paper, ResNet-50 res5 features; the paper's number used
the benchmark's own feature pipeline, so expect a point or so of difference).
"""

from bt_jax.data.config import data_config
from bt_jax.defaults import eval_config, parse_variant, transfer_config


def get_config(variant: str = ""):
    parse_variant(variant, "transfer_voc2007")
    config = eval_config("transfer")
    config.expected_arch = "resnet50"
    config.data = data_config("voc/2007", train_split="train+validation", eval_split="test")
    config.transfer = transfer_config(protocols=("svm",), metric="top1")
    return config
